"""Every service process's own ``/metrics``.

The runtime (:func:`services.runtime.run_service`) gives each process one
:class:`ServiceMetrics`: it is the consumer loops' observer, it holds the
process's build info and resource figures, it takes in an app's own registry
(the telemetry sink's event figures, the notifier's circuit breakers), and it
serves all of that on one HTTP port (``CHORA_METRICS_PORT``; 0 picks a free
one, a negative value serves nothing).

Which service a process is comes from the scrape target, as Prometheus
intends (a ``service`` target label: `chora up` writes it into the file_sd
targets it keeps up to date, deploy/prometheus/prometheus.yml derives it from
the compose DNS name), not from a label the process stamps on every series.

Series of every service process:

    chora_events_consumed_total{consumer,event_type,outcome}   messages settled by a consumer loop;
        outcome: ack (handled), retry (nak'd for a later delivery), dead (dead-lettered),
        skipped (a replay meant for another consumer), error (could not be settled)
    chora_events_published_total{consumer,event_type,status}   events published as a handler's outcome;
        status: success|error for events with a status, ok otherwise
    chora_handler_duration_seconds{consumer}                   decode, handle, publish and settle one message
    chora_build_info{version,python}                           always 1
    process_*                                                  CPU seconds, resident memory, open fds, start time

Label values come from small sets only: event types of the catalogue (anything
else is ``other``), consumer names of the topology, and at most
``MAX_LABEL_VALUES`` distinct values per label and metric.
"""

from __future__ import annotations

import importlib.metadata
import platform
import threading
from typing import Any, Iterable, Sequence
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, start_http_server
from prometheus_client.registry import Collector

from contracts.catalogue import CATALOGUE
from contracts.envelope import CloudEvent
from services.health import Health

HANDLER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)
OUTCOMES = ("ack", "retry", "dead", "skipped", "error")

_MAX_LABEL = 64
MAX_LABEL_VALUES = 100  # distinct values of one label of one metric; then "other"
OTHER = "other"


def label(value: Any, default: str = "unknown") -> str:
    """A label value: ``default`` for nothing, at most 64 characters."""
    if value is None or value == "":
        return default
    s = str(value)
    return s if len(s) <= _MAX_LABEL else s[:_MAX_LABEL]


def event_type_label(value: Any) -> str:
    """An event type of the catalogue, ``unknown`` when there is none, else ``other``:
    a type comes from whoever published, so it is never trusted as a label as is."""
    if value is None or value == "" or value == "unknown":
        return "unknown"
    return value if value in CATALOGUE else OTHER


class Bounded:
    """Keeps at most ``limit`` distinct values of one label; later newcomers become ``other``."""

    def __init__(self, limit: int = MAX_LABEL_VALUES):
        self.limit = limit
        self.seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: Any, default: str = "unknown") -> str:
        v = label(value, default)
        if v in self.seen:
            return v
        with self._lock:
            if v in self.seen or len(self.seen) < self.limit:
                self.seen.add(v)
                return v
        return OTHER


