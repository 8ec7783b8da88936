"""The first flow, end to end: `chora up` as a subprocess on its embedded
nats-server, driven by the CLI and by a plain nats-py client."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import nats
import httpx2 as httpx
import pytest

from contracts.catalogue import events_stream
from tests.conftest import example_configs, child_env, wait_for

CHORA = [sys.executable, "-m", "chora"]


def up_env(tmp_path, **extra: str) -> dict[str, str]:
    """The environment of a `chora up` with its own home, prefix and free ports."""
    defaults = dict(
        CHORA_HOME=str(tmp_path / "var"),
        CHORA_PREFIX="e" + uuid.uuid4().hex[:8],
        CHORA_NATS_PORT="0",
        CHORA_NATS_HTTP_PORT="0",
        CHORA_METRICS_PORT="0",
        CHORA_GATEWAY_PORT="0",
        CHORA_CONFIGS_DIR=str(example_configs()),
    )
    return child_env(**{**defaults, **extra})


@contextlib.contextmanager
def running_stack(tmp_path):
    """`chora up` with its own home, prefix and free ports; stopped with SIGTERM."""
    info = start_up(tmp_path)
    try:
        yield info
    finally:
        stop_up(info)


def start_up(tmp_path) -> dict:
    """A started `chora up` (its stack.json, plus env, proc and home); :func:`stop_up` ends it."""
    env = up_env(tmp_path)
    proc = subprocess.Popen(
        CHORA + ["up"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines = []
    for line in proc.stdout:  # blocks until `chora up` has printed its readiness
        lines.append(line)
        if "Try:" in line:  # the banner's last line
            break
    stack_file = tmp_path / "var" / "run" / "stack.json"
    assert stack_file.exists(), "chora up did not come up:\n" + "".join(lines)
    info = json.loads(stack_file.read_text())
    info["env"], info["proc"], info["home"] = env, proc, tmp_path / "var"
    info["banner"] = "".join(lines)
    return info


def stop_up(info: dict) -> None:
    proc = info["proc"]
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


@pytest.fixture
def stack(tmp_path):
    with running_stack(tmp_path) as info:
        yield info


def run_cli(stack, *args, timeout=60):
    return subprocess.run(
        CHORA + list(args), cwd=stack["home"].parent, env=stack["env"], capture_output=True, text=True, timeout=timeout
    )


def jsonl(stack) -> list[dict]:
    path = Path(stack["jsonl_path"])
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


async def test_generate_from_cli_and_from_another_service(stack):
    # 1. The CLI: request, wait for the outcome, print the content.
    trace = "trace-" + uuid.uuid4().hex[:8]
    r = run_cli(stack, "generate", "hello-world", "--trace-id", trace, "--context", '{"name": "Ada"}')
    assert r.returncode == 0, r.stderr
    assert "Ada" in r.stdout

    # A missing config: an error outcome, non-zero exit, a clear message.
    r = run_cli(stack, "generate", "no-such-config", "--trace-id", trace, "--timeout", "20")
    assert r.returncode == 1
    assert "CONFIG_NOT_FOUND" in r.stderr

    # 2. Another team's service: plain nats-py, CloudEvents binary-mode headers.
    prefix = stack["prefix"]
    nc = await nats.connect(stack["nats_url"])
    try:
        got: asyncio.Future = asyncio.get_running_loop().create_future()
        event_id = str(uuid.uuid4())

        async def on_msg(msg):
            body = json.loads(msg.data)
            if body.get("request_id") == event_id and not got.done():
                got.set_result((msg.headers, body))

        await nc.subscribe(f"{prefix}.content_generated.*", cb=on_msg)  # any kind of run: .standalone here
        js = nc.jetstream()
        ack = await js.publish(
            f"{prefix}.generation.requested",
            json.dumps({"content_config_id": "hello-world", "context": {"name": "Grace"}}).encode(),
            headers={
                "ce-specversion": "1.0",
                "ce-id": event_id,
                "ce-source": "urn:team-b:docs-service",
                "ce-type": "chora.generation.requested",
                "ce-datacontenttype": "application/json",
                "ce-traceid": trace,
                "Nats-Msg-Id": event_id,
            },
        )
        assert ack.seq > 0
        headers, body = await asyncio.wait_for(got, 20)
    finally:
        await nc.close()
    assert body["status"] == "success" and "Grace" in body["content"]
    assert body["content_hash"].startswith("sha256:")
    assert headers["ce-type"] == "chora.content_generated"
    assert headers["ce-traceid"] == trace
    assert headers["ce-traceparent"].startswith("00-")

    # 3. Every event of this trace stands once in the JSONL: 3 requests, 3 outcomes.
    def traced():
        return [
            e
            for e in jsonl(stack)
            if e.get("trace_id") == trace
            and e["event_type"] in ("chora.generation.requested", "chora.content_generated")
        ]

    def verdicts():
        return [e for e in jsonl(stack) if e.get("trace_id") == trace and e["event_type"] == "chora.content_validated"]

    await wait_for(lambda: len(traced()) == 6, timeout=20, what="6 traced lines in the JSONL")
    lines = traced()
    assert len({e["event_id"] for e in lines}) == 6
    types = sorted(e["event_type"] for e in lines)
    assert types == ["chora.content_generated"] * 3 + ["chora.generation.requested"] * 3
    assert sorted(e["status"] for e in lines if e["event_type"] == "chora.content_generated") == [
        "error",
        "success",
        "success",
    ]
    assert (Path(stack["jsonl_path"]).stat().st_mode & 0o777) == 0o600
    await wait_for(lambda: len(verdicts()) == 2, timeout=20, what="2 content_validated lines (one per success)")

    # 4. /metrics counts them.
    metrics = urllib.request.urlopen(stack["metrics_url"], timeout=5).read().decode()
    assert 'chora_events_total{event_type="chora.content_generated",status="success"} 2.0' in metrics
    assert 'chora_events_total{event_type="chora.content_generated",status="error"} 1.0' in metrics
    # the embedded server's /varz, for the NATS server panels
    assert f'chora_nats_server_up{{server="{stack["nats_monitor_url"].split("//")[1]}"}} 1.0' in metrics
    # ... and every service serves its own, listed for Prometheus in the file_sd targets
    assert set(stack["metrics_urls"]) == {"generator", "validator", "assembler", "notifier", "telemetry", "gateway"}
    targets = json.loads(Path(stack["prometheus_targets"]).read_text())
    assert {g["labels"]["service"]: g["targets"] for g in targets} == {
        name: [url.split("/")[2]] for name, url in stack["metrics_urls"].items()
    }
    generator = urllib.request.urlopen(stack["metrics_urls"]["generator"], timeout=5).read().decode()
    assert (
        'chora_events_consumed_total{consumer="generator",event_type="chora.generation.requested",outcome="ack"} 3.0'
    ) in generator
    assert (
        'chora_events_published_total{consumer="generator",event_type="chora.content_generated",status="success"} 2.0'
    ) in generator
    assert "process_resident_memory_bytes" in generator

    # 5. `chora events tail` filters by trace id.
    r = run_cli(stack, "events", "tail", "--trace-id", trace, "--type", "content_generated", "--no-follow")
    assert r.returncode == 0
    assert len(r.stdout.splitlines()) == 3

    # 6. The gateway: loopback only, auth on with a key made on first start (0600, only its hash in
    # the keys file), printed with gateway_url; a request through it is answered by the stack.
    url = stack["gateway_url"]
    assert url and url.startswith("http://127.0.0.1:") and url in stack["banner"], stack["banner"]
    key_file = stack["home"] / "run" / "gateway.key"
    key = key_file.read_text().strip()
    assert key in stack["banner"] and (key_file.stat().st_mode & 0o777) == 0o600
    assert key not in Path(stack["gateway_keys_file"]).read_text()
    r = httpx.post(
        f"{url}/v1/generate",
        json={"content_config_id": "hello-world", "context": {"name": "Gateway"}},
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    )
    assert r.status_code == 200 and r.json()["content"].startswith("# Hello, Gateway!"), r.text
    assert httpx.get(f"{url}/v1/configs", timeout=10).status_code == 401

    # 7. Callbacks are off by default: a request that asks for one (on its .callback subject)
    # is refused as the notifier reads it, and no consumer of the outcomes is kept for
    # callbacks. One that asks for a callback on the plain subject (which the notifier does
    # not read) is dead-lettered by the generator with a clear code, never silently dropped.
    nc = await nats.connect(stack["nats_url"])
    try:
        js = nc.jetstream()
        loop = asyncio.get_running_loop()
        refused: asyncio.Future = loop.create_future()
        misrouted: asyncio.Future = loop.create_future()
        cb_id, wrong_id = str(uuid.uuid4()), str(uuid.uuid4())

        async def on_failed(msg):
            body = json.loads(msg.data)
            if body.get("event_id") == cb_id and not refused.done():
                refused.set_result(body)

        async def on_dead(msg):
            if msg.headers.get("ce-id") == wrong_id and not misrouted.done():
                misrouted.set_result(msg.headers)

        await nc.subscribe(f"{prefix}.notification_failed", cb=on_failed)
        await nc.subscribe(f"{prefix}.dlq.generator", cb=on_dead)

        async def request(subject: str, event_id: str) -> None:
            await js.publish(
                subject,
                json.dumps({"content_config_id": "hello-world", "callback_url": "http://127.0.0.1:9/cb"}).encode(),
                headers={
                    "ce-specversion": "1.0",
                    "ce-id": event_id,
                    "ce-source": "urn:team-b:docs-service",
                    "ce-type": "chora.generation.requested",
                    "Nats-Msg-Id": event_id,
                },
            )

        await request(f"{prefix}.generation.requested.callback", cb_id)
        await request(f"{prefix}.generation.requested", wrong_id)
        note = await asyncio.wait_for(refused, 20)
        assert note["subscription"] == "callback" and note["error"]["code"] == "CALLBACK_REFUSED"
        assert note["event_type"] == "chora.generation.requested" and "callbacks are off" in note["error"]["message"]
        dead = await asyncio.wait_for(misrouted, 20)
        assert dead["Chora-Dlq-Code"] == "MISROUTED_CALLBACK", dead
        assert f"{prefix}.generation.requested.callback" in dead["Chora-Dlq-Reason"], dead
        durables = {c.name: c for c in await js.consumers_info(events_stream(prefix))}
        assert "notifier-callback-requests" in durables and "notifier-callbacks" not in durables
        # the notifier was sent the one request with a callback, not the CLI's nor the others
        assert durables["notifier-callback-requests"].delivered.stream_seq > 0
        assert durables["notifier-callback-requests"].num_pending == 0
        counted = durables["notifier-callback-requests"].delivered.consumer_seq
        assert counted == 1, counted
    finally:
        await nc.close()

    # 8. SIGTERM: everything drains and stops; the embedded server is gone.
    proc = stack["proc"]
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, out
    assert "stopped" in out
    for pid in stack["services"].values():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not (stack["home"] / "run" / "stack.json").exists()
    assert not Path(stack["prometheus_targets"]).exists()


async def test_a_restarted_service_gets_its_new_metrics_port_into_the_targets(stack):
    """With free ports (CHORA_METRICS_PORT=0) a restart moves a service's /metrics:
    `chora up` rewrites the file_sd targets, so Prometheus follows it."""
    targets_file = Path(stack["prometheus_targets"])

    def target_of(name: str) -> str | None:
        try:
            groups = json.loads(targets_file.read_text())
        except (OSError, ValueError):
            return None
        return next((g["targets"][0] for g in groups if g["labels"]["service"] == name), None)

    old = target_of("validator")
    assert old == stack["metrics_urls"]["validator"].split("/")[2]
    old_pid = stack["services"]["validator"]
    os.kill(old_pid, signal.SIGKILL)
    stack_file = stack["home"] / "run" / "stack.json"

    def restarted() -> dict | None:
        """stack.json once `chora up` took in the restarted validator's readiness facts."""
        try:
            info = json.loads(stack_file.read_text())
        except (OSError, ValueError):
            return None
        return info if info["services"]["validator"] != old_pid and info["metrics_urls"]["validator"] else None

    await wait_for(lambda: restarted() is not None, timeout=30, what="the validator restarted and ready")
    new = restarted()["metrics_urls"]["validator"]
    assert target_of("validator") == new.split("/")[2]  # written before stack.json
    text = urllib.request.urlopen(new, timeout=5).read().decode()
    assert "chora_events_consumed_total" in text
    assert target_of("generator") == stack["metrics_urls"]["generator"].split("/")[2]  # the others stay


