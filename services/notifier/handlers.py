"""The notifier's handler: one event, one subscription, one delivery attempt.

A plain async function of (event, delivery, :class:`Deps`): it never touches
NATS. The consumer loop runs it once per delivery of each subscription's
durable consumer ``notify-<name>``; the delivery's consumer names the
subscription (its :class:`Target` in ``deps.targets``). The loop settles the
message from what it returns or raises:

- the event is not for this subscription (type, filters, a notification
  about a notification): ``[]`` (ack); a replay meant for another consumer
  never gets here (the consumer loop acks it);
- 2xx: ``[notification_delivered]`` (ack);
- transient failure: :class:`~contracts.handling.Retry` with the backoff delay for
  this attempt, or the endpoint's ``Retry-After`` (both capped at
  ``backoff.max_s``): nak with that delay;
- permanent failure (other 4xx), or the last attempt failed:
  :class:`~contracts.handling.Reject` carrying ``[notification_failed]`` (published),
  then the message goes to the dead-letter stream with the reason;
- the circuit is open: :class:`Retry` after the time left until half-open,
  without calling the endpoint.

Attempts and circuit deferrals. The consumer counts deliveries, and a
delivery put off by an open circuit would otherwise use up one of the
``max_attempts``: a short outage would dead-letter events that were never
really tried. So the consumer's ``max_deliver`` is ``max_attempts +
circuit.max_deferrals``, and the handler counts the deliveries it deferred
per message (by stream sequence, in memory): the real attempt number is the
delivery number minus the deferrals. After ``max_attempts`` real attempts, or
on the consumer's very last delivery whatever the reason, the event is
dead-lettered with a ``notification_failed``. After a restart the deferral
counts are gone, so the next attempts count as later ones: fewer retries,
never more (still bounded by ``max_deliver``).

Output ids are derived from (event id, type, subscription): a redelivered
event that is handled again publishes the same id and JetStream drops it.
"""

from __future__ import annotations

import logging
import random
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field

from contracts.catalogue import NOTIFICATION_DELIVERED, NOTIFICATION_FAILED
from contracts.envelope import CloudEvent, new_event
from contracts.events import ErrorInfo, NotificationDelivered, NotificationFailed
from contracts.handling import ANY, Delivery, EventHandlers, Reject, Retry
from services.circuit import CircuitBreaker, CircuitOpen
from services.notifier.config import NOTIFICATION_TYPES, Subscription
from services.notifier.delivery import Sender, UndeliverableEvent, backoff_delay

log = logging.getLogger("chora.notifier")

SOURCE = "chora://notifier"
_ID_NAMESPACE = uuid.UUID("2b0f8f4e-1c55-4f0e-8d7a-6a1f3c2d9e41")
MAX_TRACKED = 100_000


class Deferrals:
    """How many deliveries of each message (by stream sequence) an open circuit put off."""

    def __init__(self, max_entries: int = MAX_TRACKED):
        self.max_entries = max_entries
        self._counts: OrderedDict[int, int] = OrderedDict()

    def get(self, seq: int) -> int:
        return self._counts.get(seq, 0)

    def add(self, seq: int) -> int:
        n = self._counts.pop(seq, 0) + 1
        self._counts[seq] = n
        while len(self._counts) > self.max_entries:
            self._counts.popitem(last=False)
        return n

    def forget(self, seq: int) -> None:
        self._counts.pop(seq, None)

    def __len__(self) -> int:
        return len(self._counts)


@dataclass
class Target:
    """Everything the handler needs for one subscription."""

    subscription: Subscription
    sender: Sender
    circuit: CircuitBreaker
    rng: random.Random = field(default_factory=random.Random)
    deferrals: Deferrals = field(default_factory=Deferrals)
    source: str = SOURCE
    stats: dict[str, int] = field(
        default_factory=lambda: {"delivered": 0, "retried": 0, "failed": 0, "deferred": 0, "skipped": 0}
    )

    @property
    def max_deliver(self) -> int:
        return self.subscription.max_attempts + self.subscription.circuit.max_deferrals


@dataclass
class Deps:
    """The notifier's dependencies: the :class:`Target` of each subscription, by its durable consumer."""

    targets: dict[str, Target] = field(default_factory=dict)


def wants(event: CloudEvent, sub: Subscription) -> bool:
    """Whether ``event`` is to be delivered to ``sub``."""
    if not sub.matches(event.type, event.data):
        return False
    if event.type in NOTIFICATION_TYPES and getattr(event.data, "event_type", None) in NOTIFICATION_TYPES:
        return False  # a notification about a notification: stop there, never a loop
    return True


