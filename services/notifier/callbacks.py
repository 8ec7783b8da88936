"""Per-request callbacks: a request's ``callback_url`` gets the request's outcome, once, signed.

A generation, artifact or batch request may carry ``callback_url``. Choreography, no
call between services: the notifier learns the callback from the request event itself,
on two durable consumers of the events stream (declared in bus/topology.py):

- ``notifier-callback-requests`` (the three request types): a top-level request with a
  ``callback_url`` is recorded in the state bucket under ``callback.<request id>``
  (:class:`CallbackRecord`; it expires with the bucket's max age);
- ``notifier-callbacks`` (the three outcome types): the outcome of a recorded request is
  POSTed to its URL, exactly like a webhook delivery (:func:`handlers.deliver`: the same
  CloudEvents binary body, signing, ``Idempotency-Key``, retries with backoff, circuit
  breaker, notification_delivered / notification_failed with ``subscription: callback``),
  with one circuit breaker per callback host.

What the outcome of each request is: ``content_generated`` for a generation request
(the one outcome every generation request gets, success or error; ``content_validated``
follows only a success, and its verdict is not the answer to "what did my request
give"), ``artifact_assembled`` for an artifact, ``batch_completed`` for a batch. Items of
a batch and parts of an artifact (``origin`` set) never trigger a callback, only the
top-level outcome.

Outcome seen before its request is recorded. The request is stored in the stream before
its outcome, but the two consumers are not ordered relative to each other. So a miss is
final only when the requests consumer has handled everything up to the outcome's stream
sequence (:class:`bus.progress.ConsumerProgress`: its ack floor, or it is caught up);
otherwise the outcome is retried shortly (0.25 s, later 1 s), counted as a deferral, not
an attempt. The requests consumer reads only the requests that carry a ``callback_url``
(their subjects end with ``.callback``, contracts/catalogue.py): the outcome of a request
without one is settled by that miss, as soon as the consumer is caught up.
One consumer over both kinds would be delivered in stream order, but handled
concurrently (and redelivered out of order), so it would need the same check, and its
deliveries (retries of a dead endpoint) would hold back the recording of requests.

The allow-list is checked again before every send (a request may come from any NATS
client): a refused URL is a notification_failed with code CALLBACK_REFUSED (not dead-
lettered: the request itself is what is wrong) and never a connection attempt.
Callbacks are signed with the secret in the variable named by ``callback_secret_env``
(``CHORA_CALLBACK_SECRET``). With an allow-list and no secret, the notifier does not start
(a clear start-up error).

With no allow-list (the default), callbacks are off and every one is refused at once:
the requests consumer answers a request that carries a ``callback_url`` with its
notification_failed CALLBACK_REFUSED (``event_id`` and ``event_type`` are the request's),
and ``notifier-callbacks`` is neither read nor kept (``chora up``, ``chora nats provision``
and the notifier's start delete it). Reading every outcome only to drop it cost a quarter
of the stack's throughput (docs/performance.md).
"""

from __future__ import annotations

import logging
import random
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol
from urllib.parse import urlsplit

import msgspec

from composition.callbacks import CallbackRefused, check_callback_url
from composition.keys import key_id
from contracts.catalogue import (
    ARTIFACT_ASSEMBLED,
    ARTIFACT_REQUESTED,
    BATCH_COMPLETED,
    BATCH_REQUESTED,
    CONTENT_GENERATED,
    GENERATION_REQUESTED,
)
from contracts.envelope import CloudEvent
from contracts.events import ArtifactRequested, BatchRequested, GenerationRequested
from contracts.handling import Delivery, EventHandlers, Reject, Retry, expect
from services.circuit import CircuitBreaker
from services.notifier.config import Subscription
from services.notifier.delivery import DeliveryResult, WebhookSender
from services.notifier.handlers import SOURCE, Deferrals, Target, deliver, failed_event

log = logging.getLogger("chora.notifier")

CALLBACK = "callback"  # the `subscription` of a callback's notification_delivered / _failed
# the outcome type of each request type
OUTCOME_OF = {
    GENERATION_REQUESTED: CONTENT_GENERATED,
    ARTIFACT_REQUESTED: ARTIFACT_ASSEMBLED,
    BATCH_REQUESTED: BATCH_COMPLETED,
}
REQUESTS: dict[str, type] = {
    GENERATION_REQUESTED: GenerationRequested,
    ARTIFACT_REQUESTED: ArtifactRequested,
    BATCH_REQUESTED: BatchRequested,
}
MAX_BREAKERS = 1024  # callback hosts with a breaker of their own (the allow-list bounds them anyway)


def callback_policy(secret_env: str, max_in_flight: int) -> Subscription:
    """Timeout, attempts, backoff and breaker of callbacks: a subscription's defaults. Its URL is
    never used (every callback names its own)."""
    return Subscription(
        name=CALLBACK,
        events=list(OUTCOME_OF.values()),
        url="http://callback.invalid/",
        secret_env=secret_env,
        max_in_flight=max_in_flight,
    )


def callback_key(request_id: str) -> str:
    return f"callback.{key_id(request_id)}"


class CallbackRecord(msgspec.Struct, kw_only=True):
    url: str
    request_type: str


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(CallbackRecord).decode


class Store(Protocol):
    async def get(self, key: str) -> tuple[bytes, int] | None: ...

    async def put(self, key: str, value: bytes) -> int: ...


class Progress(Protocol):
    async def handled_through(self, seq: int) -> bool: ...


class _ToUrl:
    """The callbacks' sender, bound to one callback URL."""

    def __init__(self, sender: WebhookSender, url: str):
        self.sender, self.url = sender, url

    async def send(self, event: CloudEvent) -> DeliveryResult:
        return await self.sender.send(event, self.url)

    async def close(self) -> None:
        pass


