"""``GET /v1/events``: the events of one trace as Server-Sent Events, replayed then followed.

One ephemeral push consumer per stream (no acks, in memory, flow control) reads the
events stream from the trace's first event (the gateway records where each trace it
started begins; for another trace, from ``events_replay_s`` ago), keeps the events whose
``ce-traceid`` header is the trace (and whose type is asked for), and goes on live. Each
SSE message is ``id: <stream sequence>``, ``event: <type>``, ``data: <the CloudEvent as
JSON>``; a client that reconnects with ``Last-Event-ID`` resumes after it. A comment line
every ``heartbeat_s`` keeps proxies from closing an idle stream. The stream ends when
the client goes away (the consumer is removed) or the gateway stops. Concurrent streams
are capped per process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from datetime import datetime, timedelta, timezone
from typing import AsyncIterator, Iterator

import msgspec
from nats.aio.client import Client
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from contracts.catalogue import CATALOGUE, subjects_for
from contracts.envelope import EnvelopeError, decode
from services.gateway.model import GatewayError

log = logging.getLogger("chora.gateway")


class StreamSlots:
    """At most ``limit`` concurrent event streams."""

    def __init__(self, limit: int):
        self.limit = limit
        self.open = 0

    def check(self) -> None:
        """503 TOO_MANY_STREAMS when every slot is taken (asked before the response starts)."""
        if self.open >= self.limit:
            raise GatewayError(
                503,
                "TOO_MANY_STREAMS",
                f"{self.limit} event streams are open; try again later",
                headers={"Retry-After": "5"},
            )

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """A slot for as long as a stream's body runs (taken inside the body, so a response
        that never started its body holds none)."""
        self.open += 1
        try:
            yield
        finally:
            self.open -= 1


def check_types(types: list[str]) -> list[str]:
    unknown = [t for t in types if t not in CATALOGUE]
    if unknown:
        raise GatewayError(422, "UNKNOWN_EVENT_TYPE", f"unknown event type(s): {', '.join(unknown[:5])}")
    return types


def sse_message(seq: int, event_type: str, doc: dict) -> bytes:
    data = json.dumps(doc, separators=(",", ":"), default=str)
    return f"id: {seq}\nevent: {event_type}\ndata: {data}\n\n".encode()


async def event_stream(
    nc: Client,
    stream: str,
    prefix: str,
    trace_id: str,
    types: list[str],
    *,
    start_seq: int | None,
    replay_s: float,
    max_event_bytes: int,
    heartbeat_s: float = 15.0,
    stopping: asyncio.Event | None = None,
) -> AsyncIterator[bytes]:
    """SSE messages of ``trace_id``'s events (of ``types``, or all), from ``start_seq`` (or
    ``replay_s`` ago) on, until cancelled or ``stopping`` is set."""
    subjects = [subject for t in (types or list(CATALOGUE)) for subject in subjects_for(t, prefix)]
    config = ConsumerConfig(
        ack_policy=AckPolicy.NONE,
        mem_storage=True,
        num_replicas=1,
        inactive_threshold=30.0,
        flow_control=True,
        idle_heartbeat=5.0,
    )
    if start_seq is not None:
        config.deliver_policy, config.opt_start_seq = DeliverPolicy.BY_START_SEQUENCE, max(1, start_seq)
    else:
        config.deliver_policy = DeliverPolicy.BY_START_TIME
        config.opt_start_time = (datetime.now(timezone.utc) - timedelta(seconds=replay_s)).isoformat()  # type: ignore[assignment]
    if len(subjects) > 1:
        config.filter_subjects = subjects
    js = nc.jetstream()
    sub = await js.subscribe(subjects[0], stream=stream, manual_ack=True, config=config, pending_msgs_limit=1024)
    try:
        yield b": events of trace " + trace_id.encode() + b"\n\n"
        while stopping is None or not stopping.is_set():
            try:
                msg = await sub.next_msg(timeout=heartbeat_s)
            except (NatsTimeout, asyncio.TimeoutError):
                yield b": keep-alive\n\n"
                continue
            if (msg.headers or {}).get("ce-traceid") != trace_id:
                continue
            try:
                ev = decode(msg.headers, msg.data, max_bytes=max_event_bytes)
            except EnvelopeError:
                continue
            doc = {
                "specversion": ev.specversion,
                "id": ev.id,
                "source": ev.source,
                "type": ev.type,
                "time": ev.time,
                "traceid": ev.traceid,
                "data": msgspec.to_builtins(ev.data),
            }
            yield sse_message(msg.metadata.sequence.stream, ev.type, doc)
    finally:
        try:
            await sub.unsubscribe()
        except Exception as e:  # the connection may be closing
            log.debug("event stream: unsubscribe: %s", e)
