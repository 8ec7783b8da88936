"""One stack for a module of gateway tests: a real nats-server, the generator, validator and
assembler in-process (run_service), and the gateway's :class:`Operations` on its own connection."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from pathlib import Path
from typing import AsyncIterator

from bus.connection import connect
from bus.server import EmbeddedServer
from bus.settings import NatsSettings
from bus.topology import Topology, provision
from services.runtime import ready_file, run_service
from services.settings import Settings
from tests.conftest import example_configs, wait_for

SERVICES = ("generator", "validator", "assembler")


def stack_settings(tmp: Path, url: str, **extra) -> Settings:
    return Settings(
        home=tmp / "var",
        prefix="t" + uuid.uuid4().hex[:10],
        configs_dir=example_configs(),
        metrics_port=-1,
        render_isolation=False,  # renders on the loop: the gateway is under test, not the render pool
        callback_allow=["http://127.0.0.1:9/hooks/"],
        nats=NatsSettings(url=url),
        **extra,
    )


@contextlib.asynccontextmanager
async def services_running(settings: Settings, names=SERVICES) -> AsyncIterator[list[asyncio.Task]]:
    """The named services in-process, each ready (its readiness file); drained on exit."""
    stop = asyncio.Event()
    tasks = [asyncio.create_task(run_service(n, settings, stop=stop), name=f"svc-{n}") for n in names]
    try:
        for name, t in zip(names, tasks):

            async def ready(name=name, t=t):
                if t.done():
                    t.result()
                return ready_file(settings, name).exists()

            await wait_for(ready, timeout=30, what=f"{name} ready")
        yield tasks
    finally:
        stop.set()
        errors = [r for r in await asyncio.gather(*tasks, return_exceptions=True) if isinstance(r, BaseException)]
        assert not errors, f"services failed: {errors}"


@contextlib.asynccontextmanager
async def nats_stack(tmp: Path, **extra) -> AsyncIterator[tuple[EmbeddedServer, Settings, object]]:
    """(server, settings, a connection) with the topology provisioned and the services running."""
    server = EmbeddedServer(tmp / "nats-store", log_path=tmp / "nats-server.log").start()
    try:
        settings = stack_settings(tmp, server.url, **extra)
        nc = await connect(settings.nats, name="gateway-test")
        try:
            await provision(nc.jetstream(), Topology.from_settings(settings), consumers=[])
            async with services_running(settings):
                yield server, settings, nc
        finally:
            await nc.close()
    finally:
        server.stop()
