"""`chora doctor`: every config against its generator's requirements and against the
running stack (a real nats-server, the real generator service), as a table and as JSON;
exit 1 when anything is not ready."""

from __future__ import annotations

import asyncio
import json
import sys

import pytest

from bus.topology import Topology, provision
from services.runtime import ready_file, run_service
from tests.conftest import ROOT, child_env, wait_for, write
from tests.integration.test_code_generation_api import CONFIG

CHORA = [sys.executable, "-m", "chora"]


@pytest.fixture
def cdir(tmp_path):
    d = tmp_path / "configs"
    write(
        d / "hello.json", {"id": "hello", "generator": "jinja2", "template": "Hi {{ name }}", "context": {"name": "x"}}
    )
    write(d / "add-function.json", CONFIG)
    return d


async def doctor(*args: str, **env: str) -> tuple[int, str, str]:
    environ = child_env(**env)
    environ.pop("ANTHROPIC_API_KEY", None)
    if "ANTHROPIC_API_KEY" in env:
        environ["ANTHROPIC_API_KEY"] = env["ANTHROPIC_API_KEY"]
    proc = await asyncio.create_subprocess_exec(
        *CHORA,
        "doctor",
        *args,
        cwd=ROOT,
        env=environ,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode, out.decode(), err.decode()


def row(out: str, config: str) -> list[str]:
    (line,) = [ln for ln in out.splitlines() if ln.split()[:1] == [config]]
    return line.split(None, 3)


async def test_a_missing_key_makes_its_config_not_ready(cdir):
    rc, out, err = await doctor("--no-stack", str(cdir))
    assert rc == 1
    assert out.splitlines()[0].split() == ["CONFIG", "GENERATOR", "READY", "MISSING"]
    assert row(out, "hello") == ["hello", "jinja2", "yes", "-"]
    assert row(out, "add-function") == [
        "add-function",
        "code_generation",
        "no",
        "environment variable ANTHROPIC_API_KEY",
    ]
    assert "2 configs: 1 ready, 1 not ready" in err

    rc, out, _ = await doctor("--no-stack", "--json", str(cdir))
    doc = json.loads(out)
    assert rc == 1 and doc["ready"] is False and "stack" not in doc
    by_id = {c["config"]: c for c in doc["configs"]}
    cg = by_id["add-function"]
    assert cg["ready"] is False and cg["missing"] == ["environment variable ANTHROPIC_API_KEY"]
    assert cg["credentials"] == ["ANTHROPIC_API_KEY"] and cg["endpoints"] and cg["concurrent"] is True
    assert by_id["hello"]["ready"] is True


async def test_with_the_key_set_and_no_stack_check_everything_is_ready(cdir):
    rc, out, _ = await doctor("--no-stack", str(cdir), ANTHROPIC_API_KEY="sk-test")
    assert rc == 0, out
    assert row(out, "add-function")[2] == "yes"


async def test_broken_configs_and_unknown_generators_are_not_ready(cdir):
    write(cdir / "typo.json", {"id": "typo", "generator": "jinja2", "templte": "x"})
    write(cdir / "mystery.json", {"id": "mystery", "generator": "no-such-generator", "template": "x"})
    rc, out, _ = await doctor("--no-stack", "--json", str(cdir), ANTHROPIC_API_KEY="sk-test")
    by_id = {c["config"]: c for c in json.loads(out)["configs"]}
    assert rc == 1
    assert by_id["typo"]["ready"] is False and by_id["typo"]["missing"][0].startswith("CONFIG_INVALID")
    assert by_id["mystery"]["missing"][0].startswith("UNKNOWN_GENERATOR")


async def test_nats_that_does_not_answer_makes_everything_not_ready(cdir, tmp_path):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rc, out, _ = await doctor(
        "--json",
        "--timeout",
        "1",
        str(cdir),
        ANTHROPIC_API_KEY="sk-test",
        NATS_URL=f"nats://127.0.0.1:{port}",
        CHORA_HOME=str(tmp_path / "var"),
    )
    doc = json.loads(out)
    assert rc == 1 and doc["stack"]["reachable"] is False
    assert all(f"NATS at nats://127.0.0.1:{port} does not answer" in c["missing"] for c in doc["configs"])


async def test_the_running_stack_provisioned_and_the_generator_seen(settings, cdir, nats_server):
    s = settings.model_copy(update={"configs_dir": cdir})
    env = dict(
        NATS_URL=nats_server.url,
        CHORA_PREFIX=s.prefix,
        CHORA_HOME=str(s.home),
        ANTHROPIC_API_KEY="sk-test",
    )
    # nothing provisioned yet: the topology is missing
    rc, out, _ = await doctor("--json", str(cdir), **env)
    doc = json.loads(out)
    assert rc == 1 and doc["stack"]["reachable"] is True
    assert f"stream {Topology.from_settings(s).events_stream}" in doc["stack"]["missing"]

    stop = asyncio.Event()
    task = asyncio.create_task(run_service("generator", s, stop=stop))
    try:
        await wait_for(lambda: task.done() or ready_file(s, "generator").exists(), 30, "generator ready")
        import nats

        nc = await nats.connect(nats_server.url)
        await provision(nc.jetstream(), Topology.from_settings(s))  # every durable, as `chora nats provision`
        await nc.close()
        rc, out, _ = await doctor("--json", str(cdir), **env)
        doc = json.loads(out)
        stack = doc["stack"]
        assert stack["missing"] == [] and "generator" in stack["services_seen"]
        assert set(stack["services_missing"]) == {"validator", "assembler", "telemetry"}
        # the configs themselves are ready (the generator runs); the stack is not complete
        assert all(c["ready"] for c in doc["configs"]), doc["configs"]
        assert rc == 1 and doc["ready"] is False

        rc, out, _ = await doctor(str(cdir), **env)
        assert "services  seen: generator; not running: validator, assembler, telemetry" in out
        assert row(out, "add-function")[2] == "yes"
    finally:
        stop.set()
        await task
