"""The sink's one handler: mirror an event to the JSONL file and the metrics.

A plain async function of (event, delivery, :class:`Deps`), registered for
every event type in :data:`EVENT_HANDLERS`; it never touches NATS and
publishes nothing. It returns only once the line is written, so the consumer
acknowledges the message after the write; a failed write raises
:class:`~services.telemetry.sink.SinkError` and the message is redelivered.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from contracts.envelope import CloudEvent
from contracts.handling import ANY, Delivery, EventHandlers
from services.telemetry.metrics import TelemetryMetrics
from services.telemetry.sink import JsonlSink


@dataclass
class Deps:
    """What the sink's handler needs."""

    sink: JsonlSink
    metrics: TelemetryMetrics
    clock: Callable[[], float] = time.time


async def mirror(event: CloudEvent, delivery: Delivery, deps: Deps) -> list[CloudEvent]:
    if await deps.sink.write(event):
        deps.metrics.written(event, deps.clock())
    else:
        deps.metrics.duplicate(event)
    return []


EVENT_HANDLERS: EventHandlers[Deps] = {ANY: mirror}
