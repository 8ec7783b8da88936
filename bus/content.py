"""Large content by reference, in the JetStream Object Store.

An outgoing event whose ``content`` is larger than the threshold is published
with ``content`` empty and ``content_ref`` naming an object (chunked and
SHA-256 checked by the Object Store); an incoming event with a
``content_ref`` and no ``content`` gets its content back before the handler
sees it. Handlers and the CLI never deal with references themselves.

A ``batch.requested`` whose items are larger than the threshold is published
with ``items`` empty, ``items_ref`` naming an object with the JSON list of
items and ``item_count``; the assembler reads them back with :meth:`ContentStore.get`.
"""

from __future__ import annotations

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import BadObjectMetaError, NotFoundError, ObjectDeletedError, ObjectNotFoundError
from nats.js.object_store import ObjectStore

from contracts.envelope import CloudEvent
from contracts.events import BatchRequested

REF_PREFIX = "obj://"


class ContentMissing(Exception):
    pass


class ContentStore:
    def __init__(self, js: JetStreamContext, bucket: str, threshold: int = 256 * 1024):
        self.js = js
        self.bucket = bucket
        self.threshold = threshold
        self._store: ObjectStore | None = None

    async def _os(self) -> ObjectStore:
        if self._store is None:
            self._store = await self.js.object_store(self.bucket)
        return self._store

    async def put(self, name: str, data: bytes) -> str:
        store = await self._os()
        await store.put(name, data)
        return f"{REF_PREFIX}{self.bucket}/{name}"

    async def get(self, ref: str, max_bytes: int | None = None) -> bytes:
        """The object ``ref`` names; :class:`ContentMissing` if it is not there, or (with
        ``max_bytes``) larger than that, which is checked before it is read."""
        if not ref.startswith(REF_PREFIX + self.bucket + "/"):
            raise ContentMissing(f"reference {ref!r} is not in bucket {self.bucket}")
        name = ref[len(REF_PREFIX) + len(self.bucket) + 1 :]
        store = await self._os()
        try:
            if max_bytes is not None:
                size = (await store.get_info(name)).size or 0
                if size > max_bytes:
                    raise ContentMissing(f"{ref} has {size} bytes, over the {max_bytes} accepted here")
            return (await store.get(name)).data or b""
        except (ObjectNotFoundError, NotFoundError):
            raise ContentMissing(f"{ref} not found (expired or deleted)") from None

    async def delete(self, ref: str) -> bool:
        """Delete the object ``ref`` names: True if it was there (a compensation's undo:
        deleting twice is deleting once). A reference to another bucket is left alone (False)."""
        if not ref.startswith(REF_PREFIX + self.bucket + "/"):
            return False
        name = ref[len(REF_PREFIX) + len(self.bucket) + 1 :]
        store = await self._os()
        try:
            await store.delete(name)
        except (ObjectNotFoundError, NotFoundError, ObjectDeletedError, BadObjectMetaError):
            return False
        return True

    async def offload(self, event: CloudEvent) -> CloudEvent:
        """The event as it should travel: large content (or many batch items) replaced by a reference."""
        data = event.data
        if isinstance(data, BatchRequested):
            return await self._offload_items(event, data)
        content = getattr(data, "content", None)
        if not isinstance(content, str) or len(content) <= self.threshold // 4:
            return event  # cheap test first: a str of n chars has at most 4n UTF-8 bytes
        raw = content.encode("utf-8")
        if len(raw) <= self.threshold:
            return event
        ref = await self.put(event.id, raw)
        return msgspec.structs.replace(event, data=msgspec.structs.replace(data, content=None, content_ref=ref))

    async def resolve(self, event: CloudEvent) -> CloudEvent:
        """The event as a handler should see it: a referenced content filled in."""
        data = event.data
        ref = getattr(data, "content_ref", None)
        if not ref or getattr(data, "content", None) is not None:
            return event
        content = (await self.get(ref)).decode("utf-8")
        return msgspec.structs.replace(event, data=msgspec.structs.replace(data, content=content))

    async def _offload_items(self, event: CloudEvent, data: BatchRequested) -> CloudEvent:
        if not data.items:
            return event
        raw = msgspec.json.encode(data.items)
        if len(raw) <= self.threshold:
            return event
        ref = await self.put(f"{event.id}-items.json", raw)
        items = msgspec.structs.replace(data, items=[], items_ref=ref, item_count=len(data.items))
        return msgspec.structs.replace(event, data=items)
