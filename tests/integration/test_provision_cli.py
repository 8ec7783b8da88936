"""`chora nats provision` as an operator runs it: with CHORA_NOTIFIER_CONFIG it also
creates each webhook subscription's durable, which the least-privilege notifier user
may not create itself."""

from __future__ import annotations

import subprocess
import sys
import uuid

import pytest
from nats.js.errors import NotFoundError

from bus.topology import CALLBACK_OUTCOMES, CALLBACK_REQUESTS, Topology
from bus.settings import NatsSettings
from services.settings import Settings
from contracts.catalogue import ARTIFACT_REQUESTED, BATCH_REQUESTED, GENERATION_REQUESTED, subject_for
from tests.conftest import ROOT, child_env

CHORA = [sys.executable, "-m", "chora"]
NOTIFIER_CONFIG = ROOT / "examples" / "notifier.yaml"


def provision(nats_server, prefix: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        CHORA + ["nats", "provision"],
        env=child_env(NATS_URL=nats_server.url, CHORA_PREFIX=prefix, **env),
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_provision_creates_the_subscriptions_durables(nats_server, nc):
    prefix = "p" + uuid.uuid4().hex[:8]
    r = provision(nats_server, prefix, CHORA_NOTIFIER_CONFIG=str(NOTIFIER_CONFIG))
    assert r.returncode == 0, r.stderr
    assert "notify-release-hook" in r.stdout and "notify-failures-to-n8n" in r.stdout

    topo = Topology.from_settings(Settings(_env_file=None, prefix=prefix, nats=NatsSettings(url=nats_server.url)))
    js = nc.jetstream()
    release = await js.consumer_info(topo.events_stream, "notify-release-hook")
    assert sorted(release.config.filter_subjects or [release.config.filter_subject]) == sorted(
        subject_for(t, prefix) for t in ("chora.artifact_assembled", "chora.batch_completed")
    )
    failures = await js.consumer_info(topo.events_stream, "notify-failures-to-n8n")
    assert failures.config.max_deliver == 6 + 120  # max_attempts + circuit.max_deferrals
    assert failures.config.max_ack_pending == 64
    # the services' own durables as before (but the callbacks' outcomes: callbacks are off)
    for durable in topo.consumers:
        if durable != CALLBACK_OUTCOMES:
            await js.consumer_info(topo.events_stream, durable)


async def test_the_callbacks_outcomes_durable_is_kept_only_while_callbacks_are_on(nats_server, nc):
    prefix = "p" + uuid.uuid4().hex[:8]
    topo = Topology.from_settings(Settings(_env_file=None, prefix=prefix, nats=NatsSettings(url=nats_server.url)))
    js = nc.jetstream()
    r = provision(nats_server, prefix, CHORA_CALLBACK_ALLOW='["hooks.example.com"]')
    assert r.returncode == 0 and CALLBACK_OUTCOMES in r.stdout, r.stderr
    await js.consumer_info(topo.events_stream, CALLBACK_OUTCOMES)
    # turned off: the durable nobody would read any more is deleted, the requests' one stays
    r = provision(nats_server, prefix, CHORA_CALLBACK_ALLOW="[]")
    assert r.returncode == 0 and CALLBACK_OUTCOMES not in r.stdout.replace(CALLBACK_REQUESTS, ""), r.stdout
    with pytest.raises(NotFoundError):
        await js.consumer_info(topo.events_stream, CALLBACK_OUTCOMES)
    await js.consumer_info(topo.events_stream, CALLBACK_REQUESTS)
    assert provision(nats_server, prefix).returncode == 0  # and again, with nothing left to delete


async def test_a_broken_subscriptions_file_is_a_clear_error_and_creates_nothing(nats_server, nc, tmp_path):
    bad = tmp_path / "notifier.yaml"
    bad.write_text("subscriptions:\n  - name: Not A Name\n    events: [chora.batch_completed]\n    url: ftp://x\n")
    prefix = "p" + uuid.uuid4().hex[:8]
    r = provision(nats_server, prefix, CHORA_NOTIFIER_CONFIG=str(bad))
    assert r.returncode == 64, (r.stdout, r.stderr)
    assert str(bad) in r.stderr and "Traceback" not in r.stderr
    topo = Topology.from_settings(Settings(_env_file=None, prefix=prefix, nats=NatsSettings(url=nats_server.url)))
    names = [s.config.name for s in await nc.jetstream().streams_info()]
    assert topo.events_stream not in names


async def test_changing_start_of_an_existing_subscription_is_a_clear_error(nats_server, tmp_path):
    config = tmp_path / "notifier.yaml"
    sub = "subscriptions:\n  - {name: hook, events: [chora.batch_completed], url: 'http://h/', secret_env: S%s}\n"
    config.write_text(sub % "")
    prefix = "p" + uuid.uuid4().hex[:8]
    assert provision(nats_server, prefix, CHORA_NOTIFIER_CONFIG=str(config)).returncode == 0
    config.write_text(sub % ", start: all")
    r = provision(nats_server, prefix, CHORA_NOTIFIER_CONFIG=str(config))
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "consumer notify-hook already exists and started from new; start: all applies only" in r.stderr
    assert "Traceback" not in r.stderr
    config.write_text(sub % ", start: new")
    assert provision(nats_server, prefix, CHORA_NOTIFIER_CONFIG=str(config)).returncode == 0


async def test_provision_moves_an_older_deployment_to_the_callback_subjects(nats_server, nc):
    """Before the .callback subjects, the stream stored only the plain request subjects and the
    notifier's durable read every request: provision adds the subjects and narrows the durable,
    which keeps its position."""
    prefix = "p" + uuid.uuid4().hex[:8]
    topo = Topology.from_settings(Settings(_env_file=None, prefix=prefix, nats=NatsSettings(url=nats_server.url)))
    js = nc.jetstream()
    old_stream = topo.stream_configs()[0]
    old_stream.subjects = [s for s in old_stream.subjects or [] if not s.endswith(".callback")]
    await js.add_stream(old_stream)
    requests = (GENERATION_REQUESTED, ARTIFACT_REQUESTED, BATCH_REQUESTED)
    old = topo.consumer_config(topo.consumers[CALLBACK_REQUESTS])
    old.filter_subjects = [subject_for(t, prefix) for t in requests]
    await js.add_consumer(topo.events_stream, old)
    await js.publish(subject_for(GENERATION_REQUESTED, prefix), b"{}")  # read by the old durable
    r = provision(nats_server, prefix)
    assert r.returncode == 0, r.stderr
    stream = await js.stream_info(topo.events_stream)
    assert {f"{subject_for(t, prefix)}.callback" for t in requests} <= set(stream.config.subjects or [])
    info = await js.consumer_info(topo.events_stream, CALLBACK_REQUESTS)
    assert sorted(info.config.filter_subjects or []) == sorted(f"{subject_for(t, prefix)}.callback" for t in requests)
    assert info.num_pending == 0  # the plain request stored before is no longer its business
    await js.publish(f"{subject_for(BATCH_REQUESTED, prefix)}.callback", b"{}")
    assert (await js.consumer_info(topo.events_stream, CALLBACK_REQUESTS)).num_pending == 1
