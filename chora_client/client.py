"""The client: connect, request and await outcomes, follow outcomes with a durable consumer."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from contracts.catalogue import (
    ARTIFACT_ASSEMBLED,
    ARTIFACT_REQUESTED,
    BATCH_COMPLETED,
    BATCH_REQUESTED,
    CANCEL_REQUESTED,
    CATALOGUE,
    CONTENT_GENERATED,
    CONTENT_VALIDATED,
    GENERATION_REQUESTED,
    events_stream,
    event_subject,
    subjects_for,
)
from contracts.cancels import cancel_request
from contracts.envelope import CloudEvent, EnvelopeError, decode, encode_binary, new_event
from contracts.events import (
    ArtifactAssembled,
    ArtifactRequested,
    BatchCompleted,
    BatchItem,
    BatchRequested,
    ContentGenerated,
    ContentValidated,
    GenerationRequested,
)
from contracts.tracing import child_traceparent, parse_traceparent

OUTCOMES = (CONTENT_GENERATED, CONTENT_VALIDATED, ARTIFACT_ASSEMBLED, BATCH_COMPLETED)
REF_PREFIX = "obj://"
MAX_EVENT_BYTES = 1 << 20


class ChoraClientError(Exception):
    """Anything the client cannot do: a missing stream, a refused publish, content that is gone."""


class OutcomeTimeout(ChoraClientError, TimeoutError):
    """No outcome within the timeout. The request stays queued: it may still be handled later."""

    def __init__(self, request: CloudEvent, waiting_for: str, timeout: float):
        super().__init__(
            f"no {waiting_for} for {request.type} {request.id} within {timeout}s "
            "(are the services running? the request stays queued and may still be handled)"
        )
        self.request, self.waiting_for, self.timeout = request, waiting_for, timeout


@dataclass(frozen=True)
class GenerationResult:
    """The outcome of :meth:`ChoraClient.generate`. ``validated`` is None when the generation
    failed (nothing to validate) or when ``validate=False`` was asked."""

    request: CloudEvent
    generated: ContentGenerated
    validated: ContentValidated | None
    content: str | None  # the content, fetched from the Object Store when it came by reference
    trace_id: str | None
    traceparent: str | None

    @property
    def ok(self) -> bool:
        """Generated, and valid when it was validated."""
        return self.generated.status == "success" and (self.validated is None or self.validated.valid)


@dataclass(frozen=True)
class ArtifactResult:
    request: CloudEvent
    assembled: ArtifactAssembled
    content: str | None
    trace_id: str | None
    traceparent: str | None

    @property
    def ok(self) -> bool:
        return self.assembled.status == "success"


@dataclass(frozen=True)
class BatchResult:
    request: CloudEvent
    completed: BatchCompleted
    trace_id: str | None
    traceparent: str | None

    @property
    def ok(self) -> bool:
        return self.completed.status == "success" and self.completed.failed == 0


@dataclass
class _Waiter:
    done: Callable[[dict[str, CloudEvent]], bool]
    got: dict[str, CloudEvent] = field(default_factory=dict)
    future: asyncio.Future[dict[str, CloudEvent]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


def _request_id(event: CloudEvent) -> str | None:
    """The id of the request an outcome answers."""
    if isinstance(event.data, BatchCompleted):
        return event.data.batch_id
    value = getattr(event.data, "request_id", None)
    return value if isinstance(value, str) else None


def tls_context(ca: str | None = None, cert: str | None = None, key: str | None = None) -> ssl.SSLContext:
    """A client TLS context: trust ``ca`` (else the system's CAs), present ``cert``/``key`` if given."""
    ctx = ssl.create_default_context(cafile=ca)
    if cert:
        ctx.load_cert_chain(cert, key)
    return ctx


class ChoraClient:
    """A connection to chora over NATS. Build it with :meth:`connect` (or around a connection
    of your own: ``ChoraClient(nc)``, which then stays yours to close); use it as an async
    context manager or call :meth:`close`.

    Requests are CloudEvents in binary mode (``ce-*`` headers, JSON data, ``Nats-Msg-Id`` =
    the event id, so a retried publish is stored once). Their outcomes are awaited through
    one subscription (an ephemeral consumer on the events stream, started before the first
    publish) that hands each outcome to the request it answers.
    """

    def __init__(self, nc: Client, *, prefix: str = "chora", source: str = "urn:chora-client", own: bool = False):
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream()
        self.prefix = prefix
        self.source = source
        self.stream = events_stream(prefix)
        self._own = own
        self._waiters: dict[str, _Waiter] = {}
        self._sub: Any = None
        self._sub_lock = asyncio.Lock()

    @classmethod
    async def connect(
        cls,
        servers: str | Sequence[str] = "nats://127.0.0.1:4222",
        *,
        prefix: str = "chora",
        source: str = "urn:chora-client",
        creds: str | None = None,
        user: str | None = None,
        password: str | None = None,
        token: str | None = None,
        tls: ssl.SSLContext | None = None,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        **nats_options: Any,
    ) -> "ChoraClient":
        """Connect to NATS. ``creds`` (a .creds file), ``user``/``password``, ``token`` and TLS
        (an ``ssl.SSLContext``, or the CA/cert/key files) go to ``nats.connect`` with any
        other option of it (``name``, ``max_reconnect_attempts``, ``inbox_prefix``, ...)."""
        options: dict[str, Any] = {"servers": [servers] if isinstance(servers, str) else list(servers)}
        if creds:
            options["user_credentials"] = creds
        if user:
            options["user"], options["password"] = user, password or ""
        if token:
            options["token"] = token
        if tls is None and (tls_ca or tls_cert):
            tls = tls_context(tls_ca, tls_cert, tls_key)
        if tls is not None:
            options["tls"] = tls
        options.setdefault("name", "chora-client")
        options.update(nats_options)
        return cls(await nats.connect(**options), prefix=prefix, source=source, own=True)

    async def __aenter__(self) -> "ChoraClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop the outcome subscription; close the connection if :meth:`connect` made it."""
        for waiter in self._waiters.values():
            if not waiter.future.done():
                waiter.future.cancel()
        self._waiters.clear()
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception:  # closed or disconnected already
                pass
            self._sub = None
        if self._own and not self.nc.is_closed:
            await self.nc.drain()

    # ------------------------------------------------------------------ requests
    def new_request(
        self,
        event_type: str,
        data: msgspec.Struct,
        *,
        trace_id: str | None = None,
        traceparent: str | None = None,
    ) -> CloudEvent:
        """A request event. ``traceparent`` (W3C, e.g. your current span's) makes the request a
        child span of it, in its trace; ``trace_id`` names the trace otherwise (new if None)."""
        parent = parse_traceparent(traceparent) if traceparent else None
        if traceparent and parent is None:
            raise ValueError(f"traceparent {traceparent!r} is not W3C (00-<32 hex>-<16 hex>-<2 hex>)")
        event = new_event(event_type, data, source=self.source, trace_id=trace_id or (parent[0] if parent else None))
        if traceparent:
            event.traceparent = child_traceparent(event.traceid or "", traceparent)
        return event

    async def publish(self, event: CloudEvent) -> None:
        """Publish a request to its subject; a JetStream error (no stream, no permission) raises."""
        headers, body = encode_binary(event)
        try:
            await self.js.publish(event_subject(event.type, event.data, self.prefix), body, headers=headers)
        except Exception as e:
            raise ChoraClientError(f"cannot publish {event.type} {event.id}: {type(e).__name__}: {e}") from e

    async def request(
        self,
        event: CloudEvent,
        outcomes: Sequence[str],
        timeout: float,
        done: Callable[[dict[str, CloudEvent]], bool] | None = None,
    ) -> dict[str, CloudEvent]:
        """Publish ``event`` and collect its outcomes (type -> event) until ``done`` (default:
        one of each type in ``outcomes``); :class:`OutcomeTimeout` past ``timeout`` seconds."""
        wanted = set(outcomes)
        waiter = _Waiter(done or (lambda got: wanted <= set(got)))
        await self._subscribe()
        self._waiters[event.id] = waiter
        try:
            await self.publish(event)
            return await asyncio.wait_for(waiter.future, timeout)
        except asyncio.TimeoutError:
            missing = [t for t in outcomes if t not in waiter.got] or list(outcomes)
            raise OutcomeTimeout(event, " and ".join(missing), timeout) from None
        finally:
            self._waiters.pop(event.id, None)

    async def generate(
        self,
        config_id: str,
        context: Mapping[str, Any] | None = None,
        *,
        validate: bool = True,
        no_cache: bool = False,
        callback_url: str | None = None,
        trace_id: str | None = None,
        traceparent: str | None = None,
        timeout: float = 30.0,
    ) -> GenerationResult:
        """Render ``config_id`` and wait for ``content_generated`` and (``validate``, and when it
        succeeded) ``content_validated``."""
        data = GenerationRequested(
            content_config_id=config_id, context=dict(context or {}), no_cache=no_cache, callback_url=callback_url
        )
        event = self.new_request(GENERATION_REQUESTED, data, trace_id=trace_id, traceparent=traceparent)

        def done(got: dict[str, CloudEvent]) -> bool:
            gen = got.get(CONTENT_GENERATED)
            return gen is not None and (not validate or gen.data.status != "success" or CONTENT_VALIDATED in got)

        got = await self.request(
            event, [CONTENT_GENERATED, CONTENT_VALIDATED] if validate else [CONTENT_GENERATED], timeout, done
        )
        generated = got[CONTENT_GENERATED]
        out: ContentGenerated = generated.data
        content = out.content
        if content is None and out.content_ref:
            content = await self.fetch_content(out.content_ref)
        validated = got.get(CONTENT_VALIDATED)
        return GenerationResult(
            event, out, validated.data if validated else None, content, generated.traceid, generated.traceparent
        )

    async def assemble(
        self,
        artifact_id: str,
        context: Mapping[str, Any] | None = None,
        *,
        callback_url: str | None = None,
        trace_id: str | None = None,
        traceparent: str | None = None,
        timeout: float = 60.0,
    ) -> ArtifactResult:
        """Assemble ``artifact_id`` from its parts and wait for ``artifact_assembled``."""
        data = ArtifactRequested(artifact_id=artifact_id, context=dict(context or {}), callback_url=callback_url)
        event = self.new_request(ARTIFACT_REQUESTED, data, trace_id=trace_id, traceparent=traceparent)
        assembled = (await self.request(event, [ARTIFACT_ASSEMBLED], timeout))[ARTIFACT_ASSEMBLED]
        out: ArtifactAssembled = assembled.data
        content = out.content
        if content is None and out.content_ref and out.status == "success":
            content = await self.fetch_content(out.content_ref)
        return ArtifactResult(event, out, content, assembled.traceid, assembled.traceparent)

    async def run_batch(
        self,
        items: Sequence[BatchItem | Mapping[str, Any]],
        context: Mapping[str, Any] | None = None,
        *,
        continue_on_error: bool = True,
        callback_url: str | None = None,
        trace_id: str | None = None,
        traceparent: str | None = None,
        timeout: float = 300.0,
    ) -> BatchResult:
        """Generate every item (``{"content_config_id": ..., "context": {...}}`` or a
        :class:`BatchItem`) as one batch and wait for ``batch_completed``."""
        data = msgspec.convert(
            {
                "items": [msgspec.to_builtins(i) if isinstance(i, BatchItem) else dict(i) for i in items],
                "context": dict(context or {}),
                "continue_on_error": continue_on_error,
                "callback_url": callback_url,
            },
            BatchRequested,
        )
        event = self.new_request(BATCH_REQUESTED, data, trace_id=trace_id, traceparent=traceparent)
        completed = (await self.request(event, [BATCH_COMPLETED], timeout))[BATCH_COMPLETED]
        return BatchResult(event, completed.data, completed.traceid, completed.traceparent)

    async def cancel(
        self,
        kind: str,
        id: str,
        reason: str | None = None,
        *,
        trace_id: str | None = None,
        traceparent: str | None = None,
    ) -> CloudEvent:
        """Ask the assembler to cancel a run under way: ``kind`` "batch" (``id`` its batch id) or
        "artifact" (the artifact request's id). Returns the published ``chora.cancel.requested``
        at once; the run's completion (``batch_completed`` / ``artifact_assembled``, e.g. through
        :meth:`outcomes`) says ``cancelled`` unless it completed first. Its id is derived from
        the run, so asking twice is one request. ValueError for a bad kind, id or reason."""
        asked = cancel_request(kind, id, reason, source=self.source)  # validated, with its derived id
        event = self.new_request(CANCEL_REQUESTED, asked.data, trace_id=trace_id, traceparent=traceparent)
        event.id = asked.id
        await self.publish(event)
        return event

    async def fetch_content(self, ref: str) -> str:
        """The text an ``obj://<bucket>/<name>`` reference names (content too large to travel inline)."""
        if not ref.startswith(REF_PREFIX) or "/" not in ref[len(REF_PREFIX) :]:
            raise ChoraClientError(f"{ref!r} is not an obj://<bucket>/<name> reference")
        bucket, name = ref[len(REF_PREFIX) :].split("/", 1)
        try:
            got = await (await self.js.object_store(bucket)).get(name)
        except Exception as e:
            raise ChoraClientError(
                f"content {ref} cannot be read (expired or deleted?): {type(e).__name__}: {e}"
            ) from e
        return (got.data or b"").decode("utf-8")

    # ------------------------------------------------------------------ the outcome subscription
    async def _subscribe(self) -> None:
        async with self._sub_lock:
            if self._sub is not None:
                return
            subjects = [s for t in OUTCOMES for s in subjects_for(t, self.prefix)]
            config = ConsumerConfig(
                ack_policy=AckPolicy.NONE,
                deliver_policy=DeliverPolicy.NEW,
                filter_subjects=subjects,
                mem_storage=True,
                num_replicas=1,
                inactive_threshold=60.0,
            )
            try:
                self._sub = await self.js.subscribe(
                    subjects[0], stream=self.stream, cb=self._dispatch, manual_ack=True, config=config
                )
            except Exception as e:
                raise ChoraClientError(
                    f"cannot follow the outcomes in stream {self.stream} (prefix {self.prefix!r}): "
                    f"{type(e).__name__}: {e}"
                ) from e

    async def _dispatch(self, msg: Msg) -> None:
        try:
            event = decode(msg.headers, msg.data, max_bytes=MAX_EVENT_BYTES)
        except EnvelopeError:
            return  # not ours to judge: the services dead-letter malformed events
        waiter = self._waiters.get(_request_id(event) or "")
        if waiter is None or event.type in waiter.got:
            return
        waiter.got[event.type] = event
        if waiter.done(waiter.got) and not waiter.future.done():
            waiter.future.set_result(dict(waiter.got))

    # ------------------------------------------------------------------ durable outcomes
    async def outcomes(
        self,
        durable: str,
        event_types: Sequence[str] = OUTCOMES,
        *,
        start: str = "new",
        batch: int = 64,
    ) -> "OutcomeStream":
        """A durable consumer ``durable`` of ``event_types`` (created if missing, with
        ``start`` ``new`` or ``all``): what is published while you are away waits for you.
        Iterate it with ``async for event in stream``; see :class:`OutcomeStream`."""
        unknown = [t for t in event_types if t not in CATALOGUE]
        if unknown:
            raise ValueError(f"unknown event types: {', '.join(unknown)}")
        config = ConsumerConfig(
            durable_name=durable,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL if start == "all" else DeliverPolicy.NEW,
            filter_subjects=[s for t in event_types for s in subjects_for(t, self.prefix)],
        )
        try:
            try:
                await self.js.consumer_info(self.stream, durable)
            except NotFoundError:
                await self.js.add_consumer(self.stream, config)
            sub = await self.js.pull_subscribe_bind(durable, self.stream)
        except Exception as e:
            raise ChoraClientError(
                f"cannot open durable consumer {durable} on {self.stream}: {type(e).__name__}: {e}"
            ) from e
        return OutcomeStream(sub, batch)


class OutcomeStream:
    """Typed events from a durable consumer: ``event.data`` is the payload Struct of
    ``event.type`` (e.g. :class:`~contracts.events.ContentGenerated`), ``event.traceparent``
    its trace context. A message is acknowledged when the loop asks for the next one, that
    is once your loop body has run: leave the loop (``break``, an exception) and the event
    you were handling is delivered again later. A message that is not a valid chora event
    is terminated. Call :meth:`close` (or use ``async with``) when done."""

    def __init__(self, sub: Any, batch: int):
        self._sub, self._batch = sub, batch
        self._buffer: list[Msg] = []
        self._current: Msg | None = None

    def __aiter__(self) -> AsyncIterator[CloudEvent]:
        return self

    async def __anext__(self) -> CloudEvent:
        if self._current is not None:
            await self._current.ack()
            self._current = None
        while True:
            if not self._buffer:
                try:
                    self._buffer = await self._sub.fetch(self._batch, timeout=5)
                except NatsTimeout:
                    continue
            msg = self._buffer.pop(0)
            try:
                event = decode(msg.headers, msg.data, max_bytes=MAX_EVENT_BYTES)
            except EnvelopeError:
                await msg.term()
                continue
            self._current = msg
            return event

    async def next(self, timeout: float) -> CloudEvent:
        """The next event within ``timeout`` seconds (``asyncio.TimeoutError`` otherwise)."""
        return await asyncio.wait_for(self.__anext__(), timeout)

    async def __aenter__(self) -> "OutcomeStream":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop reading; the event being handled (not acknowledged) and any fetched ahead are
        delivered again after the consumer's ack wait."""
        try:
            await self._sub.unsubscribe()
        except Exception:
            pass
