"""The generator's result cache in JetStream KV: the bus side.

One KV bucket (``<PREFIX>_CACHE``, declared in :mod:`bus.topology`) shared by
every generator instance. Keys are made by the generator
(``<config id>.<sha256 hex>``, see :mod:`services.generator.cache`); under a
key ``K`` this module keeps two KV keys:

- ``K.v``, the entry, published with a per-message TTL (``Nats-TTL``): the
  server removes it when the TTL runs out (the bucket's max age is the
  ceiling) and leaves a marker that watchers see. A value larger than the
  content threshold goes to the Object Store (:class:`bus.content.ContentStore`)
  and the entry holds its reference.
- ``K.p``, the pending marker: :meth:`ResultCacheStore.claim` writes it with
  KV ``create`` (which fails when it exists), so across instances one renders;
  the others :meth:`~ResultCacheStore.wait`, watching ``K.*``, for the entry
  or for the end of the claim (released when the render failed, or expired:
  they render themselves). Best effort: nothing here is a lock that
  correctness depends on.

``purge`` removes every key, or a config's (its id is the first token).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import deque

from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import Header
from nats.js.errors import APIError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KV_OP, KV_PURGE, MSG_ROLLUP_SUBJECT, KeyValue

from bus.content import ContentMissing, ContentStore

INLINE = b"="  # the value follows
BY_REF = b"@"  # an Object Store reference follows
ENTRY, PENDING = ".v", ".p"
log = logging.getLogger("chora.bus")

RELEASED_MARKER_TTL_S = 60  # how long the marker of a released claim stays for watchers


class ResultCacheStore:
    """Bytes by key in the cache bucket, with a TTL per entry and a claim per key."""

    def __init__(self, js: JetStreamContext, bucket: str, content: ContentStore):
        self.js = js
        self.bucket = bucket
        self.content = content
        self._kv: KeyValue | None = None
        self._acks: deque[tuple[float, asyncio.Future]] = deque()  # (deadline, PubAck future)
        self.ack_timeout_s = 10.0
        self.failed_sends = 0

    async def kv(self) -> KeyValue:
        if self._kv is None:
            self._kv = await self.js.key_value(self.bucket)
        return self._kv

    def _subject(self, kv_key: str) -> str:
        return f"$KV.{self.bucket}.{kv_key}"

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
            entry = await (await self.kv()).get(key + ENTRY)
        except KeyNotFoundError:  # KeyDeletedError is a KeyNotFoundError
            return None
        return await self._decode(entry.value)

    async def put(self, key: str, value: bytes, ttl_s: float) -> None:
        """Store ``value`` under ``key`` for ``ttl_s`` seconds (whole seconds, at least 1).
        Returns once the entry is sent; its PubAck is awaited in the background (see :meth:`_send`)."""
        if len(value) > self.content.threshold:
            body = BY_REF + (await self.content.put(f"cache.{key}", value)).encode()
        else:
            body = INLINE + value
        await self._send(key + ENTRY, body, ttl_s)

    async def claim(self, key: str, ttl_s: float) -> bool:
        """Mark ``key`` as being rendered unless it is: True when this caller marked it.
        The mark goes on :meth:`release`, or after ``ttl_s`` (a holder that died)."""
        ttl = max(1, math.ceil(ttl_s))
        kv = await self.kv()
        try:
            await kv.create(key + PENDING, b"1", msg_ttl=ttl)
            return True
        except KeyWrongLastSequenceError:
            pass
        try:  # what is there may be the marker the server left when a claim expired
            entry = await kv.get(key + PENDING)
        except KeyNotFoundError:
            return False
        if entry.value or not entry.revision:
            return False  # a live claim
        headers = {Header.EXPECTED_LAST_SUBJECT_SEQUENCE.value: str(entry.revision)}
        try:
            await self.js.publish(self._subject(key + PENDING), b"1", headers=headers, msg_ttl=ttl)
        except APIError:
            return False  # another instance took it first
        return True

    async def release(self, key: str) -> None:
        """End a claim early (the render failed): watchers stop waiting."""
        headers = {KV_OP: KV_PURGE, Header.ROLLUP.value: MSG_ROLLUP_SUBJECT}
        await self.js.publish(self._subject(key + PENDING), b"", headers=headers, msg_ttl=RELEASED_MARKER_TTL_S)

    async def _send(self, kv_key: str, body: bytes, ttl_s: float) -> None:
        """Publish pipelined: a miss costs the requester no wait for this PubAck. A full
        pipeline raises (TooManyStalledMsgsError) after 1 s; a PubAck that does not come
        within ``ack_timeout_s`` is given up (its pipeline slot freed) and, like an error,
        logged and counted in ``failed_sends``."""
        ack = await self.js.publish_async(self._subject(kv_key), body, msg_ttl=max(1, math.ceil(ttl_s)), wait_stall=1.0)
        ack.add_done_callback(self._acked)
        now = asyncio.get_running_loop().time()
        acks = self._acks
        acks.append((now + self.ack_timeout_s, ack))
        while acks and (acks[0][1].done() or acks[0][0] < now):
            _, oldest = acks.popleft()
            oldest.cancel()  # nothing if it is done

    def _acked(self, ack: asyncio.Future) -> None:
        error = "no PubAck in time" if ack.cancelled() else ack.exception()
        if error is not None:
            self.failed_sends += 1
            log.warning("result cache: an entry was not stored: %s", error)

    async def wait(self, key: str, timeout: float) -> bytes | None:
        """The value under ``key`` once it is stored; None when the claim on it ends without
        one, or after ``timeout``. Watches ``key.*``: the entry is stored before the claim
        is released, so a release seen first means there is none."""
        watcher = await (await self.kv()).watch(key + ".*")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            while (left := deadline - loop.time()) > 0:
                try:
                    entry = await watcher.updates(timeout=left)
                except NatsTimeoutError:
                    return None
                if entry is None:
                    continue  # the end of what was there when the watch began
                if entry.key.endswith(ENTRY) and entry.operation is None and entry.value:
                    return await self._decode(entry.value)
                if entry.key.endswith(PENDING) and entry.operation is not None:
                    return None  # released (or expired) without an entry
            return None
        finally:
            await watcher.stop()

    async def remove(self, key: str) -> None:
        """Remove the entry under ``key`` (and its object, if it went by reference); nothing
        if there is none. A compensation's undo: removing twice is removing once."""
        kv = await self.kv()
        try:
            entry = await kv.get(key + ENTRY)
        except KeyNotFoundError:
            return
        if entry.value and entry.value[:1] == BY_REF:
            await self.content.delete(entry.value[1:].decode())
        await kv.delete(key + ENTRY)

    async def keys(self, config_id: str | None = None) -> list[str]:
        """The keys that have an entry (of ``config_id``, or all)."""
        pattern = f"{config_id or '*'}.*{ENTRY}"
        watcher = await (await self.kv()).watch(pattern, ignore_deletes=True, meta_only=True)
        keys = []
        try:
            while (entry := await watcher.updates(timeout=10)) is not None:
                keys.append(entry.key.removesuffix(ENTRY))
        finally:
            await watcher.stop()
        return keys

    async def purge(self, config_id: str | None = None) -> int:
        """Remove every entry and claim (of ``config_id``, or all); return how many entries there were."""
        n = len(await self.keys(config_id))
        subject = self._subject(f"{config_id}.>") if config_id else None
        await self.js.purge_stream(f"KV_{self.bucket}", subject=subject)
        return n
