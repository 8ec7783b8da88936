"""Publishing CloudEvents to JetStream in the NATS binding, binary mode.

Every outcome of every service goes through :meth:`Publisher.publish_many`, so its cost is
paid once per message by each stage. nats-py's ``js.publish_async`` costs about 90 us of CPU
per message on the 2-core bench VM (a semaphore, a NUID and ``secrets.token_hex`` per
publish, a regex per header name, the PubAck's ``json.loads`` and dataclass, a task hop per
reply). :class:`PubAcks` does the same protocol in fewer steps on nats-py's own connection:
the header block is written as one string, the ``HPUB`` goes on nats-py's outgoing buffer
(so flushing, reconnect buffering and limits stay nats-py's), and PubAcks come back on one
wildcard inbox per connection, decoded by msgspec. About 15-25 us per message
(``bench/consumer_loop.py``). Where the installed nats-py lacks the internals this needs,
:func:`fast_path` says so and the publisher uses ``js.publish_async`` (tested both ways).
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any, Iterable

import msgspec
from nats.aio.client import Client
from nats.errors import BadSubjectError, ConnectionClosedError, ConnectionDrainingError, OutboundBufferLimitError
from nats.js import JetStreamContext
from nats.js.api import PubAck
from nats.js.errors import APIError, NoStreamResponseError

from bus.content import ContentStore
from bus.wire import direct_deliveries, parse_headers
from contracts.catalogue import CATALOGUE, event_subject
from contracts.envelope import CloudEvent, encode_binary


class PublishError(RuntimeError):
    pass


_NO_NEWLINES = str.maketrans("", "", "\r\n")
_CLIENT_PARTS = (
    "_send_command",
    "_flush_pending",
    "_flush_queue",
    "_nuid",
    "_inbox_prefix",
    "_pending_data_size",
    "_max_pending_size",
)


def fast_path(nc: Any) -> bool:
    """Whether ``nc`` (a nats-py client) has the internals :class:`PubAcks` writes through."""
    return isinstance(nc, Client) and all(hasattr(nc, a) for a in _CLIENT_PARTS)


def header_block(headers: dict[str, str]) -> bytes:
    """``NATS/1.0`` and one ``Name: value`` line per header, newlines taken out of values (as
    nats-py does); names are the envelope's own (``ce-*``, ``Nats-Msg-Id``)."""
    values = "".join(headers.values())
    if "\r" in values or "\n" in values:  # never in what the envelope writes: the slow way
        headers = {k: v.translate(_NO_NEWLINES) for k, v in headers.items()}
    return ("NATS/1.0\r\n" + "".join([f"{k}: {v}\r\n" for k, v in headers.items()]) + "\r\n").encode()


class _Reply(msgspec.Struct):
    stream: str = ""
    seq: int = 0
    duplicate: bool | None = None
    domain: str | None = None
    error: dict[str, Any] | None = None


_decode_reply = msgspec.json.Decoder(_Reply).decode


