"""The notifier's handler on its own: no NATS, no HTTP (a scripted sender stands in for the POST)."""

from __future__ import annotations

import random

import pytest

from contracts.handling import Delivery, Reject, Retry
from contracts.catalogue import CONTENT_GENERATED, NOTIFICATION_DELIVERED, NOTIFICATION_FAILED
from contracts.envelope import CloudEvent, new_event
from contracts.events import ContentGenerated, ErrorInfo, NotificationDelivered, NotificationFailed
from services.notifier.circuit import CLOSED, OPEN, CircuitBreaker
from services.notifier.config import parse_config
from services.notifier.delivery import DeliveryResult
from services.notifier import handlers
from services.notifier.handlers import Deps, Target

CONFIG = """
subscriptions:
  - name: hook
    events: [chora.content_generated, chora.notification_failed]
    filters: {status: [error]}
    url: http://127.0.0.1:9/
    secret_env: S
    max_attempts: 3
    backoff: {initial_s: 1, max_s: 8, multiplier: 2, jitter: 0}
    circuit: {failure_threshold: 2, reset_timeout_s: 10, max_deferrals: 4}
"""

DELIVERED = DeliveryResult("delivered", 204, 3.5)
UNAVAILABLE = DeliveryResult("transient", 503, 1.0, "HTTP_503", "HTTP 503: busy")
LIMITED = DeliveryResult("transient", 429, 1.0, "HTTP_429", "HTTP 429", retry_after_s=3600.0)
REFUSED = DeliveryResult("permanent", 404, 1.0, "HTTP_404", "HTTP 404: no such hook")


class ScriptedSender:
    def __init__(self, *results: DeliveryResult):
        self.results = list(results)
        self.sent: list[CloudEvent] = []

    async def send(self, event: CloudEvent) -> DeliveryResult:
        self.sent.append(event)
        return self.results.pop(0)


class Clock:
    t = 0.0

    def __call__(self) -> float:
        return self.t


def target(*results: DeliveryResult, clock=None, name_suffix: str = "") -> Target:
    sub = parse_config(CONFIG).subscriptions[0]
    if name_suffix:
        sub = sub.model_copy(update={"name": sub.name + name_suffix})
    return Target(
        sub, ScriptedSender(*results), CircuitBreaker(sub.circuit, clock=clock or Clock()), rng=random.Random(1)
    )


def failed_generation(**kw) -> CloudEvent:
    return new_event(
        CONTENT_GENERATED,
        ContentGenerated(request_id="r1", content_config_id="hello-world", status=kw.pop("status", "error")),
        source="chora://generator",
    )


_deliveries: dict[int, Delivery] = {}  # the delivery each target's next notify() handles


@pytest.fixture(autouse=True)
def _fresh_deliveries():
    _deliveries.clear()


def on_delivery(attempt: int, t: Target, seq: int = 7) -> None:
    _deliveries[id(t)] = Delivery(attempt, t.max_deliver, t.subscription.durable, seq)


async def notify(event: CloudEvent, t: Target) -> list[CloudEvent]:
    """The handler as the consumer loop calls it: the delivery given by on_delivery(), else a first one."""
    d = _deliveries.get(id(t)) or Delivery(1, t.max_deliver, t.subscription.durable, 0)
    return await handlers.notify(event, d, Deps({t.subscription.durable: t}))


async def test_delivered_yields_notification_delivered_with_a_stable_id():
    t = target(DELIVERED, DELIVERED)
    ev = failed_generation()
    out = await notify(ev, t)
    assert [o.type for o in out] == [NOTIFICATION_DELIVERED]
    data = out[0].data
    assert isinstance(data, NotificationDelivered)
    assert (data.subscription, data.event_id, data.event_type, data.attempts, data.status_code) == (
        "hook",
        ev.id,
        CONTENT_GENERATED,
        1,
        204,
    )
    assert out[0].traceid == ev.traceid
    again = await notify(ev, t)  # a redelivery handled again: same id, JetStream drops the re-publish
    assert again[0].id == out[0].id
    other = target(DELIVERED, name_suffix="-2")
    assert (await notify(ev, other))[0].id != out[0].id  # but another subscription's is its own


