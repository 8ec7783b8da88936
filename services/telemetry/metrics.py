"""Prometheus metrics of the telemetry sink, in a registry of its own.

Labels only ever hold values from small, bounded sets (event types of the
catalogue, statuses, generator names, validation rule names, configured
subscription names, stream and consumer names): never an event id, a trace
id or a request id. Each label keeps at most ``MAX_LABEL_VALUES`` distinct
values per metric; later newcomers are counted under ``other``.

From events (each sink instance sees every one):

    chora_events_total{event_type,status}                 events mirrored (duplicates not counted)
    chora_generation_duration_seconds{generator}          content_generated duration_ms, successes only
    chora_generation_errors_total{code}                   content_generated with status error, by error code
    chora_validations_total{result}                       content_validated, result valid|invalid
    chora_validation_issues_total{rule,severity}          issues of content_validated
    chora_batch_size                                      histogram of batch_completed total
    chora_batch_duration_seconds                          histogram of batch_completed duration_ms
    chora_batch_items_total{outcome}                      batch items by outcome success|error|skipped
    chora_artifacts_assembled_total{status}               artifact_assembled by status
    chora_artifact_duration_seconds                       histogram of artifact_assembled duration_ms
    chora_webhook_deliveries_total{subscription,outcome}  notification_delivered (delivered) / _failed (failed)
    chora_webhook_delivery_duration_seconds{subscription} notification_delivered duration_ms
    chora_sink_lag_seconds                                line written minus the time the stream stored the message
    chora_sink_lines_written_total                        lines appended to the JSONL file
    chora_sink_duplicates_skipped_total                   messages at or below the sink's position, not written again
    chora_sink_malformed_total{code}                      messages that are not CloudEvents (a ``malformed`` line each)

Every sink instance reads the whole stream, so every instance counts every event: across
instances, take the ``max`` of per-instance sums, not their ``sum``. The figures are
recorded per written batch (:meth:`TelemetryMetrics.mirrored`), from the plain payloads
the sink mirrors: a status that is not one of the catalogue's is counted as ``other``.

The live state of the circuit breakers comes from the notifier process itself
(:mod:`services.notifier.metrics`), and the consumer loop's own figures from
every service process (:mod:`services.metrics`); the runtime serves this
registry on the telemetry process's ``/metrics`` together with those.

From JetStream (the last :class:`bus.monitor.JetStreamSnapshot`, polled by the app):

    chora_consumer_pending_messages{stream,consumer}      not yet delivered
    chora_consumer_ack_pending_messages{stream,consumer}  delivered, not acknowledged
    chora_consumer_redelivered_messages{stream,consumer}  redelivered, not acknowledged
    chora_consumer_waiting_pulls{stream,consumer}         pull requests waiting
    chora_stream_messages{stream} / chora_stream_bytes{stream}
    chora_dead_letters{stream}                            messages in the dead-letter stream
    chora_jetstream_memory_bytes, chora_jetstream_storage_bytes,
    chora_jetstream_streams, chora_jetstream_consumers    the account's JetStream usage
    chora_jetstream_monitor_up                            1 if the last poll succeeded
    chora_jetstream_monitor_errors_total                  failed polls
    chora_jetstream_monitor_last_success_timestamp_seconds

From each nats-server's /varz (when CHORA_NATS_MONITOR_URL is set), labelled by the
host:port of its monitoring URL:

    chora_nats_server_up{server}                          1 if /varz answered at the last poll
    chora_nats_server_connections, _subscriptions, _routes, _memory_bytes, _cpu_percent{server}
    chora_nats_server_messages_received_total, _messages_sent_total,
    chora_nats_server_received_bytes_total, _sent_bytes_total, _slow_consumers_total{server}
"""

from __future__ import annotations

from bisect import bisect_left
from datetime import datetime
from typing import Any, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from bus.monitor import JetStreamSnapshot, ServerFigures
from contracts.catalogue import (
    ARTIFACT_ASSEMBLED,
    CATALOGUE,
    BATCH_COMPLETED,
    CONTENT_GENERATED,
    CONTENT_VALIDATED,
    NOTIFICATION_DELIVERED,
    NOTIFICATION_FAILED,
)
from services.metrics import Bounded as _Bounded
from services.metrics import event_type_label
from services.metrics import label as _label

GENERATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0)
BATCH_SIZE_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 25000, 100000)
BATCH_DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
WEBHOOK_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_OUTCOME = {"successful": "success", "failed": "error", "skipped": "skipped"}
_DETAILED = frozenset(
    (
        CONTENT_GENERATED,
        CONTENT_VALIDATED,
        BATCH_COMPLETED,
        ARTIFACT_ASSEMBLED,
        NOTIFICATION_DELIVERED,
        NOTIFICATION_FAILED,
    )
)
# Statuses an event can carry (contracts.events Status and RunStatus); anything else is "other":
# the sink reads payloads without their Struct, so a label never takes a value as it comes.
_STATUSES = frozenset(("success", "error", "cancelled", "timed_out"))


def _status(value: Any) -> str:
    if value is None:
        return "ok"
    return value if isinstance(value, str) and value in _STATUSES else "other"


def observe_all(hist: Any, values: list[float]) -> None:
    """Observe every one of ``values`` in ``hist`` (a histogram without labels, or one labelled
    child) with one increment per bucket and one of the sum. prometheus_client has no bulk
    observe, so this uses its buckets' values (``_buckets``, ``_upper_bounds``, ``_sum``, there
    since 0.4); without them, one ``observe`` per value."""
    buckets = getattr(hist, "_buckets", None)
    bounds = getattr(hist, "_upper_bounds", None)
    total = getattr(hist, "_sum", None)
    if buckets is None or bounds is None or total is None or len(buckets) != len(bounds):
        for v in values:
            hist.observe(v)
        return
    counts = [0] * len(bounds)
    for v in values:
        counts[bisect_left(bounds, v)] += 1  # the first bucket whose bound is >= v, as observe()
    for i, n in enumerate(counts):
        if n:
            buckets[i].inc(n)
    total.inc(sum(values))


def _seconds(ms: Any) -> float | None:
    if isinstance(ms, bool) or not isinstance(ms, (int, float)) or not ms >= 0:
        return None
    return ms / 1000.0


def event_timestamp(value: str | None) -> float | None:
    """Seconds since the epoch of an RFC3339 time, or None if absent or unreadable."""
    if not value:
        return None
    try:
        return datetime.fromisoformat(value).timestamp()
    except (ValueError, TypeError):
        return None


