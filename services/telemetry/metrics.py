"""Prometheus metrics of the telemetry sink, in a registry of its own.

Labels only ever hold values from small, closed sets (event types of the
catalogue, statuses, generator names, consumer names, outcomes): never an
event id, a trace id or a request id.

    chora_events_total{event_type,status}                 events mirrored (duplicates not counted)
    chora_generation_duration_seconds{generator}          content_generated duration_ms, successes only
    chora_sink_lag_seconds                                line written minus event time
    chora_sink_lines_written_total                        lines appended to the JSONL file
    chora_sink_duplicates_skipped_total                   events already written (redeliveries)
    chora_consumer_handled_total{consumer,event_type,outcome}   from the consumer loop's observer hook
    chora_handler_duration_seconds{consumer}              handling time, from the same hook
"""

from __future__ import annotations

import threading
from datetime import datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

from contracts.catalogue import CONTENT_GENERATED
from contracts.envelope import CloudEvent

GENERATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0)
HANDLER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)

_MAX_LABEL = 64


def _label(value: Any, default: str = "unknown") -> str:
    if value is None or value == "":
        return default
    s = str(value)
    return s if len(s) <= _MAX_LABEL else s[:_MAX_LABEL]


def event_timestamp(value: str | None) -> float | None:
    """Seconds since the epoch of an RFC3339 time, or None if absent or unreadable."""
    if not value:
        return None
    try:
        return datetime.fromisoformat(value).timestamp()
    except (ValueError, TypeError):
        return None


class TelemetryMetrics:
    """The sink's metrics; also the consumer loop's observer (:meth:`handled`)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.events = Counter("chora_events_total", "Events mirrored by the telemetry sink.", ["event_type", "status"], registry=r)
        self.generation_duration = Histogram(
            "chora_generation_duration_seconds",
            "Duration of successful generations (content_generated duration_ms).",
            ["generator"],
            buckets=GENERATION_BUCKETS,
            registry=r,
        )
        self.sink_lag = Histogram(
            "chora_sink_lag_seconds", "Time from an event's time to its line being written.", buckets=LAG_BUCKETS, registry=r
        )
        self.lines_written = Counter("chora_sink_lines_written", "Lines appended to the telemetry JSONL file.", registry=r)
        self.duplicates_skipped = Counter(
            "chora_sink_duplicates_skipped", "Events not written again because their id was already written.", registry=r
        )
        self.consumer_handled = Counter(
            "chora_consumer_handled", "Messages settled by a consumer loop.", ["consumer", "event_type", "outcome"], registry=r
        )
        self.handler_duration = Histogram(
            "chora_handler_duration_seconds", "Time to handle and settle one message.", ["consumer"], buckets=HANDLER_BUCKETS, registry=r
        )
        self._server = None
        self._thread: threading.Thread | None = None
        self.host: str | None = None
        self.port: int | None = None

    # ------------------------------------------------------------------ recording
    def written(self, event: CloudEvent, written_at: float) -> None:
        """One event got its line."""
        data = event.data
        status = getattr(data, "status", None)
        self.events.labels(_label(event.type), _label(status, "ok")).inc()
        self.lines_written.inc()
        t = event_timestamp(event.time)
        if t is not None:
            self.sink_lag.observe(max(0.0, written_at - t))
        if event.type == CONTENT_GENERATED and status == "success":
            ms = getattr(data, "duration_ms", None)
            if isinstance(ms, (int, float)) and ms >= 0:
                self.generation_duration.labels(_label(getattr(data, "generator_type", None))).observe(ms / 1000.0)

    def duplicate(self, event: CloudEvent) -> None:
        self.duplicates_skipped.inc()

    def handled(self, consumer: str, event_type: str, outcome: str, seconds: float) -> None:
        """The consumer loop's :class:`bus.consumer.Observer` hook."""
        self.consumer_handled.labels(_label(consumer), _label(event_type), _label(outcome)).inc()
        self.handler_duration.labels(_label(consumer)).observe(max(0.0, seconds))

    # ------------------------------------------------------------------ serving
    def serve(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Serve ``/metrics`` over HTTP from a daemon thread; return the real port."""
        if self._server is not None:
            return self.port  # type: ignore[return-value]
        result = start_http_server(port, addr=host, registry=self.registry)
        server, thread = result if isinstance(result, tuple) else (result, None)
        self._server, self._thread = server, thread
        self.host = host
        self.port = server.server_address[1]
        return self.port

    @property
    def url(self) -> str | None:
        if self.port is None:
            return None
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
