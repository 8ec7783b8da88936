"""Service state in JetStream KV, with compare-and-set.

Values are bytes; callers encode (msgspec). ``update`` succeeds only if the
key is still at the revision the caller read, so two instances of a service
never both win a state change.
"""

from __future__ import annotations

import asyncio
import math
import logging
import uuid
from typing import Any, Callable

from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue


log = logging.getLogger("chora.bus")


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
        if entry.value is None or entry.revision is None:
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

    async def put_many(
        self, entries: dict[str, bytes], ttl_s: float, window: int = 512, ack_timeout_s: float = 5.0
    ) -> None:
        """Write every key with a per-message TTL (``Nats-TTL``, whole seconds, at least 1): the
        server removes each one when it runs out. The first is awaited alone, so that a refusal
        (a bucket whose stream does not allow message TTLs) raises at once; the rest are
        pipelined, ``window`` PubAcks in flight, each window given ``ack_timeout_s`` (nats-py
        2.16 leaves an async publish whose PubAck is an error it cannot map unanswered)."""
        ttl = max(1, math.ceil(ttl_s))
        items = iter(entries.items())
        first = next(items, None)
        if first is None:
            return
        await self.js.publish(f"$KV.{self.bucket}.{first[0]}", first[1], msg_ttl=ttl)
        pending: list[asyncio.Future] = []
        for key, value in items:
            pending.append(await self.js.publish_async(f"$KV.{self.bucket}.{key}", value, msg_ttl=ttl))
            if len(pending) >= window:
                await self._acks(pending, ack_timeout_s)
        await self._acks(pending, ack_timeout_s)

    @staticmethod
    async def _acks(pending: list[asyncio.Future], timeout: float) -> None:
        try:
            await asyncio.wait_for(asyncio.gather(*pending), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"{len(pending)} KV writes not acknowledged within {timeout}s") from None
        finally:
            pending.clear()

    async def items(self, prefix: str, timeout: float = 30.0) -> dict[str, bytes]:
        """Every current key under ``prefix.``, read with one ordered consumer (last value per
        key) until a message says nothing is pending: not one request per key, and not the
        client's watch marker, which can arrive before the last entry."""
        return await self.matching(f"{prefix}.>", timeout)

    async def matching(self, pattern: str, timeout: float = 30.0) -> dict[str, bytes]:
        """Every current key matching the subject pattern ``pattern`` (``batch.*``: the keys of
        two tokens that start with ``batch``), with its value."""
        kv_stream = f"KV_{self.bucket}"
        subject = f"$KV.{self.bucket}.{pattern}"
        strip = len(f"$KV.{self.bucket}.")
        out: dict[str, bytes] = {}
        done = asyncio.get_running_loop().create_future()

        async def on_msg(msg) -> None:
            op = (msg.headers or {}).get("KV-Operation")
            key = msg.subject[strip:]
            if op in ("DEL", "PURGE"):
                out.pop(key, None)
            else:
                out[key] = msg.data
            if msg.metadata.num_pending == 0 and not done.done():
                done.set_result(None)

        sub = await self.js.subscribe(
            subject, stream=kv_stream, cb=on_msg, ordered_consumer=True, deliver_policy=DeliverPolicy.LAST_PER_SUBJECT
        )
        try:
            info = await sub.consumer_info()
            if info.num_pending == 0 and (info.delivered is None or info.delivered.consumer_seq == 0):
                return out  # nothing under the prefix
            try:
                await asyncio.wait_for(done, timeout)
            except asyncio.TimeoutError:
                raise TimeoutError(f"reading {subject} from {kv_stream} timed out") from None
            return out
        finally:
            await sub.unsubscribe()

    async def _reaches(self, stream: str, seq: int) -> bool:
        """Whether ``stream`` holds sequence ``seq`` (or held it: False when it was made anew, or
        when its info cannot be read, e.g. not allowed: the caller then reads everything)."""
        try:
            return (await self.js.stream_info(stream)).state.last_seq >= seq
        except Exception as e:
            log.debug("stream info of %s: %s (every current key is read)", stream, e)
            return False

    async def follow(
        self,
        pattern: str,
        on_change: Callable[[str, bool, int], None],
        idle_s: float = 60.0,
        after_seq: int = 0,
    ) -> Any:
        """Call ``on_change(key, present, stream sequence)`` for every key matching ``pattern``
        now (present) and for every later put (present) or delete/purge (not present). Returns
        the subscription (``await sub.unsubscribe()`` to stop; the server drops the consumer
        ``idle_s`` after its subscriber is gone). A named push consumer with its filter in the
        API subject, so that a user may be allowed to follow only ``pattern`` (deploy/nats/auth.conf).

        ``after_seq``: the highest stream sequence an earlier follow of the same keys saw. The
        follow then starts after it, with what changed since, instead of reading every current
        key again: made anew, it costs what is new, not what the bucket holds. When the stream
        does not reach that sequence (it was made anew), every current key is read, as without it."""
        strip = len(f"$KV.{self.bucket}.")
        stream = f"KV_{self.bucket}"

        async def on_msg(msg) -> None:
            op = (msg.headers or {}).get("KV-Operation") or (msg.headers or {}).get("Nats-Marker-Reason")
            on_change(msg.subject[strip:], not op, msg.metadata.sequence.stream)

        config = ConsumerConfig(
            name=f"follow-{uuid.uuid4().hex[:16]}",
            ack_policy=AckPolicy.NONE,
            deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
            inactive_threshold=idle_s,
            mem_storage=True,
            num_replicas=1,
        )
        if after_seq > 0 and await self._reaches(stream, after_seq):
            config.deliver_policy = DeliverPolicy.BY_START_SEQUENCE
            config.opt_start_seq = after_seq + 1
        return await self.js.subscribe(
            f"$KV.{self.bucket}.{pattern}", stream=stream, cb=on_msg, config=config, manual_ack=True
        )