class JetStreamCollector(Collector):
    """Renders the last JetStream snapshot at scrape time (a consumer that is
    gone from the server is gone from the metrics too)."""

    def __init__(self) -> None:
        self.snapshot: JetStreamSnapshot | None = None
        self.servers: list[ServerFigures] = []

    def describe(self) -> Iterable[Any]:
        return []

    def collect(self) -> Iterable[Any]:
        yield from self._servers(self.servers)
        snap = self.snapshot
        if snap is None:
            return
        pending = GaugeMetricFamily(
            "chora_consumer_pending_messages",
            "Messages of the stream not yet delivered to the consumer.",
            labels=["stream", "consumer"],
        )
        ack_pending = GaugeMetricFamily(
            "chora_consumer_ack_pending_messages",
            "Messages delivered to the consumer and not yet acknowledged.",
            labels=["stream", "consumer"],
        )
        redelivered = GaugeMetricFamily(
            "chora_consumer_redelivered_messages",
            "Messages redelivered to the consumer and not yet acknowledged.",
            labels=["stream", "consumer"],
        )
        waiting = GaugeMetricFamily(
            "chora_consumer_waiting_pulls",
            "Pull requests of the consumer waiting on the server.",
            labels=["stream", "consumer"],
        )
        for c in snap.consumers:
            labels = [_label(c.stream), _label(c.consumer)]
            pending.add_metric(labels, c.pending)
            ack_pending.add_metric(labels, c.ack_pending)
            redelivered.add_metric(labels, c.redelivered)
            waiting.add_metric(labels, c.waiting)
        messages = GaugeMetricFamily("chora_stream_messages", "Messages stored in the stream.", labels=["stream"])
        size = GaugeMetricFamily("chora_stream_bytes", "Bytes stored in the stream.", labels=["stream"])
        for s in snap.streams:
            messages.add_metric([_label(s.stream)], s.messages)
            size.add_metric([_label(s.stream)], s.bytes)
        yield from (pending, ack_pending, redelivered, waiting, messages, size)
        if snap.dead_letters is not None:
            dl = GaugeMetricFamily("chora_dead_letters", "Messages in the dead-letter stream.", labels=["stream"])
            dl.add_metric([_label(snap.dlq_stream)], snap.dead_letters)
            yield dl
        if snap.account is not None:
            a = snap.account
            for name, doc, value in (
                ("chora_jetstream_memory_bytes", "JetStream memory storage used by the account.", a.memory_bytes),
                ("chora_jetstream_storage_bytes", "JetStream file storage used by the account.", a.storage_bytes),
                ("chora_jetstream_streams", "Streams of the account.", a.streams),
                ("chora_jetstream_consumers", "Consumers of the account.", a.consumers),
            ):
                yield GaugeMetricFamily(name, doc, value=value)

    @staticmethod
    def _servers(servers: list[ServerFigures]) -> Iterable[Any]:
        if not servers:
            return
        gauges = {
            "up": GaugeMetricFamily(
                "chora_nats_server_up", "1 if the server's /varz answered at the last poll.", labels=["server"]
            ),
            "connections": GaugeMetricFamily("chora_nats_server_connections", "Client connections.", labels=["server"]),
            "subscriptions": GaugeMetricFamily("chora_nats_server_subscriptions", "Subscriptions.", labels=["server"]),
            "routes": GaugeMetricFamily("chora_nats_server_routes", "Cluster routes.", labels=["server"]),
            "memory_bytes": GaugeMetricFamily(
                "chora_nats_server_memory_bytes", "Resident memory of the server.", labels=["server"]
            ),
            "cpu_percent": GaugeMetricFamily(
                "chora_nats_server_cpu_percent", "CPU use of the server (100 = one core).", labels=["server"]
            ),
        }
        counters = {
            "in_msgs": CounterMetricFamily(
                "chora_nats_server_messages_received", "Messages the server received.", labels=["server"]
            ),
            "out_msgs": CounterMetricFamily(
                "chora_nats_server_messages_sent", "Messages the server sent.", labels=["server"]
            ),
            "in_bytes": CounterMetricFamily(
                "chora_nats_server_received_bytes", "Bytes the server received.", labels=["server"]
            ),
            "out_bytes": CounterMetricFamily(
                "chora_nats_server_sent_bytes", "Bytes the server sent.", labels=["server"]
            ),
            "slow_consumers": CounterMetricFamily(
                "chora_nats_server_slow_consumers",
                "Clients the server cut off for not reading fast enough.",
                labels=["server"],
            ),
        }
        for s in servers:
            labels = [_label(s.server)]
            gauges["up"].add_metric(labels, 1.0 if s.up else 0.0)
            if not s.up:
                continue  # no figures rather than zeros: a rate over a dead server's counters stays honest
            for key, fam in gauges.items():
                if key != "up":
                    fam.add_metric(labels, getattr(s, key))
            for key, counter in counters.items():
                counter.add_metric(labels, getattr(s, key))
        yield from gauges.values()
        yield from counters.values()


