"""JetStream figures for metrics: stream sizes, consumer lag, dead letters.

The telemetry sink turns these into Prometheus gauges, but it never touches
NATS: it gets :meth:`JetStreamMonitor.snapshot` as a plain async callable and
renders whatever that returns. This module is the only place that asks the
server (``$JS.API.STREAM.INFO``, ``$JS.API.CONSUMER.LIST``, ``$JS.API.INFO``).

Only the topology's own streams are read (the events stream and the dead
letter stream), so several stacks with different prefixes on one server each
report their own figures.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from bus.topology import Topology


@dataclass(frozen=True)
class StreamFigures:
    stream: str
    messages: int
    bytes: int
    consumers: int


@dataclass(frozen=True)
class ConsumerFigures:
    stream: str
    consumer: str
    pending: int  # in the stream, matching the filter, not yet delivered
    ack_pending: int  # delivered, not yet acknowledged
    redelivered: int  # delivered more than once and not yet acknowledged
    waiting: int  # pull requests waiting


@dataclass(frozen=True)
class AccountFigures:
    memory_bytes: int
    storage_bytes: int
    streams: int
    consumers: int


@dataclass
class JetStreamSnapshot:
    """What the server said at ``taken_at`` (unix seconds)."""

    taken_at: float
    events_stream: str
    dlq_stream: str
    streams: list[StreamFigures] = field(default_factory=list)
    consumers: list[ConsumerFigures] = field(default_factory=list)
    account: AccountFigures | None = None

    @property
    def dead_letters(self) -> int | None:
        """Messages in the dead-letter stream, or None if that stream is missing."""
        for s in self.streams:
            if s.stream == self.dlq_stream:
                return s.messages
        return None


Snapshotter = Callable[[], Awaitable[JetStreamSnapshot]]


def _int(value: Any) -> int:
    return int(value) if isinstance(value, (int, float)) else 0


class JetStreamMonitor:
    """Reads the figures of one topology's streams and their consumers."""

    def __init__(self, js: JetStreamContext, topology: Topology, *, clock: Callable[[], float] = time.time):
        self.js = js
        self.topology = topology
        self.clock = clock

    @classmethod
    def from_context(cls, ctx: Any) -> "JetStreamMonitor":
        """Build from a :class:`services.runtime.BusContext` (its stores hold the JetStream context)."""
        js = getattr(ctx, "js", None) or getattr(getattr(ctx, "state", None), "js", None)
        if js is None:
            raise ValueError("the bus context carries no JetStream context")
        return cls(js, ctx.topology)

    async def snapshot(self) -> JetStreamSnapshot:
        """One reading. A stream that does not exist (yet) is left out; any other
        failure (server unreachable, timeout) raises."""
        topo = self.topology
        snap = JetStreamSnapshot(self.clock(), topo.events_stream, topo.dlq_stream)
        for name in (topo.events_stream, topo.dlq_stream):
            try:
                info = await self.js.stream_info(name)
            except NotFoundError:
                continue
            st = info.state
            snap.streams.append(StreamFigures(name, _int(st.messages), _int(st.bytes), _int(st.consumer_count)))
            if st.consumer_count:
                for ci in await self.js.consumers_info(name):
                    snap.consumers.append(
                        ConsumerFigures(
                            stream=name,
                            consumer=ci.name,
                            pending=_int(ci.num_pending),
                            ack_pending=_int(ci.num_ack_pending),
                            redelivered=_int(ci.num_redelivered),
                            waiting=_int(ci.num_waiting),
                        )
                    )
        try:
            acc = await self.js.account_info()
        except Exception:  # an account without JetStream info: the stream figures still stand
            acc = None
        if acc is not None:
            snap.account = AccountFigures(_int(acc.memory), _int(acc.storage), _int(acc.streams), _int(acc.consumers))
        return snap


__all__ = [
    "AccountFigures",
    "ConsumerFigures",
    "JetStreamMonitor",
    "JetStreamSnapshot",
    "Snapshotter",
    "StreamFigures",
]