async def test_events_not_for_the_subscription_are_acked_without_a_call():
    t = target()
    assert await notify(failed_generation(status="success"), t) == []  # filtered out by status
    # (a replay meant for another consumer never reaches a handler: bus/consumer.py skips it)
    loop = new_event(
        NOTIFICATION_FAILED,
        NotificationFailed(
            subscription="x",
            event_id="e",
            event_type=NOTIFICATION_FAILED,
            attempts=1,
            error=ErrorInfo(code="C", message="m"),
        ),
        source="t",
    )
    assert await notify(loop, t) == []  # a notification about a notification: never delivered
    assert t.sender.sent == [] and t.stats["skipped"] == 2


async def test_transient_failure_retries_with_backoff_then_gives_up_on_the_last_attempt():
    t = target(UNAVAILABLE, UNAVAILABLE, UNAVAILABLE)
    ev = failed_generation()
    on_delivery(1, t)
    with pytest.raises(Retry) as r:
        await notify(ev, t)
    assert r.value.delay == 1.0
    on_delivery(2, t)
    with pytest.raises(Retry) as r:
        await notify(ev, t)
    assert r.value.delay == 2.0
    assert t.circuit.state == OPEN  # failure_threshold 2


async def test_last_attempt_rejects_with_notification_failed():
    t = target(UNAVAILABLE)
    ev = failed_generation()
    on_delivery(3, t)  # attempt 3 of max_attempts 3
    with pytest.raises(Reject) as r:
        await notify(ev, t)
    assert r.value.code == "MAX_ATTEMPTS"
    [failed] = r.value.events
    assert failed.type == NOTIFICATION_FAILED
    d = failed.data
    assert (d.subscription, d.event_id, d.attempts, d.dead_lettered, d.error.code) == (
        "hook",
        ev.id,
        3,
        True,
        "MAX_ATTEMPTS",
    )
    assert "HTTP_503" in d.error.message


async def test_retry_after_is_honoured_but_capped_by_max_s():
    t = target(LIMITED)
    on_delivery(1, t)
    with pytest.raises(Retry) as r:
        await notify(failed_generation(), t)
    assert r.value.delay == 8.0


async def test_permanent_refusal_dead_letters_at_once_and_keeps_the_circuit_closed():
    t = target(REFUSED)
    on_delivery(1, t)
    with pytest.raises(Reject) as r:
        await notify(failed_generation(), t)
    assert r.value.code == "WEBHOOK_REJECTED"
    assert r.value.events[0].data.attempts == 1 and "HTTP 404" in r.value.events[0].data.error.message
    assert t.circuit.state == CLOSED and t.circuit.consecutive_failures == 0


async def test_open_circuit_defers_without_calling_and_does_not_use_up_attempts():
    clock = Clock()
    t = target(UNAVAILABLE, UNAVAILABLE, UNAVAILABLE, clock=clock)
    ev = failed_generation()
    for n in (1, 2):
        on_delivery(n, t)
        with pytest.raises(Retry):
            await notify(ev, t)
    assert t.circuit.state == OPEN and len(t.sender.sent) == 2
    clock.t = 4.0
    on_delivery(3, t)
    with pytest.raises(Retry) as r:  # deferred: no call, 6 s until half-open
        await notify(ev, t)
    assert r.value.delay == pytest.approx(6.0) and len(t.sender.sent) == 2
    assert t.stats["deferred"] == 1
    clock.t = 10.0
    on_delivery(4, t)  # delivery 4 is attempt 3: the half-open trial, and the last attempt
    with pytest.raises(Reject) as rej:
        await notify(ev, t)
    assert rej.value.events[0].data.attempts == 3 and len(t.sender.sent) == 3
    assert t.circuit.state == OPEN


async def test_circuit_open_on_the_consumers_last_delivery_dead_letters():
    clock = Clock()
    t = target(UNAVAILABLE, UNAVAILABLE, clock=clock)
    for n in (1, 2):
        on_delivery(n, t, seq=1)
        with pytest.raises(Retry):
            await notify(failed_generation(), t)
    on_delivery(t.max_deliver, t, seq=99)  # 3 attempts + 4 deferrals: the consumer's last delivery
    with pytest.raises(Reject) as r:
        await notify(failed_generation(), t)
    assert r.value.code == "CIRCUIT_OPEN" and r.value.events[0].data.error.code == "CIRCUIT_OPEN"
