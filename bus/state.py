"""Service state in JetStream KV, with compare-and-set.

Values are bytes; callers encode (msgspec). ``update`` succeeds only if the
key is still at the revision the caller read, so two instances of a service
never both win a state change.
"""

from __future__ import annotations

import nats.errors
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue


class StateStore:
    def __init__(self, js: JetStreamContext, bucket: str):
        self.js = js
        self.bucket = bucket
        self._kv: KeyValue | None = None

    async def kv(self) -> KeyValue:
        if self._kv is None:
            self._kv = await self.js.key_value(self.bucket)
        return self._kv

    async def get(self, key: str) -> tuple[bytes, int] | None:
        """(value, revision), or None when the key does not exist (or was deleted)."""
        try:
            entry = await (await self.kv()).get(key)
        except KeyNotFoundError:  # KeyDeletedError is a KeyNotFoundError
            return None
        if entry.value is None:
            return None
        return entry.value, entry.revision

    async def create(self, key: str, value: bytes) -> int | None:
        """The new revision, or None when the key already exists."""
        try:
            return await (await self.kv()).create(key, value)
        except KeyWrongLastSequenceError:
            return None

    async def update(self, key: str, value: bytes, revision: int) -> int | None:
        """The new revision, or None when someone else changed the key since ``revision``."""
        try:
            return await (await self.kv()).update(key, value, last=revision)
        except KeyWrongLastSequenceError:
            return None

    async def put(self, key: str, value: bytes) -> int:
        return await (await self.kv()).put(key, value)

    async def items(self, prefix: str, timeout: float = 30.0) -> dict[str, bytes]:
        """Every current key under ``prefix.`` (one ordered consumer, not one request per key)."""
        kv = await self.kv()
        watcher = await kv.watch(f"{prefix}.>", ignore_deletes=True)
        out: dict[str, bytes] = {}
        try:
            while True:
                try:
                    entry = await watcher.updates(timeout)
                except nats.errors.TimeoutError:
                    raise TimeoutError(f"reading {prefix}.> from {self.bucket} timed out") from None
                if entry is None:
                    return out
                out[entry.key] = entry.value
        finally:
            await watcher.stop()
