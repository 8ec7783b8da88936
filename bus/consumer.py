"""The one consumer loop every service runs.

A durable pull consumer, pulled continuously: the loop keeps pull requests
outstanding for as many messages as it has room for (``max_in_flight`` minus
what it is working on), so a message is delivered the moment it is stored
(latency of a push consumer) and many arrive per request (throughput of a
batch fetch). Idle heartbeats tell a live pull request from one the server
forgot (restart, leader change); a forgotten one is re-issued.

Per message:
  - a replay for another consumer (header ``Chora-Replay-For``, see bus.dlq) -> ack,
    before decoding: it is that consumer's to handle, however malformed;
  - decode the CloudEvent; if it is malformed -> dead letter, then term;
  - run the handler, publish what it returns (waiting for the PubAcks), ack;
  - ``Retry`` or an unexpected exception -> nak with a delay (backoff); on the
    last allowed delivery -> dead letter, then term: never an infinite retry;
  - ``Reject`` (the handler says "never") -> dead letter, then term.
A dead letter is always stored before the original is terminated; if it
cannot be stored, the message is nak'ed instead, so nothing is lost.

Stopping drains: no new pulls, messages that still arrive are nak'ed at once
for another instance, in-flight work finishes and is acked. A message the
server sends in the instant between our last nak and the unsubscribe reaches
no one and comes back after ack_wait: delivery is at least once, never lost.
(What was already delivered when we unsubscribe is nak'ed: the subscription is
drained, not dropped.)
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Awaitable, Protocol, Sequence

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext

from bus import tracing
from bus.connection import settle
from bus.content import ContentMissing, ContentStore
from bus.deadletter import H_REPLAY_FOR, dead_letter
from bus.publisher import Publisher, fast_path
from bus.topology import ConsumerSpec, Topology
from bus.wire import ack, delivery_facts, direct_deliveries, parse_headers
from contracts.catalogue import MISROUTED_CALLBACK, misrouted_callback
from contracts.envelope import CloudEvent, EnvelopeError, decode
from contracts.handling import Bound, Delivery, Reject, Retry

log = logging.getLogger("chora.bus")

#: What the loop calls per message: a service's handlers bound to its dependencies
#: (:func:`contracts.handling.route`), given the event and the facts of its delivery.
Handler = Bound


class Observer(Protocol):
    """Hooks for metrics (see services.metrics.ServiceMetrics), called on the event loop.

    ``handled``: a message was settled; outcome is ack, retry, dead, skipped or error.
    ``published``: a handler's outcome events were stored (their PubAcks are in).
    """

    def handled(self, consumer: str, event_type: str, outcome: str, seconds: float) -> None: ...

    def published(self, consumer: str, events: Sequence[CloudEvent]) -> None: ...


class _NullObserver:
    def handled(self, consumer: str, event_type: str, outcome: str, seconds: float) -> None:
        pass

    def published(self, consumer: str, events: Sequence[CloudEvent]) -> None:
        pass


@dataclass
class LoopStats:
    acked: int = 0
    naked: int = 0
    dead: int = 0
    published: int = 0
    pulls: int = 0  # pull requests sent


class ConsumerLoop:
    def __init__(
        self,
        nc: Client,
        js: JetStreamContext,
        topology: Topology,
        consumer: ConsumerSpec,
        handler: Handler,
        *,
        publisher: Publisher | None = None,
        max_in_flight: int = 256,
        pull_batch: int = 256,
        max_event_bytes: int = 1 << 20,
        heartbeat_s: float = 1.0,
        pull_expires_s: float = 10.0,
        observer: Observer | None = None,
        content: ContentStore | None = None,
        direct: bool = True,
    ):
        self.nc, self.js, self.topology, self.spec = nc, js, topology, consumer
        self.handler = handler
        self.content = content
        self.publisher = publisher or Publisher(js, topology.prefix, max_bytes=max_event_bytes, content=content)
        self.max_in_flight = max_in_flight
        self.pull_batch = max(1, min(pull_batch, max_in_flight))
        self.max_event_bytes = max_event_bytes
        self.heartbeat_s = heartbeat_s
        self.pull_expires_s = pull_expires_s
        self.observer = observer or _NullObserver()
        self.direct = direct  # deliveries straight from the read loop (bus.wire), where nats-py allows
        self._fast_ack = direct and fast_path(nc)
        self.stats = LoopStats()
        self._api = f"$JS.API.CONSUMER.MSG.NEXT.{topology.events_stream}.{consumer.durable}"
        self._dlq = topology.dlq_subject(consumer.durable)
        self._outstanding = 0  # messages asked for and not yet delivered
        self._in_flight = 0
        self._tasks: set[asyncio.Task] = set()
        self._wake = asyncio.Event()
        self._stopping = False
        self._stopped = asyncio.Event()
        self._last_seen = 0.0
        self._last_answer = 0.0  # when the server last sent anything on our pull inbox
        self._sub: Subscription | None = None
        self._working: dict[int, tuple[Msg, float]] = {}  # id(msg) -> (msg, started)
        self._backlog = 0  # messages pending for the consumer, as of the last delivery

    # ------------------------------------------------------------------ lifecycle
    async def run(self) -> None:
        """Consume until :meth:`stop`. Never raises for a bad message."""
        inbox = self.nc.new_inbox()
        self._sub = await self.nc.subscribe(inbox, cb=self._on_msg)
        table = direct_deliveries(self.nc)  # (installed either way: it guards the read loop, see bus.wire)
        if table is not None and self.direct:  # the raw message in the read loop: no header dict, queue, task hop
            table[self._sub._id] = self._on_raw
        self._inbox = inbox
        reconnects = self.nc.stats.get("reconnects", 0)
        keepalive = asyncio.create_task(self._keepalive())
        try:
            while not self._stopping:
                if self.nc.stats.get("reconnects", 0) != reconnects:
                    # A new connection: the server holds none of our pull requests any more.
                    reconnects = self.nc.stats.get("reconnects", 0)
                    self._outstanding = 0
                await self._pull_if_room()
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), self.heartbeat_s)
                except asyncio.TimeoutError:
                    pass
                if self._outstanding and time.monotonic() - self._last_seen > 3 * self.heartbeat_s:
                    # No message and no heartbeat: the server no longer holds our requests.
                    log.info("%s: pull requests went stale, re-pulling", self.spec.durable)
                    self._outstanding = 0
        finally:
            self._stopped.set()
            # keep long work alive while stop() drains it
            self._keepalive_task = keepalive

    async def stop(self, timeout: float = 30.0) -> None:
        """Drain: stop pulling, finish and ack what is in flight, then unsubscribe."""
        self._stopping = True
        self._wake.set()
        await self._stopped.wait()
        # With a backlog, the server fills our outstanding pull requests at once: take those
        # deliveries (we nak them) before unsubscribing, or they would reach no one and wait
        # out ack_wait. Idle, nothing comes to fill them, so there is nothing to wait for.
        deadline = time.monotonic() + 2.0
        while self._outstanding > 0 and self._backlog > 0 and self.nc.is_connected and time.monotonic() < deadline:
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), 0.05)
            except asyncio.TimeoutError:
                pass
        if self._tasks:
            done, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
            for t in pending:
                t.cancel()
        task = getattr(self, "_keepalive_task", None)
        if task is not None:
            task.cancel()
        await settle(self.nc)  # the acks and naks are at the server before the UNSUB
        if self._sub is not None:
            try:
                # UNSUB, a round trip, then our callback (which naks while stopping) runs on
                # whatever was already delivered: a plain unsubscribe would drop those messages,
                # leaving them unacknowledged until ack_wait.
                await self._sub.drain()
            except Exception:  # connection already closed or draining
                pass
            table = getattr(self.nc, "_chora_direct", None)
            if table is not None:
                table.pop(self._sub._id, None)
        await settle(self.nc)  # and the naks of the drained ones before we say we are stopped
        await tracing.aflush()  # spans of what this loop handled (nothing when tracing is off)

    # ------------------------------------------------------------------ pulling
    async def _pull_if_room(self) -> None:
        room = self.max_in_flight - self._in_flight - self._outstanding
        if room < max(1, self.pull_batch // 2) or not self.nc.is_connected:
            return
        n = min(room, self.pull_batch)
        req = {
            "batch": n,
            "expires": int(self.pull_expires_s * 1e9),
            "idle_heartbeat": int(self.heartbeat_s * 1e9),
        }
        if self._outstanding == 0:
            self._last_seen = time.monotonic()
        self.stats.pulls += 1
        self._outstanding += n
        try:
            await self.nc.publish(self._api, msgspec.json.encode(req), reply=self._inbox)
        except Exception as e:  # disconnected: try again on the next turn
            self._outstanding -= n
            log.debug("pull request failed: %s", e)

    @property
    def bound(self) -> bool:
        """Whether the loop is bound to its consumer: running, and the server answered its pull
        requests (a message, a heartbeat, a status) within the last three heartbeats, or it has
        none out (busy with as much as it may hold: nothing to answer). Readiness
        (services.health) reads it from another thread: it only reads plain attributes."""
        return (
            self._sub is not None
            and not self._stopping
            and self.nc.is_connected
            and (self._outstanding == 0 or time.monotonic() - self._last_answer < 3 * self.heartbeat_s)
        )

    async def _on_raw(self, subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> None:
        """A delivery straight from the connection's read loop (bus.wire.direct_deliveries)."""
        hdrs: dict[str, str] | None = None
        if headers:
            status, hdrs = parse_headers(headers)
            if status is not None:  # as nats-py reads a status line: Status and Description
                hdrs["Status"] = status
                desc = headers[13 : headers.find(b"\r\n")].strip()
                if desc:
                    hdrs["Description"] = desc.decode("utf-8", "replace")
        await self._on_msg(Msg(self.nc, subject.decode(), reply.decode(), data, hdrs or None))

    async def _on_msg(self, msg: Msg) -> None:
        self._last_seen = time.monotonic()
        headers = msg.headers
        # A status (heartbeat, request expired, ...) has no body and no ack subject; a stored
        # message with an empty body and a header named Status is a message (it gets its dead
        # letter like any other that is not an event), never mistaken for one.
        if headers and not msg.data and "Status" in headers and not msg.reply.startswith("$JS.ACK."):
            if headers.get("Status") not in ("409", "503"):  # not "consumer deleted" nor "no responders"
                self._last_answer = self._last_seen
            self._on_status(headers)
            return
        self._last_answer = self._last_seen
        self._outstanding = max(0, self._outstanding - 1)
        try:
            delivered, stream_seq, self._backlog = delivery_facts(msg.reply)
        except ValueError:  # not a JetStream delivery: nothing to go by, and nothing to ack
            log.warning("%s: a message without a JetStream reply subject: dropped", self.spec.durable)
            return
        if self._stopping:
            await self._safe(msg.nak())
            return
        self._in_flight += 1
        task = asyncio.create_task(self._process(msg, delivered, stream_seq))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_status(self, headers: dict[str, str]) -> None:
        code = headers.get("Status", "")
        if code == "100":  # idle heartbeat: requests still alive
            return
        pending = headers.get("Nats-Pending-Messages")
        if pending is not None:
            self._outstanding = max(0, self._outstanding - int(pending))
            if code in ("404", "408"):
                self._backlog = 0  # the request ran out unfilled: nothing was pending
        elif code == "409":
            # leadership change, consumer deleted, ...: the server dropped our requests
            self._outstanding = 0
            log.info("%s: pull status 409 %s", self.spec.durable, headers.get("Description", ""))
        self._wake.set()

    async def _keepalive(self) -> None:
        """Tell the server we are still working on messages that take long (``+WPI``), so
        ack_wait can stay short: after a crash, what the dead process held comes back soon."""
        period = max(0.05, self.spec.ack_wait_s / 3)
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for msg, started in list(self._working.values()):
                if now - started >= period:
                    await self._safe(msg.in_progress())

    # ------------------------------------------------------------------ handling
    async def _process(self, msg: Msg, delivered: int, stream_seq: int) -> None:
        start = time.perf_counter()
        self._working[id(msg)] = (msg, time.monotonic())
        event_type = "unknown"
        outcome = "ack"
        try:
            replay_for = (msg.headers or {}).get(H_REPLAY_FOR)
            if replay_for is not None and replay_for != self.spec.durable:
                # a dead letter of another consumer, replayed for that one only: not ours to
                # decode (it may be the very message that consumer could not decode)
                outcome = "skipped"
                await msg.ack()
                return
            try:
                event = decode(msg.headers, msg.data, max_bytes=self.max_event_bytes)
                event_type = event.type
            except EnvelopeError as e:
                outcome = "dead"
                await self._dead(msg, e.code, e.message)
                return
            misrouted = misrouted_callback(event.data, msg.subject)
            if misrouted is not None:  # a wire contract, as the envelope's (contracts/catalogue.py)
                outcome = "dead"
                await self._dead(msg, MISROUTED_CALLBACK, misrouted)
                return
            delivery = Delivery(delivered, self.spec.max_deliver, self.spec.durable, stream_seq)
            try:
                if self.content is not None:
                    event = await self.content.resolve(event)
                with tracing.span_for(event, self.spec.durable, msg.subject) as span:
                    out = span.adopt(await self.handler(event, delivery))
                    if out:
                        await self.publisher.publish_many(out)
                        self.stats.published += len(out)
                        self.observer.published(self.spec.durable, out)
            except ContentMissing as e:
                outcome = "dead"
                await self._dead(msg, "CONTENT_MISSING", str(e))
                return
            except Reject as e:
                outcome = "dead"
                try:
                    if e.events:
                        await self.publisher.publish_many(e.events)
                        self.stats.published += len(e.events)
                        self.observer.published(self.spec.durable, e.events)
                except Exception as pe:
                    outcome = await self._retry(msg, pe)
                    return
                await self._dead(msg, e.code, e.message)
                return
            except Exception as e:  # Retry, a publish failure, or a bug: transient until proven otherwise
                outcome = await self._retry(msg, e)
                return
            await (ack(self.nc, msg) if self._fast_ack else msg.ack())
            self.stats.acked += 1
        except Exception:  # acking/naking on a dead connection: redelivery will follow
            log.exception("%s: failed to settle message", self.spec.durable)
            outcome = "error"
        finally:
            self._working.pop(id(msg), None)
            self._in_flight -= 1
            self.observer.handled(self.spec.durable, event_type, outcome, time.perf_counter() - start)
            if self._in_flight + self._outstanding <= self.max_in_flight - self.pull_batch // 2:
                self._wake.set()

    async def _retry(self, msg: Msg, e: Exception) -> str:
        delivered = msg.metadata.num_delivered
        reason = f"{type(e).__name__}: {e}"
        if delivered >= self.spec.max_deliver:
            await self._dead(msg, "MAX_DELIVERIES", f"gave up after {delivered} deliveries; last error {reason}")
            return "dead"
        delay = e.delay if isinstance(e, Retry) and e.delay is not None else self.spec.nak_delay(delivered)
        if not isinstance(e, Retry):
            log.warning(
                "%s: handler failed (delivery %d), retrying in %.1fs: %s", self.spec.durable, delivered, delay, reason
            )
        await msg.nak(delay=delay)
        self.stats.naked += 1
        return "retry"

    async def _dead(self, msg: Msg, code: str, reason: str) -> None:
        try:
            await dead_letter(self.js, self._dlq, msg, code, reason)
        except Exception as e:
            # The copy is not stored: do not terminate; let it come back.
            log.error("%s: could not store dead letter (%s); nak instead", self.spec.durable, e)
            await msg.nak(delay=self.spec.nak_delay(msg.metadata.num_delivered))
            self.stats.naked += 1
            return
        log.warning(
            "%s: dead-lettered stream seq %s: %s %s", self.spec.durable, msg.metadata.sequence.stream, code, reason
        )
        await msg.term()
        self.stats.dead += 1

    @staticmethod
    async def _safe(aw: Awaitable) -> None:
        try:
            await aw
        except Exception:
            pass
