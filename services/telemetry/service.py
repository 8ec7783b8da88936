"""Wiring of the telemetry sink: ``build(settings)`` -> :class:`TelemetryApp`.

Nothing happens at import or build time; :meth:`TelemetryApp.start` opens the
JSONL file (repairing a torn last line, reading its position back: the stream
sequence of the last line). The app has no handler and no durable consumer: it is a
``mirror_target`` (:class:`services.telemetry.mirror.TelemetryMirror`), which the
runtime feeds with :class:`bus.mirror.StreamMirror`: every instance reads the whole
stream, in order, without acks.
Its metrics live in ``app.metrics_registry``, which the runtime serves on the
process's ``/metrics`` (:mod:`services.metrics`).

Settings read: ``jsonl_path``, ``telemetry_*``, ``monitor_interval_s`` and ``configs_dir``
(which configs opt in to keeping request context values: :mod:`.privacy`).

JetStream figures (consumer lag, stream sizes, dead letters) come from a plain
async callable returning a :class:`bus.monitor.JetStreamSnapshot`: the one the
app was built with, else ``ctx.monitor`` if the runtime hands one over, else a
:class:`bus.monitor.JetStreamMonitor` over the context's JetStream stores. A
background task calls it every ``monitor_interval_s``; a failed poll is
logged once per outage, counted, and flips ``chora_jetstream_monitor_up`` to 0;
the figures of the last good poll stay. Neither the handler nor this module
touches NATS.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any, Awaitable, Callable

from bus.monitor import JetStreamMonitor, JetStreamSnapshot
from services.settings import Settings
from services.telemetry.metrics import TelemetryMetrics
from services.telemetry.privacy import ConfigOptIn
from services.telemetry.mirror import DEFAULT_MAX_EVENT_BYTES, TelemetryMirror
from services.telemetry.sink import JsonlSink


log = logging.getLogger("chora.telemetry")

DEFAULT_MONITOR_INTERVAL_S = 5.0

Monitor = Callable[[], Awaitable[JetStreamSnapshot]]


class TelemetryApp:
    """The telemetry service app (see :class:`services.runtime.ServiceApp`)."""

    name = "telemetry"

    def __init__(
        self,
        sink: JsonlSink,
        metrics: TelemetryMetrics | None = None,
        *,
        monitor: Monitor | None = None,
        monitor_interval_s: float = DEFAULT_MONITOR_INTERVAL_S,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
    ):
        self.sink = sink
        self.monitor = monitor
        self.monitor_interval_s = monitor_interval_s
        self._monitor_task: asyncio.Task | None = None
        self._monitor_wake: asyncio.Event | None = None
        self._monitor_failing = False
        self.metrics = metrics or TelemetryMetrics()
        self.metrics_registry = self.metrics.registry  # served on the process's /metrics by the runtime
        self.mirror_target = TelemetryMirror(
            self.sink, self.metrics, consumer=self.name, max_event_bytes=max_event_bytes
        )

    async def start(self, ctx: Any = None) -> None:
        await self.sink.start()
        if self.monitor is None and ctx is not None:
            self.monitor = getattr(ctx, "monitor", None)
            if self.monitor is None:
                try:
                    self.monitor = JetStreamMonitor.from_context(ctx).snapshot
                except (ValueError, AttributeError) as e:
                    log.warning("telemetry: no JetStream figures (%s)", e)
        if self.monitor is not None and self.monitor_interval_s > 0:
            self._monitor_wake = asyncio.Event()
            self._monitor_task = asyncio.create_task(self._poll_loop(), name="telemetry-jetstream-monitor")

    async def poll_once(self) -> bool:
        """Read the JetStream figures once; True if that worked."""
        if self.monitor is None:
            return False
        try:
            snap = await asyncio.wait_for(self.monitor(), timeout=max(1.0, self.monitor_interval_s * 2))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            if not self._monitor_failing:
                log.warning("telemetry: reading JetStream figures failed: %s", e)
            self._monitor_failing = True
            self.metrics.jetstream_failed(getattr(e, "servers", None))
            return False
        if self._monitor_failing:
            log.info("telemetry: JetStream figures readable again")
        self._monitor_failing = False
        self.metrics.jetstream_polled(snap)
        return True

    async def _poll_loop(self) -> None:
        wake = self._monitor_wake
        assert wake is not None
        while True:
            await self.poll_once()
            try:
                await asyncio.wait_for(wake.wait(), timeout=self.monitor_interval_s)
            except asyncio.TimeoutError:
                continue
            return  # woken: closing

    async def close(self) -> None:
        task, self._monitor_task = self._monitor_task, None
        if task is not None:
            if self._monitor_wake is not None:
                self._monitor_wake.set()
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        await self.sink.close()

    def info(self) -> dict[str, Any]:
        return {"jsonl_path": str(self.sink.path)}


def build(settings: Settings) -> TelemetryApp:
    sink = JsonlSink(
        Path(settings.jsonl_path),
        fsync=settings.telemetry_fsync,
        redact_keys=frozenset(settings.telemetry_redact_keys),
        rotate_bytes=settings.telemetry_rotate_bytes,
        rotate_daily=settings.telemetry_rotate_daily,
        retention_files=settings.telemetry_retention_files,
        keep_context=ConfigOptIn(settings.configs_dir),
    )
    return TelemetryApp(
        sink,
        TelemetryMetrics(),
        monitor_interval_s=settings.monitor_interval_s,
        max_event_bytes=settings.max_event_bytes,
    )
