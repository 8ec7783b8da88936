"""Running one service: the wiring between a service app and the bus.

A service app is plain: ``start()``, ``handle(event) -> events``, ``close()``
and a ``name`` (which is also its durable consumer in the topology). It never
touches NATS; this module connects, provisions its consumer, runs the
consumer loop, writes a readiness file and drains on SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import os
import signal
from pathlib import Path
from typing import Any, Protocol, Sequence

from bus.connection import connect
from bus.consumer import ConsumerLoop, Observer
from bus.topology import Topology, provision
from chora.settings import Settings
from contracts.envelope import CloudEvent

log = logging.getLogger("chora.service")

# name -> "module:function" building the app from Settings
SERVICES: dict[str, str] = {
    "generator": "services.generator.service:build",
    "telemetry": "services.telemetry.service:build",
}


class ServiceApp(Protocol):
    name: str

    async def start(self) -> None: ...

    async def handle(self, event: CloudEvent) -> Sequence[CloudEvent]: ...

    async def close(self) -> None: ...

    def info(self) -> dict[str, Any]:
        """Facts for the readiness file (e.g. a metrics URL)."""
        ...


def build(name: str, settings: Settings) -> ServiceApp:
    if name not in SERVICES:
        raise SystemExit(f"unknown service {name!r}; known: {', '.join(SERVICES)}")
    module, func = SERVICES[name].split(":")
    return getattr(importlib.import_module(module), func)(settings)


def ready_file(settings: Settings, name: str) -> Path:
    return settings.home / "run" / f"{name}.{os.getpid()}.json"


async def run_service(name: str, settings: Settings, *, stop: asyncio.Event | None = None) -> None:
    """Run until SIGTERM/SIGINT (or ``stop`` is set), then drain and return."""
    app = build(name, settings)
    await app.start()
    nc = await connect(settings.nats, name=f"chora-{name}")
    js = nc.jetstream()
    topo = Topology.from_settings(settings)
    await provision(js, topo, consumers=[name])
    observer: Observer | None = getattr(app, "observer", None)
    loop = ConsumerLoop(
        nc,
        js,
        topo,
        topo.consumers[name],
        app.handle,
        max_in_flight=settings.max_concurrency,
        pull_batch=settings.pull_batch,
        max_event_bytes=settings.max_event_bytes,
        observer=observer,
    )
    stop = stop or asyncio.Event()
    aloop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            aloop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread
            pass
    run = asyncio.create_task(loop.run())
    rf = ready_file(settings, name)
    rf.parent.mkdir(parents=True, exist_ok=True)
    rf.write_text(json.dumps({"service": name, "pid": os.getpid(), **(app.info() or {})}))
    log.info("%s ready", name)
    try:
        await stop.wait()
    finally:
        log.info("%s draining", name)
        await loop.stop()
        await run
        await nc.drain()
        await app.close()
        rf.unlink(missing_ok=True)
        log.info("%s stopped: %s", name, loop.stats)