class TelemetryMetrics:
    """The sink's metrics, in a registry of their own (``registry``)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.events = Counter(
            "chora_events_total", "Events mirrored by the telemetry sink.", ["event_type", "status"], registry=r
        )
        self.generation_duration = Histogram(
            "chora_generation_duration_seconds",
            "Duration of successful generations (content_generated duration_ms).",
            ["generator"],
            buckets=GENERATION_BUCKETS,
            registry=r,
        )
        self.sink_lag = Histogram(
            "chora_sink_lag_seconds",
            "Time from an event's time to its line being written.",
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.lines_written = Counter(
            "chora_sink_lines_written", "Lines appended to the telemetry JSONL file.", registry=r
        )
        self.duplicates_skipped = Counter(
            "chora_sink_duplicates_skipped",
            "Stream messages not written again because their sequence was already written.",
            registry=r,
        )
        self.malformed_lines = Counter(
            "chora_sink_malformed",
            "Stream messages that are not CloudEvents, mirrored as malformed lines, by error code.",
            ["code"],
            registry=r,
        )
        self.generation_errors = Counter(
            "chora_generation_errors",
            "content_generated events with status error, by error code.",
            ["code"],
            registry=r,
        )
        self.validations = Counter(
            "chora_validations", "content_validated events by result (valid or invalid).", ["result"], registry=r
        )
        self.validation_issues = Counter(
            "chora_validation_issues", "Issues reported by content_validated events.", ["rule", "severity"], registry=r
        )
        self.batch_size = Histogram(
            "chora_batch_size",
            "Items per completed batch (batch_completed total).",
            buckets=BATCH_SIZE_BUCKETS,
            registry=r,
        )
        self.batch_duration = Histogram(
            "chora_batch_duration_seconds",
            "Duration of completed batches (batch_completed duration_ms).",
            buckets=BATCH_DURATION_BUCKETS,
            registry=r,
        )
        self.batch_items = Counter(
            "chora_batch_items", "Items of completed batches by outcome.", ["outcome"], registry=r
        )
        self.artifacts = Counter(
            "chora_artifacts_assembled", "artifact_assembled events by status.", ["status"], registry=r
        )
        self.artifact_duration = Histogram(
            "chora_artifact_duration_seconds",
            "Duration of artifact assembly (artifact_assembled duration_ms).",
            buckets=BATCH_DURATION_BUCKETS,
            registry=r,
        )
        self.webhook_deliveries = Counter(
            "chora_webhook_deliveries",
            "Webhook notifications by subscription and outcome (delivered or failed).",
            ["subscription", "outcome"],
            registry=r,
        )
        self.webhook_duration = Histogram(
            "chora_webhook_delivery_duration_seconds",
            "Duration of the successful webhook call.",
            ["subscription"],
            buckets=WEBHOOK_BUCKETS,
            registry=r,
        )
        self.monitor_up = Gauge(
            "chora_jetstream_monitor_up", "1 if the last poll of the JetStream figures succeeded, else 0.", registry=r
        )
        self.monitor_errors = Counter(
            "chora_jetstream_monitor_errors", "Polls of the JetStream figures that failed.", registry=r
        )
        self.monitor_last_success = Gauge(
            "chora_jetstream_monitor_last_success_timestamp_seconds",
            "When the JetStream figures were last read.",
            registry=r,
        )
        self._zero_known_series()
        self.jetstream = JetStreamCollector()
        r.register(self.jetstream)
        self._subscription = _Bounded()
        self._generator = _Bounded()
        self._code = _Bounded()
        self._rule = _Bounded()

    def _zero_known_series(self) -> None:
        """Create the series of closed label sets at 0, so that the first event of a kind is
        an increase that rate() sees, and ratios have a denominator from the start."""
        for event_type, spec in CATALOGUE.items():
            fields = getattr(spec.struct, "__struct_fields__", ())
            statuses = ("success", "error") if "status" in fields else ("ok",)
            for status in statuses:
                self.events.labels(event_type, status)
        for result in ("valid", "invalid"):
            self.validations.labels(result)
        for status in ("success", "error"):
            self.artifacts.labels(status)
        for outcome in _BATCH_OUTCOME.values():
            self.batch_items.labels(outcome)

    # ------------------------------------------------------------------ recording
    def mirrored(self, records: Iterable[tuple[str | None, Any, int]], written_at: float) -> None:
        """A batch of lines was written: ``(event type, plain payload, stored at ns)`` per line.
        Counters get one increment per label set of the batch, histograms one per bucket (the
        lag: write time minus the time the stream stored the message)."""
        counts: dict[tuple[str | None, str], int] = {}
        lags: list[float] = []
        durations: dict[str, list[float]] = {}
        for kind, data, stored_ns in records:
            plain = isinstance(data, dict)
            status = _status(data.get("status") if plain else None)
            key = (kind, status)
            counts[key] = counts.get(key, 0) + 1
            lag = written_at - stored_ns * 1e-9
            lags.append(lag if lag > 0.0 else 0.0)
            if not plain or kind not in _DETAILED:
                continue
            if kind == CONTENT_GENERATED and status == "success":
                s = _seconds(data.get("duration_ms"))
                if s is not None:
                    durations.setdefault(self._generator(data.get("generator_type")), []).append(s)
            else:
                self._detail(kind, data, status)
        for (kind, st), n in counts.items():
            self.events.labels(event_type_label(kind), st).inc(n)
        self.lines_written.inc(len(lags))
        observe_all(self.sink_lag, lags)
        for generator, values in durations.items():
            observe_all(self.generation_duration.labels(generator), values)

    def malformed(self, code: str) -> None:
        """A message that is not a CloudEvent got its ``malformed`` line."""
        self.malformed_lines.labels(self._code(code)).inc()
        self.lines_written.inc()

    def _detail(self, kind: str, data: dict[str, Any], status: Any) -> None:
        """The figures of the event types that carry more than a status."""
        if kind == CONTENT_GENERATED:  # successes are counted by mirrored()
            if status == "error":
                err = data.get("error")
                self.generation_errors.labels(self._code(err.get("code") if isinstance(err, dict) else None)).inc()
        elif kind == CONTENT_VALIDATED:
            self.validations.labels("valid" if data.get("valid") is True else "invalid").inc()
            issues = data.get("issues")
            for issue in issues if isinstance(issues, list) else ():
                if isinstance(issue, dict):
                    severity = issue.get("severity")
                    self.validation_issues.labels(
                        self._rule(issue.get("rule")), severity if severity in ("error", "warning") else "other"
                    ).inc()
        elif kind == BATCH_COMPLETED:
            total = data.get("total")
            if isinstance(total, int) and not isinstance(total, bool) and total >= 0:
                self.batch_size.observe(total)
            s = _seconds(data.get("duration_ms"))
            if s is not None:
                self.batch_duration.observe(s)
            for outcome in ("successful", "failed", "skipped"):
                n = data.get(outcome)
                if isinstance(n, int) and not isinstance(n, bool) and n > 0:
                    self.batch_items.labels(_BATCH_OUTCOME[outcome]).inc(n)
        elif kind == ARTIFACT_ASSEMBLED:
            self.artifacts.labels(_status(status)).inc()
            s = _seconds(data.get("duration_ms"))
            if s is not None:
                self.artifact_duration.observe(s)
        elif kind == NOTIFICATION_DELIVERED:
            sub = self._subscription(data.get("subscription"))
            self.webhook_deliveries.labels(sub, "delivered").inc()
            s = _seconds(data.get("duration_ms"))
            if s is not None:
                self.webhook_duration.labels(sub).observe(s)
        elif kind == NOTIFICATION_FAILED:
            self.webhook_deliveries.labels(self._subscription(data.get("subscription")), "failed").inc()

    # ------------------------------------------------------------------ JetStream
    def jetstream_polled(self, snapshot: JetStreamSnapshot) -> None:
        """A successful poll of :class:`bus.monitor.JetStreamMonitor`."""
        self.jetstream.snapshot = snapshot
        self.jetstream.servers = list(snapshot.servers)
        self.monitor_up.set(1)
        self.monitor_last_success.set(snapshot.taken_at)

    def jetstream_failed(self, servers: list[ServerFigures] | None = None) -> None:
        """A failed poll: the last JetStream figures stay, marked stale by
        ``chora_jetstream_monitor_up 0``; the servers' figures read meanwhile replace theirs."""
        self.monitor_errors.inc()
        self.monitor_up.set(0)
        if servers is not None:
            self.jetstream.servers = list(servers)
