"""In-memory stand-ins for unit tests, one per concept (integration tests use the real thing)."""

from __future__ import annotations

import asyncio


class MemoryState:
    """The KV state store in memory, with the contract of :class:`bus.state.StateStore`:
    revisions, ``create`` only when absent, compare-and-set ``update``, ``items`` by prefix.
    Every call yields to the event loop once, so concurrent handlers interleave as they would
    on NATS. ``creates`` and ``updates`` count the calls made (successful or not for creates,
    successful for updates)."""

    def __init__(self):
        self.data: dict[str, tuple[bytes, int]] = {}
        self.seq = 0
        self.creates = 0
        self.updates = 0
        self.ttls: dict[str, float] = {}

    async def get(self, key):
        await asyncio.sleep(0)
        return self.data.get(key)

    async def create(self, key, value):
        self.creates += 1
        await asyncio.sleep(0)
        if key in self.data:
            return None
        self.seq += 1
        self.data[key] = (value, self.seq)
        return self.seq

    async def update(self, key, value, revision):
        await asyncio.sleep(0)
        cur = self.data.get(key)
        if cur is None or cur[1] != revision:
            return None
        self.seq += 1
        self.updates += 1
        self.data[key] = (value, self.seq)
        return self.seq

    async def put(self, key, value):
        await asyncio.sleep(0)
        self.seq += 1
        self.data[key] = (value, self.seq)
        return self.seq

    async def put_many(self, entries, ttl_s):
        """Like :meth:`put` for each, and the TTL noted in ``ttls`` (nothing expires here)."""
        for key, value in entries.items():
            await self.put(key, value)
            self.ttls[key] = ttl_s

    async def items(self, prefix):
        await asyncio.sleep(0)
        return {k: v for k, (v, _) in self.data.items() if k.startswith(prefix + ".")}


class Clock:
    """A clock that stands still until a test moves it: ``clock()`` is ``clock.t``."""

    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t
