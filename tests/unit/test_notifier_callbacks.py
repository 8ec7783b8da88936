"""The notifier's callback handlers without a server: a KV stand-in and a progress stand-in,
and a real local HTTP receiver (tests.webhook) for what is sent."""

from __future__ import annotations

import pytest

from bus.topology import CALLBACK_MAX_DELIVER, CALLBACK_MAX_IN_FLIGHT, CALLBACK_OUTCOMES, CALLBACK_REQUESTS, Topology
from contracts.catalogue import CONTENT_GENERATED, GENERATION_REQUESTED, NOTIFICATION_DELIVERED, NOTIFICATION_FAILED
from contracts.envelope import new_event
from contracts.events import ContentGenerated, GenerationRequested, Origin
from contracts.handling import Delivery, Retry, route
from services.notifier.callbacks import CALLBACK_HANDLERS, CallbackDeps, callback_key, callback_policy
from services.notifier.config import NotifierConfigError
from services.notifier.delivery import WebhookSender
from services.notifier.service import NotifierApp
from services.settings import Settings
from tests.webhook import Webhook


class Store:
    def __init__(self):
        self.kv: dict[str, bytes] = {}
        self.gets = 0

    async def get(self, key):
        self.gets += 1
        return (self.kv[key], 1) if key in self.kv else None

    async def put(self, key, value):
        self.kv[key] = value
        return 1


class Progress:
    def __init__(self, handled: bool):
        self.handled = handled

    async def handled_through(self, seq: int) -> bool:
        return self.handled


def deps(store: Store, handled: bool, url: str) -> CallbackDeps:
    policy = callback_policy("X", CALLBACK_MAX_IN_FLIGHT)
    return CallbackDeps(
        policy,
        allow=[url.rsplit("/", 1)[0] + "/"],
        store=store,
        progress=Progress(handled),
        sender=WebhookSender(policy, b"k"),
    )


def request(url: str, origin: Origin | None = None):
    return new_event(
        GENERATION_REQUESTED,
        GenerationRequested(content_config_id="hello-world", callback_url=url, origin=origin),
        source="t",
    )


def plain_request():
    """A top-level generation request without a callback."""
    return new_event(GENERATION_REQUESTED, GenerationRequested(content_config_id="hello-world"), source="t")


def outcome(req, origin: Origin | None = None):
    data = ContentGenerated(
        request_id=req.id, content_config_id="hello-world", status="success", content="x", origin=origin
    )
    return new_event(CONTENT_GENERATED, data, source="chora://generator")


def delivery(attempt: int, consumer: str = CALLBACK_OUTCOMES, seq: int = 9) -> Delivery:
    return Delivery(attempt, CALLBACK_MAX_DELIVER, consumer, seq)


def test_the_callback_policy_matches_the_declared_consumer():
    policy = callback_policy("X", CALLBACK_MAX_IN_FLIGHT)
    spec = Topology.from_settings(Settings()).consumers[CALLBACK_OUTCOMES]
    assert spec.max_deliver == policy.max_attempts + policy.circuit.max_deferrals == CALLBACK_MAX_DELIVER
    assert spec.max_ack_pending == policy.max_in_flight and spec.start is None


async def test_an_outcome_seen_before_its_request_is_recorded_waits_for_it_then_delivers():
    with Webhook() as hook:
        store = Store()
        d = deps(store, handled=False, url=hook.url)
        handle = route(CALLBACK_HANDLERS, d, "notifier")
        req = request(hook.url)
        out = outcome(req)
        with pytest.raises(Retry) as e:  # the requests consumer has not got that far: not a final miss
            await handle(out, delivery(1))
        assert e.value.delay == 0.25 and hook.received == []
        assert await handle(req, delivery(1, CALLBACK_REQUESTS)) == []
        assert callback_key(req.id) in store.kv
        (note,) = await handle(out, delivery(2))
        assert note.type == NOTIFICATION_DELIVERED and note.data.attempts == 1  # the wait was no attempt
        assert len(hook.received) == 1 and hook.received[0].event["id"] == out.id
        await d.sender.close()


async def test_no_record_once_the_requests_are_handled_means_no_callback():
    with Webhook() as hook:
        d = deps(Store(), handled=True, url=hook.url)
        assert await route(CALLBACK_HANDLERS, d, "notifier")(outcome(request(hook.url)), delivery(1)) == []
        assert hook.received == []
        await d.sender.close()


