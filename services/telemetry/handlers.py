"""The sink's one handler: mirror an event to the JSONL file and the metrics.

A plain async function of (event, dependencies); it never touches NATS and
publishes nothing. It returns only once the line is written, so the consumer
acknowledges the message after the write; a failed write raises
:class:`~services.telemetry.sink.SinkError` and the message is redelivered.
"""

from __future__ import annotations

import time
from typing import Callable

from contracts.envelope import CloudEvent
from services.telemetry.metrics import TelemetryMetrics
from services.telemetry.sink import JsonlSink


async def mirror(
    event: CloudEvent,
    *,
    sink: JsonlSink,
    metrics: TelemetryMetrics,
    clock: Callable[[], float] = time.time,
) -> list[CloudEvent]:
    if await sink.write(event):
        metrics.written(event, clock())
    else:
        metrics.duplicate(event)
    return []