def test_up_with_nats_url_starts_no_server(nats_server, tmp_path):
    """With NATS_URL set, `chora up` uses that server; `chora nats provision` prepares it."""
    env = child_env(
        NATS_URL=nats_server.url,
        CHORA_HOME=str(tmp_path / "var"),
        CHORA_PREFIX="u" + uuid.uuid4().hex[:8],
        CHORA_METRICS_PORT="0",
        CHORA_CONFIGS_DIR=str(example_configs()),
    )
    r = subprocess.run(CHORA + ["nats", "provision"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "provisioned streams" in r.stdout
    proc = subprocess.Popen(
        CHORA + ["up"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        for line in proc.stdout:
            if "Try:" in line:
                break
        info = json.loads((tmp_path / "var" / "run" / "stack.json").read_text())
        assert info["embedded"] is False and info["nats_url"] == nats_server.url
        assert not (tmp_path / "var" / "nats").exists()
        r = subprocess.run(
            CHORA + ["generate", "welcome-email"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
        )
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert nats_server.proc.poll() is None  # the server we gave it is still ours, still running


def test_a_second_up_says_a_stack_is_already_running(stack):
    """A second `chora up` (`make up`) for the same CHORA_HOME names the running stack rather
    than failing on a port collision, and leaves the first one alone."""
    r = run_cli(stack, "up", timeout=60)
    assert r.returncode != 0
    assert "a stack is already running here" in r.stderr and f"pid {stack['proc'].pid}" in r.stderr, r.stderr
    assert "in use" not in r.stderr
    assert stack["proc"].poll() is None and (stack["home"] / "run" / "stack.json").exists()