class PubAcks:
    """The PubAcks of one connection's JetStream publishes: one wildcard inbox subscription,
    a future per publish keyed by the last token of its reply subject. Shared by every
    :class:`Publisher` on the connection (:meth:`of`)."""

    def __init__(self, nc: Client):
        self.nc = nc
        self._pending: dict[str, asyncio.Future[PubAck]] = {}
        self._good_subjects: set[str] = set()
        self._tokens = itertools.count(1)
        self._prefix = ""
        self._started: asyncio.Future[None] | None = None

    @classmethod
    async def of(cls, nc: Client) -> "PubAcks":
        acks: PubAcks | None = getattr(nc, "_chora_pubacks", None)
        if acks is None:
            acks = cls(nc)
            nc._chora_pubacks = acks  # type: ignore[attr-defined]
        if not acks._prefix:
            await acks._start()
        return acks

    async def _start(self) -> None:
        if self._started is None:
            self._started = asyncio.get_running_loop().create_future()
            try:
                prefix = f"{bytes(self.nc._inbox_prefix).decode()}.{self.nc._nuid.next().decode()}."
                table = direct_deliveries(self.nc)
                if table is None:
                    sub = await self.nc.subscribe(prefix + "*", cb=self._on_msg)
                else:
                    sub = await self.nc.subscribe(prefix + "*")
                    table[sub._id] = self._on_raw
                self._prefix = prefix
                self._started.set_result(None)
            except BaseException as e:
                self._started.set_exception(e)
                self._started.exception()  # retrieved: the caller gets it below
                self._started = None
                raise
        await asyncio.shield(self._started)

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def publish(self, subject: str, headers: dict[str, str], body: bytes) -> tuple[str, asyncio.Future[PubAck]]:
        """Queue the message on the connection; (token, future of its PubAck)."""
        nc = self.nc
        if nc.is_closed:
            raise ConnectionClosedError
        if nc.is_draining_pubs:
            raise ConnectionDrainingError
        if subject not in self._good_subjects:  # (nats-py's own check, as it would; once per subject)
            if not subject or any(c in subject for c in " \t\r\n"):
                raise BadSubjectError
            if len(self._good_subjects) < 1024:  # catalogue subjects: a handful per prefix
                self._good_subjects.add(subject)
        token = str(next(self._tokens))
        hdr = header_block(headers)
        size = len(hdr) + len(body)
        if size > nc.max_payload:
            raise PublishError(f"message of {size} bytes is over the server's max_payload {nc.max_payload}")
        if not nc.is_connected and (
            nc._max_pending_size <= 0 or size + nc._pending_data_size > nc._max_pending_size
        ):  # reconnecting, and nats-py's buffer for that is off or full (its own rule)
            raise OutboundBufferLimitError
        fut: asyncio.Future[PubAck] = asyncio.get_running_loop().create_future()
        self._pending[token] = fut
        cmd = b"HPUB %s %s%s %d %d\r\n%s%s\r\n" % (
            subject.encode(),
            self._prefix.encode(),
            token.encode(),
            len(hdr),
            size,
            hdr,
            body,
        )
        await nc._send_command(cmd)
        if nc._flush_queue is not None and nc._flush_queue.empty():
            await nc._flush_pending()
        return token, fut

    def forget(self, tokens: Iterable[str]) -> None:
        for t in tokens:
            self._pending.pop(t, None)

    def _settle(self, token: str, status: str | None, data: bytes) -> None:
        fut = self._pending.pop(token, None)
        if fut is None or fut.done():
            return
        if status == "503" and not data:  # no responders: no stream takes the subject
            fut.set_exception(NoStreamResponseError())
            return
        try:
            r = _decode_reply(data)
        except msgspec.DecodeError as e:
            fut.set_exception(PublishError(f"unreadable PubAck: {e}"))
            return
        if r.error is not None:
            try:
                APIError.from_error(r.error)  # raises the typed error nats-py would
            except Exception as e:
                fut.set_exception(e)
            if not fut.done():
                fut.set_exception(PublishError(f"publish refused: {r.error}"))
            return
        fut.set_result(PubAck(stream=r.stream, seq=r.seq, domain=r.domain, duplicate=r.duplicate))

    async def _on_raw(self, subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> None:
        status = parse_headers(headers)[0] if headers else None
        self._settle(subject[len(self._prefix) :].decode(), status, data)

    async def _on_msg(self, msg: Any) -> None:
        status = (msg.headers or {}).get("Status")
        self._settle(msg.subject[len(self._prefix) :], status, msg.data)


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
        fast: bool = True,
    ):
        self.js = js
        self.content = content  # offloads large content to the Object Store
        self.prefix = prefix
        self.timeout = timeout
        self.max_bytes = max_bytes
        nc = getattr(js, "_nc", None)
        self._nc: Client | None = nc if fast and fast_path(nc) else None

    @property
    def fast(self) -> bool:
        """Whether publishes take :class:`PubAcks` (else nats-py's ``js.publish_async``)."""
        return self._nc is not None

    def subject(self, event: CloudEvent) -> str:
        spec = CATALOGUE.get(event.type)
        if spec is None:
            raise PublishError(f"unknown event type {event.type!r}: add it to contracts.catalogue")
        if not spec.by_origin and not spec.by_callback:
            return spec.subject(self.prefix)
        try:
            return event_subject(event.type, event.data, self.prefix)
        except ValueError as e:
            raise PublishError(f"event {event.id} ({event.type}): {e}") from None

    async def publish(self, event: CloudEvent) -> PubAck:
        return (await self.publish_many([event]))[0]

    async def publish_many(self, events: Iterable[CloudEvent]) -> list[PubAck]:
        """Publish pipelined and wait until JetStream has stored every one."""
        futures: list[asyncio.Future[PubAck]] = []
        tokens: list[str] = []
        acks = await PubAcks.of(self._nc) if self._nc is not None else None
        try:
            for ev in events:
                if self.content is not None:
                    ev = await self.content.offload(ev)
                headers, body = encode_binary(ev)
                if len(body) > self.max_bytes:
                    raise PublishError(f"event {ev.id} ({ev.type}) has {len(body)} bytes, over {self.max_bytes}")
                if acks is not None:
                    token, fut = await acks.publish(self.subject(ev), headers, body)
                    tokens.append(token)
                    futures.append(fut)
                else:
                    futures.append(await self.js.publish_async(self.subject(ev), body, headers=headers))
        except BaseException:
            if acks is not None:  # the ones already sent: nobody will wait for their PubAcks
                acks.forget(tokens)
            raise
        if not futures:
            return []
        # One timer that cancels the PubAck futures, not asyncio.timeout/wait_for around the wait:
        # this is every outcome's path, and the timer is the cheapest of the three.
        expired: list[bool] = []

        def expire() -> None:
            expired.append(True)
            for f in futures:
                f.cancel()

        timer = asyncio.get_running_loop().call_later(self.timeout, expire)
        try:
            if len(futures) == 1:  # the common case (one outcome per message): no gathering future
                return [await futures[0]]
            return list(await asyncio.gather(*futures))
        except asyncio.CancelledError:
            if not expired:
                raise  # our caller was cancelled
            raise PublishError(f"no PubAck within {self.timeout}s") from None
        finally:
            timer.cancel()
            if acks is not None and any(not f.done() or f.cancelled() for f in futures):
                acks.forget(tokens)
