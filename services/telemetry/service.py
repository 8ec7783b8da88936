"""Wiring of the telemetry sink: ``build(settings)`` -> :class:`TelemetryApp`.

Nothing happens at import or build time; :meth:`TelemetryApp.start` opens the
JSONL file (repairing a torn last line, remembering the ids already written)
and starts the ``/metrics`` HTTP server.

Settings read: ``jsonl_path``, ``metrics_host``, ``metrics_port`` (0 picks a
free port; :meth:`TelemetryApp.info` reports the real one), ``telemetry_fsync``
and ``telemetry_max_ids``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from chora.settings import Settings
from contracts.envelope import CloudEvent
from services.telemetry.handlers import mirror
from services.telemetry.metrics import TelemetryMetrics
from services.telemetry.sink import JsonlSink


class TelemetryApp:
    """The telemetry service app (see :class:`services.runtime.ServiceApp`).

    ``observer`` is the consumer loop's metrics hook (``handled(...)``).
    """

    name = "telemetry"

    def __init__(
        self,
        sink: JsonlSink,
        metrics: TelemetryMetrics | None = None,
        *,
        metrics_host: str = "127.0.0.1",
        metrics_port: int | None = 0,
    ):
        self.sink = sink
        self.metrics = metrics or TelemetryMetrics()
        self.observer = self.metrics
        self.metrics_host = metrics_host
        self.metrics_port = metrics_port  # None: do not serve over HTTP

    async def start(self, ctx=None) -> None:
        await self.sink.start()
        if self.metrics_port is not None:
            try:
                self.metrics.serve(self.metrics_host, self.metrics_port)
            except BaseException:
                await self.sink.close()
                raise

    async def handle(self, event: CloudEvent) -> list[CloudEvent]:
        return await mirror(event, sink=self.sink, metrics=self.metrics)

    async def close(self) -> None:
        try:
            await self.sink.close()
        finally:
            # shutdown() waits for the server thread's poll loop: not on the event loop.
            await asyncio.to_thread(self.metrics.stop)

    def info(self) -> dict[str, Any]:
        return {"metrics_url": self.metrics.url, "jsonl_path": str(self.sink.path)}


def build(settings: Settings) -> TelemetryApp:
    sink = JsonlSink(
        Path(settings.jsonl_path),
        fsync=settings.telemetry_fsync,
        max_ids=settings.telemetry_max_ids,
        redact_keys=frozenset(settings.telemetry_redact_keys),
    )
    return TelemetryApp(sink, TelemetryMetrics(), metrics_host=settings.metrics_host, metrics_port=settings.metrics_port)
