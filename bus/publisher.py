"""Publishing CloudEvents to JetStream in the NATS binding, binary mode."""

from __future__ import annotations

import asyncio
from typing import Iterable

from nats.js import JetStreamContext
from nats.js.api import PubAck

from bus.content import ContentStore
from contracts.catalogue import CATALOGUE, event_subject
from contracts.envelope import CloudEvent, encode_binary


class PublishError(RuntimeError):
    pass


class Publisher:
    """Publishes events on their catalogue subject with ``Nats-Msg-Id`` = event id,
    so a re-published event (a redelivered cause handled again) is dropped by
    JetStream inside the stream's duplicate window."""

    def __init__(
        self,
        js: JetStreamContext,
        prefix: str,
        *,
        timeout: float = 10.0,
        max_bytes: int = 1 << 20,
        content: ContentStore | None = None,
    ):
        self.js = js
        self.content = content  # offloads large content to the Object Store
        self.prefix = prefix
        self.timeout = timeout
        self.max_bytes = max_bytes

    def subject(self, event: CloudEvent) -> str:
        spec = CATALOGUE.get(event.type)
        if spec is None:
            raise PublishError(f"unknown event type {event.type!r}: add it to contracts.catalogue")
        if not spec.by_origin:
            return spec.subject(self.prefix)
        try:
            return event_subject(event.type, event.data, self.prefix)
        except ValueError as e:
            raise PublishError(f"event {event.id} ({event.type}): {e}") from None

    async def publish(self, event: CloudEvent) -> PubAck:
        return (await self.publish_many([event]))[0]

    async def publish_many(self, events: Iterable[CloudEvent]) -> list[PubAck]:
        """Publish pipelined and wait until JetStream has stored every one."""
        futures = []
        for ev in events:
            if self.content is not None:
                ev = await self.content.offload(ev)
            headers, body = encode_binary(ev)
            if len(body) > self.max_bytes:
                raise PublishError(f"event {ev.id} ({ev.type}) has {len(body)} bytes, over {self.max_bytes}")
            futures.append(await self.js.publish_async(self.subject(ev), body, headers=headers))
        if not futures:
            return []
        try:
            # asyncio.timeout, not wait_for: no task wrapped around each wait (this is every outcome's path)
            async with asyncio.timeout(self.timeout):
                if len(futures) == 1:  # the common case (one outcome per message): no gathering future
                    return [await futures[0]]
                return list(await asyncio.gather(*futures))
        except TimeoutError:
            for f in futures:
                f.cancel()
            raise PublishError(f"no PubAck within {self.timeout}s") from None