def _output_id(event: CloudEvent, event_type: str, sub: Subscription) -> str:
    return str(uuid.uuid5(_ID_NAMESPACE, f"{event.id}/{event_type}/{sub.name}"))


def _delivered(event: CloudEvent, t: Target, attempt: int, status: int, duration_ms: float) -> CloudEvent:
    data = NotificationDelivered(
        subscription=t.subscription.name,
        event_id=event.id,
        event_type=event.type,
        attempts=attempt,
        status_code=status,
        duration_ms=duration_ms,
    )
    return new_event(
        NOTIFICATION_DELIVERED,
        data,
        source=t.source,
        cause=event,
        event_id=_output_id(event, NOTIFICATION_DELIVERED, t.subscription),
    )


def failed_event(
    event: CloudEvent, sub: Subscription, source: str, attempts: int, code: str, message: str, *, dead_lettered: bool
) -> CloudEvent:
    """The notification_failed of ``event`` for ``sub`` (its id derived: a redelivery repeats it)."""
    data = NotificationFailed(
        subscription=sub.name,
        event_id=event.id,
        event_type=event.type,
        attempts=attempts,
        error=ErrorInfo(code=code, message=message),
        dead_lettered=dead_lettered,
    )
    return new_event(
        NOTIFICATION_FAILED, data, source=source, cause=event, event_id=_output_id(event, NOTIFICATION_FAILED, sub)
    )


def _failed(event: CloudEvent, t: Target, attempts: int, code: str, message: str) -> Reject:
    ev = failed_event(event, t.subscription, t.source, attempts, code, message, dead_lettered=True)
    t.stats["failed"] += 1
    return Reject(code, f"subscription {t.subscription.name}: {message}", events=[ev])


async def notify(event: CloudEvent, delivery: Delivery, deps: Deps) -> list[CloudEvent]:
    """Deliver ``event`` to the subscription of ``delivery.consumer`` once; see the module docstring."""
    t = deps.targets.get(delivery.consumer)
    if t is None:
        raise Reject("NOT_ROUTED", f"no subscription consumes through {delivery.consumer!r} (notify-<name>)")
    return await deliver(event, delivery, t)


async def deliver(event: CloudEvent, d: Delivery, t: Target) -> list[CloudEvent]:
    """Deliver ``event`` to ``t.subscription`` once (``d``: this delivery of it)."""
    sub = t.subscription
    if not wants(event, sub):
        t.stats["skipped"] += 1
        return []
    attempt = max(1, d.attempt - t.deferrals.get(d.stream_seq))
    try:
        permit = t.circuit.acquire()
    except CircuitOpen as e:
        if d.last:
            t.deferrals.forget(d.stream_seq)
            raise _failed(
                event,
                t,
                attempt - 1,
                "CIRCUIT_OPEN",
                f"the endpoint's circuit stayed open through {d.attempt} deliveries ({attempt - 1} attempts made)",
            ) from None
        t.deferrals.add(d.stream_seq)
        t.stats["deferred"] += 1
        raise Retry(f"subscription {sub.name}: circuit {e.state}", delay=e.retry_in) from None

    try:
        result = await t.sender.send(event)
    except UndeliverableEvent as e:
        t.circuit.release(permit)
        t.deferrals.forget(d.stream_seq)
        raise _failed(event, t, attempt, "UNDELIVERABLE_EVENT", str(e)) from None
    except BaseException:
        t.circuit.release(permit)
        raise

    if result.ok:
        t.circuit.success(permit)
        t.deferrals.forget(d.stream_seq)
        t.stats["delivered"] += 1
        return [_delivered(event, t, attempt, result.status_code or 0, result.duration_ms)]

    if result.endpoint_failed:
        t.circuit.failure(permit)
    else:
        t.circuit.success(permit)  # it answered: the endpoint is up, it just refuses this event

    if result.outcome == "permanent":
        t.deferrals.forget(d.stream_seq)
        raise _failed(event, t, attempt, "WEBHOOK_REJECTED", f"{result.code}: {result.message}")
    if attempt >= sub.max_attempts or d.last:
        t.deferrals.forget(d.stream_seq)
        raise _failed(
            event,
            t,
            attempt,
            "MAX_ATTEMPTS",
            f"gave up after {attempt} attempts; last: {result.code}: {result.message}",
        )
    if result.retry_after_s is not None:
        delay = min(result.retry_after_s, sub.backoff.max_s)
    else:
        delay = backoff_delay(attempt, sub.backoff, t.rng)
    t.stats["retried"] += 1
    raise Retry(f"subscription {sub.name}: attempt {attempt} failed: {result.code}: {result.message}", delay=delay)


EVENT_HANDLERS: EventHandlers[Deps] = {ANY: notify}