def build_version() -> str:
    try:
        return importlib.metadata.version("chora-compose")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class _Forward(Collector):
    """Another registry's series, collected at scrape time as if they were ours."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry

    def collect(self) -> Iterable[Any]:
        return self.registry.collect()


class MetricsServer:
    """``/metrics`` of one registry over HTTP, from a daemon thread."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self.host: str | None = None
        self.port: int | None = None

    def serve(self, host: str = "127.0.0.1", port: int = 0, health: "Health | None" = None) -> int:
        """Start serving; return the real port (``port`` 0 picks a free one). With ``health``,
        ``/healthz`` and ``/readyz`` are served too (see :mod:`services.health`)."""
        if self._server is not None and self.port is not None:
            return self.port
        result = start_http_server(port, addr=host, registry=self.registry)
        server, thread = result if isinstance(result, tuple) else (result, None)
        app = server.get_app()
        if health is not None and app is not None:
            server.set_app(health.wsgi(app))
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
        """Stop serving (blocks until the server thread is out of its poll loop)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self.port = None


class ServiceMetrics(MetricsServer):
    """One process's registry; also the consumer loops' :class:`bus.consumer.Observer`."""

    def __init__(self, registry: CollectorRegistry | None = None, *, process: bool = True):
        super().__init__(registry or CollectorRegistry(auto_describe=True))
        r = self.registry
        self.consumed_total = Counter(
            "chora_events_consumed",
            "Messages settled by a consumer loop, by event type and outcome.",
            ["consumer", "event_type", "outcome"],
            registry=r,
        )
        self.published_total = Counter(
            "chora_events_published",
            "Events published as the outcome of handling a message.",
            ["consumer", "event_type", "status"],
            registry=r,
        )
        self.handler_duration = Histogram(
            "chora_handler_duration_seconds",
            "Time to decode, handle, publish the outcome of and settle one message.",
            ["consumer"],
            buckets=HANDLER_BUCKETS,
            registry=r,
        )
        self.build_info = Gauge(
            "chora_build_info", "Always 1; the labels tell the build.", ["version", "python"], registry=r
        )
        self.build_info.labels(build_version(), platform.python_version()).set(1)
        if process:
            ProcessCollector(registry=r)  # process_cpu_seconds_total, process_resident_memory_bytes, ...
        self._consumer = Bounded()
        # the children of the hot path, by label tuple: .labels() costs more than .inc()
        self._consumed: dict[tuple[str, str, str], Any] = {}
        self._published: dict[tuple[str, str, str], Any] = {}
        self._durations: dict[str, Any] = {}
        self._handled: dict[tuple[str, str, str], tuple[Any, Any]] = {}
        self._published_raw: dict[tuple[str, str, Any], Any] = {}

    def include(self, registry: CollectorRegistry) -> None:
        """Serve ``registry``'s series from this endpoint too (an app's own metrics)."""
        self.registry.register(_Forward(registry))

    def consumer(self, name: str, event_types: Sequence[str] | None = ()) -> None:
        """Create a consumer's series at 0 (so that the first message of a kind is an
        increase that rate() sees, and ratios have a denominator from the start);
        ``event_types`` None: it consumes every type."""
        c = self._consumer(name)
        self._durations.setdefault(c, self.handler_duration.labels(c))
        for t in CATALOGUE if event_types is None else event_types:
            for outcome in ("ack", "retry", "dead"):
                self._child(self._consumed, self.consumed_total, (c, event_type_label(t), outcome))

    @staticmethod
    def _child(cache: dict, metric: Any, key: tuple[str, ...]) -> Any:
        child = cache.get(key)
        if child is None:
            child = cache[key] = metric.labels(*key)
        return child

    # ------------------------------------------------------------------ Observer
    def handled(self, consumer: str, event_type: str, outcome: str, seconds: float) -> None:
        # one dict look-up per message on the hot path: the (counter, histogram) children of
        # these raw values, labelled once (a raw value outside the bounded sets maps to "other")
        key = (consumer, event_type, outcome)
        children = self._handled.get(key)
        if children is None:
            c = self._consumer(consumer)
            counter = self._child(
                self._consumed, self.consumed_total, (c, event_type_label(event_type), label(outcome))
            )
            duration = self._durations.get(c)
            if duration is None:
                duration = self._durations[c] = self.handler_duration.labels(c)
            children = (counter, duration)
            if len(self._handled) < 4 * MAX_LABEL_VALUES:
                self._handled[key] = children
        children[0].inc()
        children[1].observe(seconds if seconds > 0.0 else 0.0)

    def published(self, consumer: str, events: Sequence[CloudEvent]) -> None:
        for ev in events:
            status = getattr(ev.data, "status", None)
            raw = (consumer, ev.type, status)
            child = self._published_raw.get(raw)
            if child is None:
                key = (self._consumer(consumer), event_type_label(ev.type), label(status, "ok"))
                child = self._child(self._published, self.published_total, key)
                if len(self._published_raw) < 4 * MAX_LABEL_VALUES:
                    self._published_raw[raw] = child
            child.inc()
