"""JetStream and NATS server figures for metrics: stream sizes, consumer lag,
dead letters; connections, message rates, memory of each server.

The telemetry sink turns these into Prometheus gauges, but it never touches
NATS: it gets :meth:`JetStreamMonitor.snapshot` as a plain async callable and
renders whatever that returns. This module is the only place that asks the
server (``$JS.API.STREAM.INFO``, ``$JS.API.CONSUMER.LIST``, ``$JS.API.INFO``,
and, when monitoring URLs are configured, each server's ``/varz``).

Only the topology's own streams are read (the events stream and the dead
letter stream), so several stacks with different prefixes on one server each
report their own figures.

nats-server has no Prometheus endpoint; its HTTP monitoring port answers JSON.
With ``CHORA_NATS_MONITOR_URL`` (comma-separated, one per node; `chora up`
sets it for the embedded server) each server's ``/varz`` is read too, so a
node that stops answering shows as down even while the cluster serves on.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Sequence

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


@dataclass(frozen=True)
class ServerFigures:
    """One nats-server's ``/varz``; ``up`` False (and the rest 0) when it did not answer.
    ``server`` is the host:port of its monitoring URL: a stable, configured label."""

    server: str
    up: bool
    connections: int = 0
    subscriptions: int = 0
    routes: int = 0
    in_msgs: int = 0
    out_msgs: int = 0
    in_bytes: int = 0
    out_bytes: int = 0
    slow_consumers: int = 0
    memory_bytes: int = 0
    cpu_percent: float = 0.0


@dataclass
class JetStreamSnapshot:
    """What the server said at ``taken_at`` (unix seconds)."""

    taken_at: float
    events_stream: str
    dlq_stream: str
    streams: list[StreamFigures] = field(default_factory=list)
    consumers: list[ConsumerFigures] = field(default_factory=list)
    account: AccountFigures | None = None
    servers: list[ServerFigures] = field(default_factory=list)

    @property
    def dead_letters(self) -> int | None:
        """Messages in the dead-letter stream, or None if that stream is missing."""
        for s in self.streams:
            if s.stream == self.dlq_stream:
                return s.messages
        return None


Snapshotter = Callable[[], Awaitable[JetStreamSnapshot]]


class SnapshotError(Exception):
    """JetStream could not be read; ``servers`` holds the servers' figures read meanwhile
    (a server that is down is exactly when they matter)."""

    def __init__(self, cause: Exception, servers: list[ServerFigures]):
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.servers = servers


def _int(value: Any) -> int:
    return int(value) if isinstance(value, (int, float)) else 0


def monitor_urls(value: str | None) -> list[str]:
    """``CHORA_NATS_MONITOR_URL``: comma-separated base URLs (``http://nats-1:8222``)."""
    return [u.strip().rstrip("/") for u in (value or "").split(",") if u.strip()]


def _get_json(url: str, timeout: float) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


async def read_varz(base_url: str, timeout: float = 2.0) -> ServerFigures:
    """One server's figures; never raises (a server that does not answer is ``up=False``)."""
    server = urllib.parse.urlsplit(base_url).netloc or base_url
    try:
        v = await asyncio.to_thread(_get_json, f"{base_url}/varz", timeout)
    except Exception:
        return ServerFigures(server, up=False)
    cpu = v.get("cpu")
    return ServerFigures(
        server,
        up=True,
        connections=_int(v.get("connections")),
        subscriptions=_int(v.get("subscriptions")),
        routes=_int(v.get("routes")),
        in_msgs=_int(v.get("in_msgs")),
        out_msgs=_int(v.get("out_msgs")),
        in_bytes=_int(v.get("in_bytes")),
        out_bytes=_int(v.get("out_bytes")),
        slow_consumers=_int(v.get("slow_consumers")),
        memory_bytes=_int(v.get("mem")),
        cpu_percent=float(cpu) if isinstance(cpu, (int, float)) else 0.0,
    )


class JetStreamMonitor:
    """Reads the figures of one topology's streams and their consumers."""

    def __init__(
        self,
        js: JetStreamContext,
        topology: Topology,
        *,
        clock: Callable[[], float] = time.time,
        server_urls: Sequence[str] = (),
    ):
        self.js = js
        self.topology = topology
        self.clock = clock
        self.server_urls = list(server_urls)

    @classmethod
    def from_context(cls, ctx: Any) -> "JetStreamMonitor":
        """Build from a :class:`services.runtime.BusContext` (its stores hold the JetStream context)."""
        js = getattr(ctx, "js", None) or getattr(getattr(ctx, "state", None), "js", None)
        if js is None:
            raise ValueError("the bus context carries no JetStream context")
        settings = getattr(ctx, "settings", None)
        return cls(js, ctx.topology, server_urls=monitor_urls(getattr(settings, "nats_monitor_url", None)))

    async def snapshot(self) -> JetStreamSnapshot:
        """One reading. A stream that does not exist (yet) is left out; any other
        failure (server unreachable, timeout) raises :class:`SnapshotError`."""
        topo = self.topology
        snap = JetStreamSnapshot(self.clock(), topo.events_stream, topo.dlq_stream)
        servers = asyncio.gather(*(read_varz(u) for u in self.server_urls))
        try:
            await self._jetstream(snap)
        except Exception as e:
            raise SnapshotError(e, list(await servers)) from e
        except BaseException:  # cancelled (the sink is closing): no reading is waited for
            servers.cancel()
            raise
        snap.servers = list(await servers)
        return snap

    async def _jetstream(self, snap: JetStreamSnapshot) -> None:
        topo = self.topology
        for name in (topo.events_stream, topo.dlq_stream):
            try:
                info = await self.js.stream_info(name)
            except NotFoundError:
                continue
            st = info.state
            snap.streams.append(StreamFigures(name, _int(st.messages), _int(st.bytes), _int(st.consumer_count)))
            if st.consumer_count:
                for ci in await self.js.consumers_info(name):
                    if not ci.config.durable_name:
                        # ephemeral (the telemetry sink's reader, the gateway's followers): a new
                        # server-made name at each start would be a new series each time
                        continue
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


__all__ = [
    "AccountFigures",
    "ConsumerFigures",
    "JetStreamMonitor",
    "JetStreamSnapshot",
    "ServerFigures",
    "SnapshotError",
    "Snapshotter",
    "StreamFigures",
    "monitor_urls",
    "read_varz",
]
