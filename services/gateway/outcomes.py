"""Outcomes for waiting requests: one follower per gateway process, not one per request.

:class:`OutcomeWaiter` follows the outcome subjects (``content_generated``,
``artifact_assembled``) of the events stream through one ephemeral push consumer
(:class:`bus.follow.Follower`) and hands each outcome to the request waiting for it, by
``request_id``. A request that stopped waiting (its caller got 202) is moved to the *late*
set: its outcome, when it comes, goes to ``on_late`` (which records it for
``GET /v1/requests/{id}``). The late set is bounded; an outcome this process no longer
remembers is found in the stream by :func:`scan`.

The follower runs only while HTTP or MCP requests use it: :meth:`OutcomeWaiter.expect`
starts it (before the request is published, so nothing can slip past), and the watchdog
stops it once no request has waited for ``idle_s`` (the late set is then forgotten: those
outcomes are looked up in the stream when asked for). The outcomes of requests that came
in over NATS then cost the gateway nothing: reading each one only to drop it cost a few
per cent of the stack's throughput and a wake-up per outcome.

While it runs, the watchdog re-creates the consumer from the last message seen when the
server lost it (a restarted server keeps no ephemeral consumer), so no outcome is missed.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import Any, Callable, Coroutine

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from bus.follow import Follower
from contracts.envelope import CloudEvent, EnvelopeError, decode

log = logging.getLogger("chora.gateway")


class OutcomeWaiter:
    def __init__(
        self,
        nc: Client,
        stream: str,
        subjects: list[str],
        on_late: Callable[[CloudEvent], Coroutine[Any, Any, None]],
        *,
        max_late: int = 100_000,
        max_event_bytes: int = 1 << 20,
        watch_interval_s: float = 5.0,
        idle_s: float = 60.0,
    ):
        self.nc = nc
        self.on_late = on_late
        self.max_late = max_late
        self.max_event_bytes = max_event_bytes
        self.watch_interval_s = watch_interval_s
        self.idle_s = idle_s
        self.start_timeout_s = 10.0  # how long a request waits for the follower before a 503
        self._last_wait = 0.0  # (loop time) when a request last started waiting
        self._lock = asyncio.Lock()  # starting and stopping the follower
        self._waiting: dict[str, asyncio.Future[CloudEvent]] = {}
        self._late: OrderedDict[str, None] = OrderedDict()
        self._tasks: set[asyncio.Task] = set()
        self.follower = Follower(nc, stream, subjects, self._on_msg)
        self._watch: asyncio.Task | None = None

    async def start(self) -> None:
        """The watchdog; the follower itself starts with the first request that waits."""
        self._watch = asyncio.create_task(self._watchdog())

    @property
    def following(self) -> bool:
        return self.follower._sub is not None

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
        await self.follower.stop()
        for fut in self._waiting.values():
            fut.cancel()
        self._waiting.clear()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # ------------------------------------------------------------------ requests
    async def expect(self, request_id: str) -> asyncio.Future[CloudEvent]:
        """A future for the outcome of ``request_id``: call it before the request is published.
        Starts the follower (from the stream's end) when it is not running, and raises what
        that raises (the server cannot be reached), or ConnectionError when the follower is
        still being re-created after ``start_timeout_s``."""
        loop = asyncio.get_running_loop()
        try:  # the watchdog may hold the lock while it re-creates a lost consumer
            await asyncio.wait_for(self._lock.acquire(), self.start_timeout_s)
        except asyncio.TimeoutError:
            raise ConnectionError("the outcome follower is being re-created; try again") from None
        try:
            if not self.following:
                await self.follower.start()
            fut: asyncio.Future[CloudEvent] = loop.create_future()
            self._waiting[request_id] = fut
            self._last_wait = loop.time()
        finally:
            self._lock.release()
        return fut

    def forget(self, request_id: str) -> None:
        self._waiting.pop(request_id, None)

    def give_up(self, request_id: str) -> CloudEvent | None:
        """The caller stops waiting: the outcome if it is just in, else None and the request
        is remembered as late (its outcome goes to ``on_late``)."""
        fut = self._waiting.pop(request_id, None)
        if fut is not None and fut.done() and not fut.cancelled():
            return fut.result()
        self._late[request_id] = None
        while len(self._late) > self.max_late:
            self._late.popitem(last=False)
        return None

    def is_late(self, request_id: str) -> bool:
        return request_id in self._late

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    # ------------------------------------------------------------------ delivery
    async def _on_msg(self, msg: Msg) -> None:
        if not self._waiting and not self._late:
            return
        try:
            ev = decode(msg.headers, msg.data, max_bytes=self.max_event_bytes)
        except EnvelopeError:
            return
        rid = getattr(ev.data, "request_id", None)
        if not isinstance(rid, str):
            return
        fut = self._waiting.pop(rid, None)
        if fut is not None:
            if not fut.done():
                fut.set_result(ev)
            return
        if rid in self._late:
            del self._late[rid]
            task: asyncio.Task = asyncio.create_task(self.on_late(ev))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _watch_once(self) -> None:
        """Stop the follower when idle, or re-create its consumer when the server no longer has
        it (e.g. after a restart). Under the lock: a request starting meanwhile waits for it."""
        async with self._lock:
            sub = self.follower._sub
            if sub is None:
                return
            if not self._waiting and asyncio.get_running_loop().time() - self._last_wait >= self.idle_s:
                await self.follower.stop()
                self._late.clear()  # their outcomes are looked up in the stream when asked for
                log.debug("outcome follower stopped: no request waited for %.0f s", self.idle_s)
                return
            if not self.nc.is_connected:
                return
            try:
                await sub.consumer_info()
            except Exception as e:
                log.info("outcome follower lost its consumer (%s); resuming from the last event seen", e)
                await self.follower.resume(lambda: self.nc.is_connected)

    async def _watchdog(self) -> None:
        while True:
            await asyncio.sleep(self.watch_interval_s)
            await self._watch_once()


async def scan(
    nc: Client,
    stream: str,
    subject: str,
    start_seq: int,
    match: Callable[[CloudEvent], bool],
    *,
    want: int = 1,
    limit: int = 200_000,
    max_event_bytes: int = 1 << 20,
    timeout: float = 5.0,
) -> list[CloudEvent]:
    """Events on ``subject`` from stream sequence ``start_seq`` on for which ``match`` is true,
    until ``want`` are found, the stream's end, ``limit`` messages read or ``timeout`` between
    two messages; read with one ephemeral push consumer (no acks, in memory)."""
    js = nc.jetstream()
    config = ConsumerConfig(
        ack_policy=AckPolicy.NONE,
        deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
        opt_start_seq=max(1, start_seq),
        mem_storage=True,
        num_replicas=1,
        inactive_threshold=30.0,
        flow_control=True,  # the server waits for a slow reader: nothing dropped on a long scan
        idle_heartbeat=2.0,
    )
    sub = await js.subscribe(subject, stream=stream, manual_ack=True, config=config, pending_msgs_limit=4096)
    found: list[CloudEvent] = []
    try:
        info = await sub.consumer_info()
        if info.num_pending == 0 and (info.delivered is None or not info.delivered.consumer_seq):
            return found  # nothing on the subject from there (a push consumer may have delivered already)
        for _ in range(limit):
            try:
                msg = await sub.next_msg(timeout=timeout)
            except (NatsTimeout, asyncio.TimeoutError):
                break
            try:
                ev = decode(msg.headers, msg.data, max_bytes=max_event_bytes)
            except EnvelopeError:
                ev = None
            if ev is not None and match(ev):
                found.append(ev)
                if len(found) >= want:
                    break
            if msg.metadata.num_pending == 0:
                break
        return found
    finally:
        await sub.unsubscribe()
