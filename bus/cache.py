"""The generator's result cache in JetStream KV: the bus side.

One KV bucket (``<PREFIX>_CACHE``, declared in :mod:`bus.topology`) shared by
every generator instance. Keys are made by the generator
(``<config id>.<sha256 hex>``, see :mod:`services.generator.cache`); this
module only stores bytes under them:

- an entry is published with a per-message TTL (``Nats-TTL``): the server
  removes it when the TTL runs out; the bucket's max age is the ceiling;
- a value larger than the content threshold goes to the Object Store
  (:class:`bus.content.ContentStore`) and the entry holds its reference;
- ``claim`` writes a pending marker with KV ``create`` (it fails when the
  key exists): across instances, the one that wins renders and the others
  wait for its entry (:meth:`ResultCacheStore.wait`), best effort;
- ``purge`` removes every entry, or a config's (its id is the key's first token).
"""

from __future__ import annotations

import asyncio
import math

from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import Header
from nats.js.errors import APIError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from bus.content import ContentMissing, ContentStore

INLINE = b"="  # the value follows
BY_REF = b"@"  # an Object Store reference follows


class ResultCacheStore:
    """Bytes by key in the cache bucket, with a TTL per entry."""

    def __init__(self, js: JetStreamContext, bucket: str, content: ContentStore):
        self.js = js
        self.bucket = bucket
        self.content = content
        self._kv: KeyValue | None = None

    async def kv(self) -> KeyValue:
        if self._kv is None:
            self._kv = await self.js.key_value(self.bucket)
        return self._kv

    def _subject(self, key: str) -> str:
        return f"$KV.{self.bucket}.{key}"

    async def _decode(self, body: bytes | None) -> bytes | None:
        if not body:
            return None
        if body[:1] == INLINE:
            return body[1:]
        if body[:1] == BY_REF:
            try:
                return await self.content.get(body[1:].decode())
            except ContentMissing:
                return None  # the object went first: a miss
        return None

    async def get(self, key: str) -> bytes | None:
        """The value under ``key``, or None (never stored, expired, purged)."""
        try:
            entry = await (await self.kv()).get(key)
        except KeyNotFoundError:  # KeyDeletedError is a KeyNotFoundError
            return None
        return await self._decode(entry.value)

    async def put(self, key: str, value: bytes, ttl_s: float) -> None:
        """Store ``value`` under ``key`` for ``ttl_s`` seconds (whole seconds, at least 1)."""
        if len(value) > self.content.threshold:
            body = BY_REF + (await self.content.put(f"cache.{key}", value)).encode()
        else:
            body = INLINE + value
        await self.js.publish(self._subject(key), body, msg_ttl=max(1, math.ceil(ttl_s)))

    async def claim(self, key: str, ttl_s: float) -> bool:
        """Write a marker under ``key`` unless one is there: True when this caller wrote it.
        It goes away after ``ttl_s`` (a crashed holder), or on :meth:`release`."""
        ttl = max(1, math.ceil(ttl_s))
        kv = await self.kv()
        try:
            await kv.create(key, b"1", msg_ttl=ttl)
            return True
        except KeyWrongLastSequenceError:
            pass
        try:  # what is there may be the marker an expired claim left: take its place
            entry = await kv.get(key)
        except KeyNotFoundError:
            return False
        if entry.value or not entry.revision:
            return False  # a live claim
        headers = {Header.EXPECTED_LAST_SUBJECT_SEQUENCE.value: str(entry.revision)}
        try:
            await self.js.publish(self._subject(key), b"1", headers=headers, msg_ttl=ttl)
        except APIError:
            return False  # someone else took it first
        return True

    async def release(self, key: str) -> None:
        """Remove ``key`` without leaving a delete marker behind."""
        await self.js.purge_stream(f"KV_{self.bucket}", subject=self._subject(key))

    async def wait(self, key: str, timeout: float) -> bytes | None:
        """The value under ``key`` once it is there (watching the key), or None after ``timeout``."""
        watcher = await (await self.kv()).watch(key)
        deadline = asyncio.get_running_loop().time() + timeout
        try:
            while (left := deadline - asyncio.get_running_loop().time()) > 0:
                try:
                    entry = await watcher.updates(timeout=left)
                except NatsTimeoutError:
                    return None
                if entry is not None and entry.operation is None and entry.value:
                    return await self._decode(entry.value)
            return None
        finally:
            await watcher.stop()

    async def keys(self, pattern: str = "*.*") -> list[str]:
        """The current keys matching ``pattern`` (a subject pattern: ``greet.*``); entries are
        ``<config id>.<hash>``, two tokens, so the default leaves pending markers out."""
        watcher = await (await self.kv()).watch(pattern, ignore_deletes=True, meta_only=True)
        keys = []
        try:
            while (entry := await watcher.updates(timeout=10)) is not None:
                keys.append(entry.key)
        finally:
            await watcher.stop()
        return keys

    async def purge(self, config_id: str | None = None) -> int:
        """Remove every key (of ``config_id``, or all); return how many entries there were."""
        n = len(await self.keys(f"{config_id}.*" if config_id else "*.*"))
        subject = self._subject(f"{config_id}.>") if config_id else None
        await self.js.purge_stream(f"KV_{self.bucket}", subject=subject)
        return n
