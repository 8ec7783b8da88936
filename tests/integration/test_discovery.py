"""Discovery on NATS and health, with every service of SERVICES running in-process on one
real nats-server for the module: each instance answers $SRV.PING, INFO and STATS with its
version and instance id, its own info, health and stats endpoints, /healthz and /readyz on
its metrics port; `chora services` lists them (table and --json) and exits 3 when none
answer."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys

import nats
import pytest
import pytest_asyncio

from bus.discovery import discover
from bus.server import EmbeddedServer
from bus.settings import NatsSettings
from services.metrics import build_version
from services.runtime import SERVICES, ready_file, run_service
from services.settings import Settings
from tests.conftest import get_json, ROOT, child_env, example_configs, stop_services, wait_for

pytestmark = pytest.mark.asyncio(loop_scope="module")


async def gather_replies(nc, subject: str, expect: int, what: str) -> list[dict]:
    """Replies to one request on ``subject`` until ``expect`` arrived (named wait)."""
    replies: list[dict] = []
    inbox = nc.new_inbox()

    async def collect(msg) -> None:
        replies.append(json.loads(msg.data))

    sub = await nc.subscribe(inbox, cb=collect)
    await nc.publish(subject, b"", reply=inbox)
    try:
        await wait_for(lambda: len(replies) >= expect, 10, what)
    finally:
        await sub.unsubscribe()
    return replies


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("discovery")
    s = EmbeddedServer(d / "store", log_path=d / "nats.log").start()
    yield s
    s.stop()


@pytest.fixture(scope="module", autouse=True)
def gateway_env():
    """The gateway among SERVICES: a free port, and one key (its auth is on by default)."""
    from services.gateway.security import hash_key

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CHORA_GATEWAY_PORT", "0")
        mp.setenv("CHORA_GATEWAY_KEYS", json.dumps([{"name": "t", "key_sha256": hash_key("k"), "scopes": ["read"]}]))
        yield


@pytest.fixture(scope="module")
def settings(server, tmp_path_factory) -> Settings:
    return Settings(
        home=tmp_path_factory.mktemp("home"),
        prefix="disc",
        configs_dir=example_configs(),
        metrics_port=0,
        render_workers=1,
        nats=NatsSettings(url=server.url),
    )


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(settings):
    """Every service of SERVICES, in this process; their readiness files by service."""
    stop = asyncio.Event()
    tasks = [asyncio.create_task(run_service(name, settings, stop=stop), name=name) for name in SERVICES]

    def all_ready() -> bool:
        for t in tasks:
            if t.done():
                t.result()
        return all(ready_file(settings, n).exists() for n in SERVICES)

    await wait_for(all_ready, 60, "every service's readiness file")
    facts = {n: json.loads(ready_file(settings, n).read_text()) for n in SERVICES}

    async def ready(name: str) -> bool:
        url = facts[name]["metrics_url"].removesuffix("/metrics") + "/readyz"
        return (await asyncio.to_thread(get_json, url))[0] == 200

    for name in SERVICES:  # bound: the server answered the consumer loops' first pulls
        await wait_for(lambda n=name: ready(n), 20, f"{name} /readyz 200")
    yield facts
    assert await stop_services(stop, tasks) == []


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def nc(server):
    conn = await nats.connect(server.url)
    yield conn
    await conn.close()


async def test_every_service_answers_srv_ping_with_its_version_and_instance_id(stack, nc):
    pings = await gather_replies(nc, "$SRV.PING", len(SERVICES), "a PING reply from every service")
    mine = {p["metadata"]["service"]: p for p in pings if p["name"].startswith("chora-")}
    assert set(mine) == set(SERVICES)
    for name, p in mine.items():
        assert p["type"] == "io.nats.micro.v1.ping_response"
        assert p["name"] == f"chora-{name}"
        assert p["version"] == build_version() == "0.1.0"
        md = p["metadata"]
        assert md["instance"] == f"{socket.gethostname()}:{os.getpid()}"
        assert md["pid"] == str(os.getpid()) and md["prefix"] == "disc"
        assert md["metrics_url"] == stack[name]["metrics_url"]
        assert p["id"]  # the instance id of the $SRV subjects


async def test_srv_info_lists_the_info_health_and_stats_endpoints_of_the_instance(stack, nc):
    reply = await nc.request("$SRV.INFO.chora-generator", b"", timeout=5)
    info = json.loads(reply.data)
    assert info["type"] == "io.nats.micro.v1.info_response" and info["name"] == "chora-generator"
    subjects = {e["name"]: e["subject"] for e in info["endpoints"]}
    assert subjects == {e: f"disc.svc.generator.{info['id']}.{e}" for e in ("info", "health", "stats")}

    # the instance's own subjects answer; info is what its readiness file says
    by_id = json.loads((await nc.request(f"$SRV.INFO.chora-generator.{info['id']}", b"", timeout=5)).data)
    assert by_id["id"] == info["id"]
    facts = json.loads((await nc.request(subjects["info"], b"", timeout=5)).data)
    assert facts == stack["generator"]
    health = json.loads((await nc.request(subjects["health"], b"", timeout=5)).data)
    assert health["ready"] is True and health["status"] == "ready"
    assert health["checks"] == {
        "nats": "connected",
        "consumers": {"generator": "bound", "generator-compensations": "bound"},
        "draining": False,
    }


async def test_srv_stats_carries_the_consumer_counters(stack, nc, settings):
    from bus.publisher import Publisher
    from contracts.catalogue import GENERATION_REQUESTED
    from contracts.envelope import new_event
    from contracts.events import GenerationRequested

    ev = new_event(GENERATION_REQUESTED, GenerationRequested(content_config_id="hello-world"), source="t")
    await Publisher(nc.jetstream(), settings.prefix).publish(ev)

    async def acked() -> bool:
        stats = json.loads((await nc.request("$SRV.STATS.chora-generator", b"", timeout=5)).data)
        data = next(e["data"] for e in stats["endpoints"] if e["name"] == "stats")
        return data["generator"]["acked"] >= 1

    await wait_for(acked, 20, "the generator's STATS to count the request")
    stats = json.loads((await nc.request("$SRV.STATS.chora-assembler", b"", timeout=5)).data)
    assert stats["type"] == "io.nats.micro.v1.stats_response" and stats["started"].endswith("Z")
    data = next(e["data"] for e in stats["endpoints"] if e["name"] == "stats")
    assert set(data) == {"assembler", "assembler-completions", "assembler-cancels", "assembler-deadlines"}
    assert set(data["assembler"]) == {"acked", "naked", "dead", "published", "pulls"}


async def test_healthz_and_readyz_answer_on_every_metrics_port(stack):
    for name, facts in stack.items():
        base = facts["metrics_url"].removesuffix("/metrics")
        status, doc = await asyncio.to_thread(get_json, base + "/healthz")
        assert (status, doc["status"]) == (200, "alive"), name
        status, doc = await asyncio.to_thread(get_json, base + "/readyz")
        assert status == 200 and doc["status"] == "ready", (name, doc)
        assert doc["checks"]["nats"] == "connected" and all(v == "bound" for v in doc["checks"]["consumers"].values())


async def test_discover_gathers_every_instance_of_the_prefix_only(stack, nc):
    found: list = []

    async def everyone_ready() -> bool:
        # one discovery is a 0.3 s window: on a loaded machine an instance (all six share this
        # process's loop) can answer after it, so ask again until a window holds all of them
        found[:] = await discover(nc, window=0.3, prefix="disc")
        return sorted(i.service for i in found) == sorted(SERVICES)

    await wait_for(everyone_ready, 20, "a discovery window that every instance answered")
    assert all(i.health is not None and i.health["ready"] for i in found), [(i.service, i.health) for i in found]
    assert await discover(nc, window=0.3, prefix="other") == []


def run_cli(settings: Settings, *args: str, prefix: str | None = None) -> subprocess.CompletedProcess:
    env = child_env(
        NATS_URL=settings.nats.url or "", CHORA_PREFIX=prefix or settings.prefix, CHORA_HOME=str(settings.home)
    )
    return subprocess.run(
        [sys.executable, "-m", "chora", "services", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_chora_services_lists_the_live_instances_as_json_and_as_a_table(stack, settings):
    r = await asyncio.to_thread(run_cli, settings, "--json", "--wait", "1")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)["instances"]
    assert sorted(row["service"] for row in rows) == sorted(SERVICES)
    gen = next(row for row in rows if row["service"] == "generator")
    assert set(gen) == {
        "service",
        "name",
        "id",
        "instance",
        "version",
        "prefix",
        "started",
        "metrics_url",
        "ready",
        "status",
        "reason",
        "endpoints",
        "stats",
    }
    assert gen["ready"] is True and gen["status"] == "ready" and gen["reason"] is None
    assert gen["metrics_url"] == stack["generator"]["metrics_url"] and gen["version"] == "0.1.0"
    assert gen["endpoints"]["health"] == f"disc.svc.generator.{gen['id']}.health"
    assert gen["stats"]["generator"]["acked"] >= 0

    r = await asyncio.to_thread(run_cli, settings, "--wait", "0.3")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["SERVICE", "INSTANCE", "VERSION", "STATUS", "ACKED", "METRICS"]
    assert sorted(line.split()[0] for line in lines[1:]) == sorted(SERVICES)
    assert all(" ready " in line for line in lines[1:])


async def test_chora_services_exits_3_when_no_instance_answers(stack, settings):
    r = await asyncio.to_thread(run_cli, settings, "--json", "--wait", "0.2", prefix="nobody")
    assert r.returncode == 3
    assert json.loads(r.stdout) == {"instances": []}
    assert "no service instance answered" in r.stderr