async def test_parts_and_items_are_neither_recorded_nor_looked_up():
    with Webhook() as hook:
        store = Store()
        d = deps(store, handled=False, url=hook.url)
        handle = route(CALLBACK_HANDLERS, d, "notifier")
        origin = Origin(kind="batch", id="b1", key="0")
        req = request(hook.url, origin)
        assert await handle(req, delivery(1, CALLBACK_REQUESTS)) == []
        assert await handle(outcome(req, origin), delivery(1)) == []
        assert store.kv == {} and store.gets == 0 and hook.received == []
        await d.sender.close()


async def test_an_allow_list_without_its_secret_stops_the_start(tmp_path):
    app = NotifierApp(None, environ={}, callback_allow=["hooks.example.com"], callback_secret_env="MY_CB_SECRET")
    with pytest.raises(NotifierConfigError) as e:
        await app.start()
    assert "MY_CB_SECRET" in str(e.value) and "not set" in str(e.value)
    app = NotifierApp(
        None, environ={"MY_CB_SECRET": "s"}, callback_allow=["hooks.example.com"], callback_secret_env="MY_CB_SECRET"
    )
    await app.start()
    assert app.info()["callbacks"]["on"] is True
    await app.close()


async def test_a_request_with_a_callback_after_one_without_is_still_delivered():
    with Webhook() as hook:
        d = deps(Store(), handled=False, url=hook.url)
        handle = route(CALLBACK_HANDLERS, d, "notifier")
        plain = plain_request()
        assert await handle(plain, delivery(1, CALLBACK_REQUESTS)) == []
        with_url = request(hook.url)
        with_url.id = plain.id  # the same id again, now with a callback (a re-publish past the window)
        assert await handle(with_url, delivery(1, CALLBACK_REQUESTS)) == []
        (note,) = await handle(outcome(with_url), delivery(1))
        assert note.type == NOTIFICATION_DELIVERED and len(hook.received) == 1
        await d.sender.close()


async def test_with_callbacks_off_a_callback_is_refused_when_its_request_is_read():
    store = Store()
    d = CallbackDeps(callback_policy("X", CALLBACK_MAX_IN_FLIGHT), allow=[], store=store, progress=Progress(False))
    handle = route(CALLBACK_HANDLERS, d, "notifier")
    req = request("https://hooks.example.com/cb")
    (note,) = await handle(req, delivery(1, CALLBACK_REQUESTS))
    assert note.type == NOTIFICATION_FAILED and note.data.subscription == "callback"
    assert note.data.error.code == "CALLBACK_REFUSED" and "callbacks are off" in note.data.error.message
    assert note.data.event_id == req.id and note.data.event_type == GENERATION_REQUESTED
    assert not note.data.dead_lettered
    (again,) = await handle(req, delivery(2, CALLBACK_REQUESTS))
    assert again.id == note.id  # a redelivery repeats the same notification (deduplicated on publish)
    # a request without one, and a batch item with one, give nothing
    origin = Origin(kind="batch", id="b1", key="0")
    assert await handle(plain_request(), delivery(1, CALLBACK_REQUESTS)) == []
    assert await handle(request("https://hooks.example.com/cb", origin), delivery(1, CALLBACK_REQUESTS)) == []
    assert store.kv == {} and store.gets == 0 and d.stats["refused"] == 2  # (each handling)


async def test_with_callbacks_off_the_notifier_reads_no_outcome_and_retires_their_durable():
    topo = Topology.from_settings(Settings())
    off = NotifierApp(None, environ={})
    await off.start()
    off.callbacks.store = Store()  # as the runtime's bus context gives it
    ((requests, _),) = off.consumers(topo)
    assert requests.durable == CALLBACK_REQUESTS and requests.callbacks_only  # only requests with a callback
    assert off.retired_consumers() == [CALLBACK_OUTCOMES]
    on = NotifierApp(None, environ={"S": "s"}, callback_allow=["hooks.example.com"], callback_secret_env="S")
    await on.start()
    on.callbacks.store = Store()
    assert [spec.durable for spec, _ in on.consumers(topo)] == [CALLBACK_REQUESTS, CALLBACK_OUTCOMES]
    assert on.retired_consumers() == []
    await off.close()
    await on.close()
