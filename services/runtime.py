"""Running one service: the wiring between a service app and the bus.

A service app is plain: ``start()``, ``handle(event, delivery) -> events``
(its handler table bound to its dependencies, :func:`contracts.handling.route`),
``close()`` and a ``name`` (which is also its durable consumer in the
topology). Its ``build(settings)`` is the service's one wiring function. It never
touches NATS; this module connects, provisions its consumer, runs the
consumer loop, serves the process's ``/metrics`` (:mod:`services.metrics`,
with the app's own ``metrics_registry`` when it has one), writes a readiness file and
drains on SIGTERM/SIGINT. It also answers ``/healthz`` and ``/readyz`` on the metrics
port (:mod:`services.health`) and registers the process as a NATS micro service for
discovery (:mod:`bus.discovery`: ``$SRV.PING|INFO|STATS`` and its info, health and stats
endpoints), so every service of :data:`SERVICES` gets both. A service that cannot start
(bad config, missing secret, unreachable server) leaves the reason in ``<home>/run/<name>.<pid>.error``
as well as on stderr, so `chora up` can print it where its user looks.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import os
import signal
import socket
from pathlib import Path
from typing import Any, Awaitable, Callable, Protocol, Sequence

from dataclasses import asdict, dataclass

from bus.cache import ResultCacheStore
from bus.connection import connect, settle
from bus.consumer import ConsumerLoop, Handler
from bus.content import ContentStore
from bus.discovery import Registration, register
from bus.mirror import StreamMirror
from bus.progress import ConsumerProgress
from bus.publisher import Publisher
from bus.state import StateStore
from bus.topology import ConsumerSpec, Topology, provision
from services.settings import Settings
from contracts.envelope import CloudEvent
from contracts.handling import Delivery
from services.health import Health
from services.metrics import ServiceMetrics, build_version

log = logging.getLogger("chora.service")

# name -> "module:function" building the app from Settings
SERVICES: dict[str, str] = {
    "generator": "services.generator.service:build",
    "telemetry": "services.telemetry.service:build",
    "notifier": "services.notifier.service:build",
    "validator": "services.validator.service:build",
    "assembler": "services.assembler.service:build",
    "gateway": "services.gateway.service:build",
}


class ServiceStartError(RuntimeError):
    """A service could not start (bad config, unreachable server, ...): a message for people."""


@dataclass
class BusContext:
    """What the runtime hands an app on start: never a connection, only
    narrow stores (KV state with compare-and-set, large content)."""

    settings: Settings
    topology: Topology
    state: StateStore
    content: ContentStore
    cache: ResultCacheStore | None = None  # the generator's result cache
    limits: StateStore | None = None  # the rate-limit counters (KV, compare-and-set)
    # The gateway's only (it publishes requests and follows outcomes itself); handler services
    # never read it.
    connection: Any = None
    health: Health | None = None  # the process's readiness (what /readyz answers)
    # How far a durable consumer of the events stream has got (see bus.progress): by durable name.
    progress: Callable[[str], ConsumerProgress] | None = None
    # Publishes events an app originates itself, not in answer to a delivery (the validator's
    # scan of the configs directory); returns once JetStream has stored them all.
    publish: Callable[[Sequence[CloudEvent]], Awaitable[Any]] | None = None


class ServiceApp(Protocol):
    name: str

    async def start(self, ctx: BusContext) -> None: ...

    async def handle(self, event: CloudEvent, delivery: Delivery) -> Sequence[CloudEvent]: ...

    async def close(self) -> None: ...

    def info(self) -> dict[str, Any]:
        """Facts for the readiness file (e.g. where its JSONL is)."""
        ...

    # Optional: def consumers(self, topology) -> list[tuple[ConsumerSpec, Handler]]
    # for a service with more than its one durable consumer (default: [(its own, handle)]).
    # Optional: async def drain() -> None, called on SIGTERM before the consumers drain (e.g. to
    # hand back work still queued inside the app, so the drain does not wait for it).
    # Optional: mirror_target (a bus.mirror.MirrorTarget): the app reads the whole stream in order
    # without acks, keeping its position itself (the telemetry sink), instead of its consumer.
    # Optional: metrics_registry (a prometheus_client CollectorRegistry) of the app's own metrics,
    # served on the process's /metrics; read after start().


def build(name: str, settings: Settings) -> ServiceApp:
    if name not in SERVICES:
        raise SystemExit(f"unknown service {name!r}; known: {', '.join(SERVICES)}")
    module, func = SERVICES[name].split(":")
    return getattr(importlib.import_module(module), func)(settings)


def ready_file(settings: Settings, name: str) -> Path:
    return settings.home / "run" / f"{name}.{os.getpid()}.json"


def start_error_file(settings: Settings, name: str, pid: int | None = None) -> Path:
    """Where a service that could not start leaves the reason, for `chora up` to show it."""
    return settings.home / "run" / f"{name}.{pid or os.getpid()}.error"


def _cannot_start(settings: Settings, name: str, message: str) -> ServiceStartError:
    path = start_error_file(settings, name)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(message + "\n")
    except OSError as e:  # the reason still reaches stderr (the log) through the caller
        log.warning("cannot write %s: %s", path, e)
    return ServiceStartError(message)


async def run_service(name: str, settings: Settings, *, stop: asyncio.Event | None = None) -> None:
    """Run until SIGTERM/SIGINT (or ``stop`` is set), then drain and return."""
    app = build(name, settings)
    health = Health(name)
    try:
        nc = await connect(settings.nats, name=f"chora-{name}", inbox_prefix=f"_INBOX.{name}")
    except Exception as e:
        raise _cannot_start(settings, name, f"{name}: cannot connect to NATS: {e}") from e
    try:
        js = nc.jetstream()
        topo = Topology.from_settings(settings)
        content = ContentStore(js, topo.content_bucket, settings.content_threshold_bytes)
        if settings.provision:
            await provision(js, topo, consumers=[])
        cache = ResultCacheStore(js, topo.cache_bucket, content)
        limits = StateStore(js, topo.limits_bucket)
        await app.start(
            BusContext(
                settings,
                topo,
                StateStore(js, topo.state_bucket),
                content,
                cache=cache,
                limits=limits,
                connection=nc if getattr(app, "wants_connection", False) else None,
                health=health,
                progress=lambda durable: ConsumerProgress(js, topo.events_stream, durable),
                publish=Publisher(js, topo.prefix, content=content, max_bytes=settings.max_event_bytes).publish_many,
            )
        )
        mirror_target = getattr(app, "mirror_target", None)
        pairs: list[tuple[ConsumerSpec, Handler]] = (
            app.consumers(topo)
            if hasattr(app, "consumers")
            else []
            if mirror_target is not None
            else [(topo.consumers[name], app.handle)]
        )
        if settings.provision:
            retired = app.retired_consumers() if hasattr(app, "retired_consumers") else []
            await provision(js, topo, consumers=[], extra=[spec for spec, _ in pairs], retire=retired)
    except Exception as e:
        await nc.close()
        raise _cannot_start(settings, name, f"{name} could not start: {e}") from e
    metrics = ServiceMetrics()
    app_registry = getattr(app, "metrics_registry", None)
    if app_registry is not None:
        metrics.include(app_registry)
    for spec, _ in pairs:
        metrics.consumer(spec.durable, spec.event_types)
    if settings.metrics_port >= 0:
        try:
            metrics.serve(settings.metrics_host, settings.metrics_port, health=health)
        except OSError as e:
            await app.close()
            await nc.close()
            raise _cannot_start(
                settings,
                name,
                f"{name}: cannot serve /metrics on {settings.metrics_host}:{settings.metrics_port}: {e}. "
                "Set CHORA_METRICS_PORT to a free port (0 picks one, -1 serves none).",
            ) from e
    loops = [
        ConsumerLoop(
            nc,
            js,
            topo,
            spec,
            handler,
            max_in_flight=settings.max_concurrency,
            pull_batch=settings.pull_batch,
            max_event_bytes=settings.max_event_bytes,
            observer=metrics,
            content=content,
        )
        for spec, handler in pairs
    ]
    # A mirror (the telemetry sink) reads the whole stream without acks (bus.mirror).
    mirrors = [StreamMirror(nc, js, topo.events_stream, mirror_target, name=name)] if mirror_target is not None else []
    stop = stop or asyncio.Event()
    aloop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            aloop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread
            pass
    health.watch(
        lambda: nc.is_connected,
        [(spec.durable, loop) for (spec, _), loop in zip(pairs, loops)] + [(m.name, m) for m in mirrors],
    )
    health.start_ticking()
    runs = [asyncio.create_task(loop.run()) for loop in loops] + [asyncio.create_task(m.run()) for m in mirrors]
    health.started = True

    def facts() -> dict[str, Any]:
        return {"service": name, "pid": os.getpid(), **(app.info() or {}), "metrics_url": metrics.url}

    discovery = await _register(nc, name, settings, health, facts, loops, mirrors, metrics.url)
    rf = ready_file(settings, name)
    rf.parent.mkdir(parents=True, exist_ok=True)
    rf.write_text(json.dumps(facts()))
    log.info("%s ready", name)
    try:
        await stop.wait()
    finally:
        log.info("%s draining", name)
        health.draining = True  # /readyz and the discovery health answer 503 / not ready from now on
        app_drain = getattr(app, "drain", None)
        if app_drain is not None:
            await app_drain()
        await asyncio.gather(*(loop.stop() for loop in loops), *(m.stop() for m in mirrors))
        await asyncio.gather(*runs)
        if discovery is not None:
            await discovery.stop()
        await settle(nc)
        try:
            await nc.drain()
        except Exception as e:  # stopped while the server is away (reconnecting): nothing more can leave
            log.warning("%s: could not drain the connection (%s); closing it", name, e)
            try:
                await nc.close()
            except Exception as e:  # the socket is gone already
                log.debug("%s: close: %s", name, e)
        await app.close()
        health.stop_ticking()
        # shutdown() waits for the server thread's poll loop: not on the event loop.
        await asyncio.to_thread(metrics.stop)
        rf.unlink(missing_ok=True)
        log.info("%s stopped: %s", name, [loop.stats for loop in loops] + [m.stats for m in mirrors])


async def _register(
    nc: Any,
    name: str,
    settings: Settings,
    health: Health,
    facts: Any,
    loops: list[ConsumerLoop],
    mirrors: list[StreamMirror],
    metrics_url: str | None,
) -> Registration | None:
    """This process as an instance of the micro service ``chora-<name>`` (see bus.discovery).
    A server that refuses it (permissions) costs discovery, not the service: logged, not fatal."""
    host = socket.gethostname()
    try:
        return await register(
            nc,
            service=name,
            version=build_version(),
            prefix=settings.prefix,
            metadata={
                "instance": f"{host}:{os.getpid()}",
                "host": host,
                "pid": str(os.getpid()),
                "metrics_url": metrics_url or "",
            },
            info=facts,
            health=health.ready_doc,
            stats=lambda: {
                **{loop.spec.durable: asdict(loop.stats) for loop in loops},
                **{m.name: asdict(m.stats) for m in mirrors},
            },
        )
    except Exception as e:
        log.warning("%s: cannot register for discovery ($SRV): %s", name, e)
        return None
