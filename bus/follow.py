"""Following events in the stream from a point on, across reconnects and server restarts.

A core subscription sees only what is published while the client is connected:
an outcome published while a waiting CLI was cut off from NATS would be missed.
A :class:`Follower` reads the events stream instead, through an ephemeral push
consumer (no acks, in memory) that starts just after the stream's last message
at :meth:`Follower.start` (taken *before* the request is published, so nothing
can slip past). :meth:`Follower.resume`, called when the connection is back,
replaces that consumer with a new one starting right after the last message
seen: what was published meanwhile is read from the stream.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from bus.wire import delivery_facts

log = logging.getLogger("chora.bus")


class Follower:
    def __init__(self, nc: Client, stream: str, subjects: list[str], on_msg: Callable[[Msg], Awaitable[None]]):
        self.nc, self.stream, self.subjects, self.on_msg = nc, stream, subjects, on_msg
        self.next_seq = 0  # the stream sequence to read from on the next (re)subscription
        self._sub: JetStreamContext.PushSubscription | None = None
        self._stopped = False
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        """Follow from the message after the stream's current last one (again after a stop)."""
        self._stopped = False
        info = await self.nc.jetstream().stream_info(self.stream)
        self.next_seq = info.state.last_seq + 1
        await self._subscribe()

    async def _deliver(self, msg: Msg) -> None:
        seq = delivery_facts(msg.reply)[1]  # not msg.metadata: no dataclasses and datetime per message
        if seq < self.next_seq:
            return  # already seen (an old consumer's late delivery)
        self.next_seq = seq + 1
        await self.on_msg(msg)

    async def _subscribe(self) -> None:
        config = ConsumerConfig(
            ack_policy=AckPolicy.NONE,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=self.next_seq,
            mem_storage=True,
            num_replicas=1,
            inactive_threshold=30.0,
        )
        if len(self.subjects) > 1:
            config.filter_subjects = list(self.subjects)
        self._sub = await self.nc.jetstream().subscribe(
            self.subjects[0], stream=self.stream, cb=self._deliver, manual_ack=True, config=config
        )

    async def resume(self, attempts_until: Callable[[], bool] = lambda: True) -> None:
        """A new consumer from the message after the last one seen. JetStream may need a
        moment after a server restart: try again every half second while ``attempts_until()``
        and the follower is not stopped."""
        async with self._lock:
            if self._stopped:
                return
            old, self._sub = self._sub, None
            if old is not None:
                try:
                    await old.unsubscribe()
                except Exception as e:  # its consumer may be gone with a restarted server
                    log.debug("follower: unsubscribe: %s", e)
            while True:
                try:
                    await self._subscribe()
                    return
                except Exception as e:
                    if self._stopped or not attempts_until():
                        log.debug("follower: gave up resubscribing: %s", e)
                        return
                    log.debug("follower: resubscribe failed, retrying: %s", e)
                    await asyncio.sleep(0.5)

    async def stop(self) -> None:
        self._stopped = True  # before the lock: a resume retrying under it gives up
        async with self._lock:
            if self._sub is not None:
                try:
                    await self._sub.unsubscribe()
                except Exception as e:
                    log.debug("follower: unsubscribe: %s", e)
                self._sub = None
