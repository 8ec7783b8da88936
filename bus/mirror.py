"""Reading a whole stream fast, without acks: the mirror reader.

A single ordered writer (the telemetry sink) needs no per-message acks: it keeps
its position in its own output, the stream sequence of the last message it wrote,
and asks the server for what follows. :class:`StreamMirror` reads with an
ephemeral push consumer of its own (one per process, so every instance reads the
whole stream): ``AckPolicy.NONE``, flow control, idle heartbeats, in memory, one
replica, starting at ``target.position() + 1`` (or at ``target.start_time()``, or
at the stream's first message). It subscribes on a plain inbox and handles the
JetStream control messages itself, so nothing but a sequence check runs per
message before the target sees it:

- a flow-control request is answered when the callback reaches it, i.e. once
  every message before it was handed to the target (the server stalls the
  consumer until then, which bounds what waits in the client);
- an idle heartbeat proves the consumer is alive; one whose
  ``Nats-Last-Consumer`` is past the last delivery means deliveries were lost
  (a reconnect, the client's pending limits), and a ``Nats-Consumer-Stalled``
  reply is answered;
- no message and no heartbeat for three heartbeat intervals (the consumer is gone:
  a server restart, a leader change), a gap in the consumer sequence, a
  reconnect or a failed write: the consumer is replaced by a new one starting
  after ``target.position()``. Messages at or below the position (an overlap
  after a replacement) are skipped, so the target gets each stream sequence at
  most once, in order.

The target is plain (no NATS): ``accept(seq, subject, headers, data, stored_ns)``
takes one message synchronously (it buffers), ``flush()`` writes what it buffered.
The reader calls ``flush()`` whenever the subscription's queue runs dry (the
callback does not yield while messages wait, so a batch is whatever arrived
together) and inline when ``max_buffered`` messages wait. A ``flush()`` that
raises is logged; the target must then drop what it buffered and report its last
*written* position, and the reader starts again from there after ``retry_s``.

Direct delivery: nats-py turns every message into a header dict, a ``Msg`` and an item
of the subscription's queue, served by a task and a coroutine per message; for a reader
whose whole job is per-message work that is most of the cost (the header parsing alone
was a sixth of the sink's CPU). So the reader's subscription is served in the
connection's read loop itself: :func:`bus.wire.direct_deliveries` wraps the connection's
``_process_msg`` (nats-py's internal dispatch: the one private name used here, checked
against the installed nats-py's signature, else the reader falls back to an ordinary
subscription callback) so that the reader's own subscription ids get the raw message,
and :func:`parse_headers` reads its header block with one decode and one split. Every
other subscription of the connection goes through nats-py as before. Processing in the
read loop also bounds memory: nothing queues up in the client; the server's flow control
and TCP hold the rest.

A stream sequence missing on the way (the stream dropped old messages by its
limits while the reader was away, or a message was deleted) is counted in
``stats.missing`` and logged; nothing else can be done about it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Protocol

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext

from bus.wire import direct_deliveries, parse_headers, seq_of
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

log = logging.getLogger("chora.bus")

_ACK_PREFIX = "$JS.ACK."


class MirrorTarget(Protocol):
    def position(self) -> int:
        """The stream sequence of the last message accepted (0: none)."""
        ...

    def start_time(self) -> float | None:
        """With no position: read from the messages stored since this POSIX time (None: all)."""
        ...

    def accept(self, seq: int, subject: str, headers: dict[str, str] | None, data: bytes, stored_ns: int) -> None:
        """One message, in stream order, never at or below ``position()``."""
        ...

    async def flush(self) -> None:
        """Write what was accepted; on failure raise, and fall back to the last written position."""
        ...


@dataclass
class MirrorStats:
    received: int = 0  # messages handed to the target
    skipped: int = 0  # at or below the target's position (an overlap after a replacement)
    missing: int = 0  # stream sequences the stream no longer had
    resets: int = 0  # consumers replaced (gap, silence, reconnect, failed write)
    flushes: int = 0
    flush_errors: int = 0


class StreamMirror:
    """Reads ``stream`` into ``target`` from after ``target.position()`` until :meth:`stop`."""

    def __init__(
        self,
        nc: Client,
        js: JetStreamContext,
        stream: str,
        target: MirrorTarget,
        *,
        name: str = "mirror",
        heartbeat_s: float = 2.0,
        max_buffered: int = 8192,
        retry_s: float = 1.0,
        pending_msgs_limit: int = 65536,
        pending_bytes_limit: int = 64 << 20,
        direct: bool = True,
    ):
        self.nc, self.js, self.stream, self.target, self.name = nc, js, stream, target, name
        self.heartbeat_s = heartbeat_s
        self.max_buffered = max_buffered
        self.retry_s = retry_s
        self.pending_msgs_limit = pending_msgs_limit
        self.pending_bytes_limit = pending_bytes_limit
        self.direct = direct
        self.stats = MirrorStats()
        self._sub: Subscription | None = None
        self._consumer: str | None = None
        self._gen = 0  # the current subscription; messages of an older one are dropped
        self._next_cseq = 1
        self._expect_sseq = 0  # the stream sequence expected next (0: unknown)
        self._buffered = 0
        self._last_seen = 0.0
        self._dirty = asyncio.Event()
        self._reset_wanted: str | None = None
        self._retry_at = 0.0
        self._wake = asyncio.Event()
        self._stopping = False
        self._flusher: asyncio.Task | None = None

    # ------------------------------------------------------------------ lifecycle
    async def run(self) -> None:
        """Read until :meth:`stop`. Never raises for a bad message or a lost consumer."""
        self._flusher = asyncio.create_task(self._flush_loop(), name=f"{self.name}-flush")
        reconnects = self.nc.stats.get("reconnects", 0)
        try:
            while not self._stopping:
                if self.nc.stats.get("reconnects", 0) != reconnects:
                    reconnects = self.nc.stats.get("reconnects", 0)
                    self._want_reset("reconnected")
                now = time.monotonic()
                if self._sub is not None and now - self._last_seen > 3 * self.heartbeat_s:
                    self._want_reset(f"no message nor heartbeat for {now - self._last_seen:.1f}s")
                if (self._sub is None or self._reset_wanted) and now >= self._retry_at and self.nc.is_connected:
                    await self._subscribe()
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), self.heartbeat_s / 2)
                except asyncio.TimeoutError:
                    pass
        finally:
            self._stopping = True
            await self._unsubscribe()
            if self._flusher is not None:
                self._dirty.set()
                await self._flusher
                self._flusher = None
            await self._flush()  # what the last deliveries left

    async def stop(self) -> None:
        """Stop reading; what was accepted is flushed before :meth:`run` returns."""
        self._stopping = True
        self._wake.set()
        self._dirty.set()

    @property
    def bound(self) -> bool:
        """Reading: subscribed and connected, with a message or heartbeat within three intervals
        (readiness reads it from another thread: plain attributes only)."""
        return (
            self._sub is not None
            and not self._stopping
            and self.nc.is_connected
            and time.monotonic() - self._last_seen < 3 * self.heartbeat_s
        )

    # ------------------------------------------------------------------ the consumer
    def _want_reset(self, why: str) -> None:
        if self._reset_wanted is None:
            log.info("%s: replacing the stream reader after %d: %s", self.name, self.target.position(), why)
            self._reset_wanted = why
        self._wake.set()

    async def _subscribe(self) -> None:
        await self._unsubscribe()
        self._reset_wanted = None
        self._gen += 1
        gen = self._gen
        inbox = self.nc.new_inbox()

        async def on_msg(msg: Msg) -> None:
            if gen == self._gen:
                await self._on_msg(msg)

        direct = direct_deliveries(self.nc) if self.direct else None

        async def on_raw(subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> None:
            if gen == self._gen:
                await self._on_raw(subject, reply, data, headers)

        try:
            sub = await self.nc.subscribe(
                inbox,
                cb=on_msg,
                pending_msgs_limit=self.pending_msgs_limit,
                pending_bytes_limit=self.pending_bytes_limit,
            )
            if direct is not None:
                direct[sub._id] = on_raw
        except Exception as e:
            self._failed(f"cannot subscribe: {e}")
            return
        pos = self.target.position()
        await self._check_position(pos)
        cfg = ConsumerConfig(
            deliver_subject=inbox,
            ack_policy=AckPolicy.NONE,
            max_deliver=1,
            flow_control=True,
            idle_heartbeat=self.heartbeat_s,
            mem_storage=True,
            num_replicas=1,
            inactive_threshold=max(5.0, 5 * self.heartbeat_s),
            description=f"{self.name}: reads the stream without acks",
        )
        if pos > 0:
            cfg.deliver_policy, cfg.opt_start_seq = DeliverPolicy.BY_START_SEQUENCE, pos + 1
        elif (since := self.target.start_time()) is not None:
            cfg.deliver_policy = DeliverPolicy.BY_START_TIME
            cfg.opt_start_time = datetime.fromtimestamp(since, timezone.utc)
        else:
            cfg.deliver_policy = DeliverPolicy.ALL
        self._sub, self._next_cseq, self._expect_sseq = sub, 1, (pos + 1 if pos > 0 else 0)
        self._last_seen = time.monotonic()
        try:
            info = await self.js.add_consumer(self.stream, cfg)
        except Exception as e:
            self._failed(f"cannot create its consumer: {e}")
            await self._unsubscribe()
            return
        self._consumer = info.name
        self.stats.resets += 1
        log.info("%s: reading %s after sequence %d (consumer %s)", self.name, self.stream, pos, info.name)

    async def _check_position(self, pos: int) -> None:
        """Say so when the stream ends below the position: it was recreated or purged, and the
        reader would wait for sequences that the new stream reaches only later (its first
        messages are not mirrored). Nothing is decided here: an operator moves the files away."""
        if pos <= 0:
            return
        try:
            last = (await self.js.stream_info(self.stream)).state.last_seq
        except Exception as e:  # not allowed or not reachable: the reading itself will tell
            log.debug("%s: stream info: %s", self.name, e)
            return
        if last < pos:
            log.error(
                "%s: %s ends at sequence %d, below this reader's position %d: was the stream recreated or "
                "purged? Messages up to %d will not be read; move the output away to start from the stream's "
                "beginning",
                self.name,
                self.stream,
                last,
                pos,
                pos,
            )

    def _failed(self, why: str) -> None:
        log.warning("%s: %s; retrying in %.1fs", self.name, why, self.retry_s)
        self._retry_at = time.monotonic() + self.retry_s

    async def _unsubscribe(self) -> None:
        sub, self._sub = self._sub, None
        # The consumer is not deleted (a least-privilege user may not): ephemeral, it goes by
        # itself once nobody listens on its inbox for inactive_threshold.
        self._consumer = None
        self._gen += 1
        if sub is not None:
            direct = getattr(self.nc, "_chora_direct", None)
            if direct is not None:
                direct.pop(sub._id, None)
            try:
                await sub.unsubscribe()
            except Exception as e:  # connection closed or reconnecting: the server drops it anyway
                log.debug("%s: unsubscribe: %s", self.name, e)

    # ------------------------------------------------------------------ messages
    async def _on_msg(self, msg: Msg) -> None:
        """A delivery through nats-py's subscription callback (no direct delivery)."""
        self._last_seen = time.monotonic()
        reply = msg.reply
        if reply and reply.startswith(_ACK_PREFIX):
            await self._on_data(reply, msg.subject, msg.headers, msg.data)
            return
        headers = msg.headers or {}
        await self._on_control(headers.get("Status"), headers, reply)

    async def _on_raw(self, subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> None:
        """A delivery straight from the read loop (see the module docstring)."""
        self._last_seen = time.monotonic()
        status, hdrs = parse_headers(headers) if headers else (None, {})
        r = reply.decode()
        if r.startswith(_ACK_PREFIX):
            await self._on_data(r, subject.decode(), hdrs or None, data)
            return
        await self._on_control(status, hdrs, r)

    async def _on_data(self, reply: str, subject: str, headers: dict[str, str] | None, data: bytes) -> None:
        try:
            sseq, cseq, stored = seq_of(reply)
        except ValueError:
            log.error("%s: a delivery with an unreadable reply subject %r: ignored", self.name, reply[:200])
            return
        if cseq != self._next_cseq:
            self._want_reset(f"consumer sequence {cseq}, expected {self._next_cseq}: deliveries were lost")
            self._gen += 1  # drop the rest of this subscription's deliveries
            return
        self._next_cseq = cseq + 1
        target = self.target
        if sseq <= target.position():
            self.stats.skipped += 1
            return
        if self._expect_sseq and sseq != self._expect_sseq:
            gone = sseq - self._expect_sseq
            self.stats.missing += gone
            log.warning(
                "%s: stream sequences %d..%d are no longer in %s (limits or deletes): %d messages not mirrored",
                self.name,
                self._expect_sseq,
                sseq - 1,
                self.stream,
                gone,
            )
        self._expect_sseq = sseq + 1
        target.accept(sseq, subject, headers, data, stored)
        self.stats.received += 1
        self._buffered += 1
        if self._buffered >= self.max_buffered:
            await self._flush()
        else:
            self._dirty.set()

    async def _on_control(self, status: str | None, headers: dict[str, str], reply: str | None) -> None:
        if status != "100":
            log.info("%s: status %s %s", self.name, status, headers.get("Description", ""))
            return
        if reply:  # a flow-control request: everything before it was handed over
            await self._publish(reply)
            return
        stalled = headers.get("Nats-Consumer-Stalled")
        if stalled:
            await self._publish(stalled)
        last = headers.get("Nats-Last-Consumer")
        if last is not None and last.isdigit() and int(last) >= self._next_cseq:
            self._want_reset(f"heartbeat says consumer sequence {last} was sent, {self._next_cseq - 1} arrived")
            self._gen += 1

    async def _publish(self, subject: str) -> None:
        try:
            await self.nc.publish(subject, b"")
        except Exception as e:  # disconnected: the reset after the reconnect takes over
            log.debug("%s: flow control reply: %s", self.name, e)

    # ------------------------------------------------------------------ writing
    async def _flush_loop(self) -> None:
        while not self._stopping:
            await self._dirty.wait()
            self._dirty.clear()
            await self._flush()

    async def _flush(self) -> None:
        if not self._buffered:
            return
        self._buffered = 0
        try:
            await self.target.flush()
            self.stats.flushes += 1
        except Exception as e:
            self.stats.flush_errors += 1
            self._failed(f"writing failed: {e}")
            self._want_reset("writing failed")
            self._gen += 1
