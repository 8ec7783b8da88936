"""From a stream message to its JSONL line and its metrics: what :mod:`bus.mirror` feeds.

:class:`TelemetryMirror` is the sink's side of :class:`bus.mirror.MirrorTarget`; it
never touches NATS (it gets plain values: sequence, subject, headers, body).

- A message is decoded without its payload Struct (``decode(typed=False)``): the sink
  copies what it reads, whatever the payload's version, so it checks only the envelope.
  Large content travelling by reference is not fetched: the line keeps ``content_ref``
  next to the ``content_hash`` and ``content_length`` its producer set.
- A message that is not a CloudEvent (a malformed or hostile publish) does not stop the
  mirror: it gets a line of its own (``status: "malformed"``, ``error_code``,
  ``error_message``, never its body), an error in the log and
  ``chora_sink_malformed_total{code}``; the next message follows at once. The other
  consumers of its subject still dead-letter it; the sink has nothing to settle.
- A dead letter replayed for another consumer (header ``Chora-Replay-For``) is a copy of a
  message the sink mirrored already: it is skipped (counted in ``skipped``).
- Metrics are counted per batch: :meth:`flush` writes the lines, then hands the batch's
  records to :meth:`TelemetryMetrics.mirrored` (a few label lookups per batch, not per
  event).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

from bus.deadletter import H_REPLAY_FOR
import msgspec

from contracts.envelope import JSON, SPECVERSION, CloudEvent, EnvelopeError, decode
from services.telemetry.lines import MALFORMED, encode_malformed_line, encode_seq_line
from services.telemetry.metrics import TelemetryMetrics
from services.telemetry.sink import JsonlSink

log = logging.getLogger("chora.telemetry")

DEFAULT_MAX_EVENT_BYTES = 1 << 20


_CHORA_HEADERS = frozenset(
    ("ce-specversion", "ce-id", "ce-source", "ce-type", "ce-time", "ce-datacontenttype", "ce-subject")
    + ("ce-traceid", "ce-traceparent", "Nats-Msg-Id")
)


def _as_chora_wrote_it(headers: dict[str, str] | None, body: bytes) -> CloudEvent | None:
    """The event of a message in exactly the binary form chora publishes (contracts.envelope
    encode_binary: these lower-case ce-* headers and Nats-Msg-Id, no percent-encoding, JSON
    data), without the general decoder's per-header work; None for anything else, which
    :func:`contracts.envelope.decode` then reads (and judges)."""
    if headers is None or not _CHORA_HEADERS.issuperset(headers):
        return None
    get = headers.get
    eid, source, etype = get("ce-id"), get("ce-source"), get("ce-type")
    if not eid or not source or not etype or get("ce-specversion") != SPECVERSION:
        return None
    subject, traceid = get("ce-subject"), get("ce-traceid")
    if "%" in eid or "%" in source or "%" in etype or (subject and "%" in subject) or (traceid and "%" in traceid):
        return None
    ct = get("ce-datacontenttype")
    if ct is not None and ct != JSON:
        return None
    try:
        data = msgspec.json.decode(body) if body else None
    except msgspec.DecodeError as e:
        raise EnvelopeError("INVALID_JSON", f"data is not valid JSON: {e}") from None
    return CloudEvent(
        id=eid,
        source=source,
        type=etype,
        data=data,
        time=get("ce-time"),
        datacontenttype=ct,
        subject=subject,
        traceid=traceid,
        traceparent=get("ce-traceparent"),
    )


class Stamp:
    """RFC3339 UTC timestamps with microseconds, formatted at most once per millisecond (a
    batch of lines read together shares it) and the date part once per second."""

    def __init__(self, clock: Callable[[], float] = time.time):
        self.clock = clock
        self._sec = -1
        self._prefix = ""
        self._until = 0.0
        self._last = ""

    def __call__(self) -> str:
        ts = self.clock()
        if ts < self._until and ts >= self._until - 0.001:
            return self._last
        sec = int(ts)
        if sec != self._sec:
            self._sec = sec
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        self._until = ts + 0.001
        self._last = f"{self._prefix}.{int((ts - sec) * 1e6):06d}Z"
        return self._last


class TelemetryMirror:
    """Turns stream messages into lines of ``sink`` and counts them in ``metrics``."""

    def __init__(
        self,
        sink: JsonlSink,
        metrics: TelemetryMetrics,
        *,
        consumer: str = "telemetry",
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
        clock: Callable[[], float] = time.time,
    ):
        self.sink = sink
        self.metrics = metrics
        self.consumer = consumer
        self.max_event_bytes = max_event_bytes
        self.clock = clock
        self._stamp = Stamp(clock)
        self._records: list[tuple[str | None, Any, int]] = []  # (type, data, stored ns) of the batch
        self._records_last = 0  # the stream sequence of the last of them
        self.skipped = 0
        self.malformed = 0

    # ------------------------------------------------------------------ MirrorTarget
    def position(self) -> int:
        return self.sink.position()

    def start_time(self) -> float | None:
        return self.sink.start_time()

    def accept(self, seq: int, subject: str, headers: dict[str, str] | None, data: bytes, stored_ns: int) -> None:
        try:
            event = _as_chora_wrote_it(headers, data) if len(data) <= self.max_event_bytes else None
            if event is None:
                event = decode(headers, data, max_bytes=self.max_event_bytes, typed=False)
        except EnvelopeError as e:
            self._malformed(seq, subject, headers, e)
            return
        if headers is not None:
            replay_for = headers.get(H_REPLAY_FOR)
            if replay_for is not None and replay_for != self.consumer:
                self.skipped += 1
                return
        if self.sink.add(
            seq, encode_seq_line(seq, event, self._stamp(), self.sink.redact_keys, self.sink.keep_context)
        ):
            self._records.append((event.type, event.data, stored_ns))
            self._records_last = seq

    async def flush(self) -> None:
        records, self._records = self._records, []
        last = self._records_last
        try:
            await self.sink.flush()
        except Exception:
            self._records = []  # the lines are read again, and counted then
            raise
        # counted once written (a failed flush running at the same time may have dropped them)
        if records and self.sink.written_seq >= last:
            self.metrics.mirrored(records, self.clock())

    # ------------------------------------------------------------------ bad input
    def _malformed(self, seq: int, subject: str, headers: dict[str, str] | None, e: EnvelopeError) -> None:
        self.malformed += 1
        attrs = {}
        for k, v in (headers or {}).items():
            lk = k.lower()
            if lk in ("ce-id", "ce-type", "ce-source"):
                attrs[lk[3:]] = v[:200]
        log.error(
            "telemetry: stream sequence %d on %s is not a valid CloudEvent (%s): mirrored as a %s line",
            seq,
            subject,
            e,
            MALFORMED,
        )
        if self.sink.add(seq, encode_malformed_line(seq, self._stamp(), dict(attrs), e.code, e.message, subject)):
            self.metrics.malformed(e.code)