@dataclass
class CallbackDeps:
    """The callbacks' dependencies. ``store`` and ``progress`` come from the bus on start;
    ``sender`` is None while callbacks are off (no allow-list)."""

    policy: Subscription
    allow: list[str] = field(default_factory=list)
    store: Store | None = None
    progress: Progress | None = None
    sender: WebhookSender | None = None
    on_transition: Callable[[str, str, str], None] | None = None
    breakers: OrderedDict[str, CircuitBreaker] = field(default_factory=OrderedDict)
    deferrals: Deferrals = field(default_factory=Deferrals)
    rng: random.Random = field(default_factory=random.Random)
    source: str = SOURCE
    stats: dict[str, int] = field(
        default_factory=lambda: {"delivered": 0, "retried": 0, "failed": 0, "deferred": 0, "skipped": 0, "refused": 0}
    )

    def breaker(self, url: str) -> CircuitBreaker:
        parts = urlsplit(url)
        host = f"{parts.scheme}://{parts.hostname}:{parts.port or ''}"
        circuit = self.breakers.pop(host, None)
        if circuit is None:
            on = self.on_transition
            circuit = CircuitBreaker(
                self.policy.circuit,
                busy_retry_s=self.policy.timeout_s,
                on_transition=(lambda frm, to: on(f"{CALLBACK}:{host}", frm, to)) if on else None,
            )
        self.breakers[host] = circuit  # most recently used last
        while len(self.breakers) > MAX_BREAKERS:
            self.breakers.popitem(last=False)
        return circuit

    def target(self, url: str) -> Target:
        assert self.sender is not None
        return Target(
            self.policy,
            _ToUrl(self.sender, url),
            self.breaker(url),
            rng=self.rng,
            deferrals=self.deferrals,
            source=self.source,
            stats=self.stats,
        )


def _bus(deps: CallbackDeps) -> tuple[Store, Progress]:
    if deps.store is None or deps.progress is None:
        raise Retry("callbacks: the notifier has not started")
    return deps.store, deps.progress


async def record_callback(event: CloudEvent, delivery: Delivery, deps: CallbackDeps) -> list[CloudEvent]:
    """A top-level request with a ``callback_url``: remember it for its outcome."""
    data: Any = expect(event, event.type, REQUESTS[event.type], "notifier")
    url = getattr(data, "callback_url", None)
    if getattr(data, "origin", None) is not None:
        return []
    if not deps.allow:  # callbacks off: refused now (the outcomes are not read at all)
        try:
            if url:
                check_callback_url(url, deps.allow)  # (raises: no entry admits anything)
        except CallbackRefused as e:
            return [_refused(event, deps, str(e))]
        return []
    if not url:  # (on a .callback subject without one: nothing to record)
        return []
    store, _ = _bus(deps)
    await store.put(callback_key(event.id), _encode(CallbackRecord(url=url, request_type=event.type)))
    return []


def _request_id(event: CloudEvent) -> str | None:
    data = event.data
    if getattr(data, "origin", None) is not None:
        return None  # an item of a batch or a part of an artifact: never a callback
    rid = getattr(data, "batch_id" if event.type == BATCH_COMPLETED else "request_id", None)
    return rid if isinstance(rid, str) and rid else None


def _refused(event: CloudEvent, deps: CallbackDeps, reason: str) -> CloudEvent:
    """Not dead-lettered: the request is what is wrong, a replay would be refused again."""
    deps.stats["refused"] += 1
    return failed_event(event, deps.policy, deps.source, 0, "CALLBACK_REFUSED", reason, dead_lettered=False)


async def deliver_callback(event: CloudEvent, d: Delivery, deps: CallbackDeps) -> list[CloudEvent]:
    """The outcome of a recorded request: POST it to the request's callback (see the module docstring)."""
    request_id = _request_id(event)
    if request_id is None:
        return []
    store, progress = _bus(deps)
    found = await store.get(callback_key(request_id))
    if found is None:
        if await progress.handled_through(d.stream_seq):
            deps.deferrals.forget(d.stream_seq)
            return []  # its request asked for no callback (or is not one of ours)
        if d.last:
            deps.deferrals.forget(d.stream_seq)
            raise Reject(
                "CALLBACK_LOOKUP_TIMEOUT",
                f"request {request_id!r} of this outcome was still not handled by the requests consumer",
            )
        n = deps.deferrals.add(d.stream_seq)
        deps.stats["deferred"] += 1
        raise Retry(f"callbacks: request {request_id!r} not recorded yet", delay=0.25 if n < 8 else 1.0)
    record = _decode(found[0])
    if OUTCOME_OF.get(record.request_type) != event.type:
        log.warning("callback of %s is for a %s, not %s: ignored", request_id, record.request_type, event.type)
        return []
    try:
        check_callback_url(record.url, deps.allow)
    except CallbackRefused as e:
        deps.deferrals.forget(d.stream_seq)
        return [_refused(event, deps, str(e))]
    if deps.sender is None:  # no secret: only possible with callbacks off, refused above
        return [_refused(event, deps, "callbacks have no signing secret")]
    return await deliver(event, d, deps.target(record.url))


CALLBACK_HANDLERS: EventHandlers[CallbackDeps] = {
    **{t: record_callback for t in REQUESTS},
    **{t: deliver_callback for t in OUTCOME_OF.values()},
}


def describe(deps: CallbackDeps) -> dict[str, Any]:
    """For the readiness file and discovery info."""
    return {"allow": list(deps.allow), "on": deps.sender is not None, "hosts": len(deps.breakers), **deps.stats}
