"""The notifier against a real nats-server and real local HTTP endpoints.

Endpoints are :class:`tests.webhook.Webhook` (stdlib ``http.server`` in a thread on
127.0.0.1:0): one that accepts (and checks nothing itself: the test verifies what it recorded),
one that fails N times with 503 + ``Retry-After: 0`` then accepts, one that is
down (a port nobody listens on) and one that is slow (answers only when
released). The notifier runs in-process with :func:`services.runtime.run_service`.
"""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path


from bus.publisher import Publisher
from bus.topology import Topology
from contracts.catalogue import (
    CONTENT_GENERATED,
    GENERATION_REQUESTED,
    NOTIFICATION_DELIVERED,
    NOTIFICATION_FAILED,
    subject_for,
)
from contracts.envelope import CloudEvent, EnvelopeError, decode, new_event
from contracts.events import ContentGenerated, GenerationRequested
from services.notifier import service as notifier_service
from services.circuit import CLOSED, HALF_OPEN, OPEN
from services.notifier.config import Subscription
from services.notifier.delivery import WebhookSender
from services.notifier.signing import parse_secrets
from services.runtime import ready_file, run_service
from tests.conftest import wait_for
import pytest
from standardwebhooks import WebhookVerificationError

from tests.webhook import Webhook, dead_url

SECRET = "whsec_" + base64.b64encode(b"integration-secret-1").decode()  # the Standard Webhooks form


def fail_then_accept(n_failures: int):
    return lambda n: (503, {"Retry-After": "0"}) if n < n_failures else (200, {})


# --------------------------------------------------------------------------- harness


def subscription(name: str, url: str, **kw) -> dict:
    return {
        "name": name,
        "events": kw.pop("events", [CONTENT_GENERATED]),
        "url": url,
        "secret_env": "NOTIFIER_TEST_SECRET",
        "timeout_s": kw.pop("timeout_s", 2.0),
        "max_attempts": kw.pop("max_attempts", 4),
        "backoff": kw.pop("backoff", {"initial_s": 0.02, "max_s": 0.1, "multiplier": 2, "jitter": 0.2}),
        "circuit": kw.pop("circuit", {"failure_threshold": 10, "reset_timeout_s": 0.3}),
        **kw,
    }


class Notifier:
    """The notifier service running in-process, and every notification it publishes."""

    def __init__(self, nc, settings, tmp_path: Path, monkeypatch, subs: list[dict]):
        cfg = tmp_path / "notifier.json"
        cfg.write_text(json.dumps({"subscriptions": subs}))
        monkeypatch.setenv("NOTIFIER_TEST_SECRET", SECRET)
        self.settings = settings.model_copy(update={"notifier_config": cfg})
        self.nc = nc
        self.topo = Topology.from_settings(settings)
        self.apps = []
        build = notifier_service.build
        monkeypatch.setattr(notifier_service, "build", lambda s: self.apps.append(build(s)) or self.apps[-1])
        self.notifications: list[CloudEvent] = []
        self.stop = asyncio.Event()
        self.task: asyncio.Task | None = None

    @property
    def app(self):
        return self.apps[0]

    async def __aenter__(self) -> "Notifier":
        async def collect(msg):
            try:
                self.notifications.append(decode(msg.headers, msg.data))
            except EnvelopeError:
                pass

        for t in (NOTIFICATION_DELIVERED, NOTIFICATION_FAILED):
            await self.nc.subscribe(subject_for(t, self.settings.prefix), cb=collect)
        await self.nc.flush()
        self.task = asyncio.create_task(run_service("notifier", self.settings, stop=self.stop))
        run_dir = ready_file(self.settings, "notifier").parent

        def ready() -> bool:
            if self.task.done():
                self.task.result()  # raise what stopped it
            return run_dir.exists() and any(run_dir.glob("notifier.*.json"))

        await wait_for(ready, 15, "the notifier to be ready")
        return self

    async def __aexit__(self, *exc) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 30)

    def delivered(self, sub: str | None = None) -> list:
        return [
            e.data
            for e in self.notifications
            if e.type == NOTIFICATION_DELIVERED and sub in (None, e.data.subscription)
        ]

    def failed(self, sub: str | None = None) -> list:
        return [
            e.data for e in self.notifications if e.type == NOTIFICATION_FAILED and sub in (None, e.data.subscription)
        ]

    async def settled(self, durable: str) -> bool:
        ci = await self.nc.jetstream().consumer_info(self.topo.events_stream, durable)
        return ci.num_pending == 0 and ci.num_ack_pending == 0


def generated(status: str = "success", config_id: str = "hello-world") -> CloudEvent:
    return new_event(
        CONTENT_GENERATED,
        ContentGenerated(
            request_id="req-1",
            content_config_id=config_id,
            status=status,
            content="hi" if status == "success" else None,
        ),
        source="chora://generator",
    )


async def publish(nc, settings, *events: CloudEvent) -> None:
    await Publisher(nc.jetstream(), settings.prefix).publish_many(events)


# --------------------------------------------------------------------------- tests


async def test_delivers_signed_cloudevents_and_skips_what_the_filters_exclude(nc, settings, tmp_path, monkeypatch):
    with Webhook() as hook:
        subs = [subscription("ok", hook.url, filters={"status": ["success"]})]
        async with Notifier(nc, settings, tmp_path, monkeypatch, subs) as n:
            ci = await nc.jetstream().consumer_info(n.topo.events_stream, "notify-ok")
            assert ci.config.filter_subject == subject_for(CONTENT_GENERATED, settings.prefix)
            assert ci.config.max_deliver == 4 + 120  # max_attempts + circuit.max_deferrals
            assert ci.config.max_ack_pending == 64  # max_in_flight

            skipped, wanted = generated("error"), generated("success")
            request = new_event(GENERATION_REQUESTED, GenerationRequested(content_config_id="x"), source="t")
            await publish(nc, settings, skipped, request, wanted)
            await wait_for(lambda: n.delivered("ok"), 10, "notification_delivered")
            await wait_for(lambda: n.settled("notify-ok"), 10, "notify-ok to settle")

            [d] = n.delivered("ok")
            assert (d.event_id, d.event_type, d.attempts, d.status_code) == (wanted.id, CONTENT_GENERATED, 1, 200)
            assert d.duration_ms > 0
            [req] = hook.received  # the error outcome was filtered out, the request is not subscribed
            h = {k.lower(): v for k, v in req.headers.items()}
            assert h["content-type"] == "application/cloudevents+json"
            assert h["idempotency-key"] == h["webhook-id"] == f"{wanted.id}:ok"
            event = req.verify(SECRET)  # as a receiver would: standardwebhooks, then the structured CloudEvent
            assert event["id"] == wanted.id and event["type"] == CONTENT_GENERATED
            assert event["specversion"] == "1.0" and event["source"] == "chora://generator"
            assert event["traceparent"] == wanted.traceparent
            assert event["data"]["content_config_id"] == "hello-world" and event["data"]["status"] == "success"
            with pytest.raises(WebhookVerificationError):
                req.verify("whsec_" + base64.b64encode(b"wrong").decode())
            # tampered: an attribute in the body, the id, or a fresh timestamp on an old signature
            retyped = req.body.replace(CONTENT_GENERATED.encode(), b"chora.content_validated")
            fresher = str(int(h["webhook-timestamp"]) + 1)
            for headers, body in (
                (req.headers, retyped),
                (req.headers | {"webhook-id": f"{wanted.id}:other"}, req.body),
                (req.headers | {"webhook-timestamp": fresher}, req.body),
            ):
                with pytest.raises(WebhookVerificationError):
                    type(req)(headers, body, req.at).verify(SECRET)
            assert SECRET not in json.dumps(h)
            assert n.app.info()["subscriptions"]["ok"]["circuit"] == CLOSED


async def test_retries_then_succeeds_counting_attempts(nc, settings, tmp_path, monkeypatch):
    with Webhook(fail_then_accept(2)) as hook:
        async with Notifier(nc, settings, tmp_path, monkeypatch, [subscription("flaky", hook.url)]) as n:
            ev = generated()
            await publish(nc, settings, ev)
            await wait_for(lambda: n.delivered("flaky"), 10, "delivery after two 503s")
            [d] = n.delivered("flaky")
            assert d.attempts == 3 and d.status_code == 200
            assert len(hook.received) == 3
            keys = {r.headers["Idempotency-Key"] for r in hook.received}
            assert keys == {f"{ev.id}:flaky"}  # the same key on every attempt
            for r in hook.received:
                assert r.verify(SECRET)["id"] == ev.id
            assert n.failed() == []
            assert n.app.status()["flaky"]["retried"] == 2


async def test_dead_endpoint_dead_letters_with_notification_failed_and_opens_the_circuit(
    nc, settings, tmp_path, monkeypatch
):
    # The exact counts below need delivery 3 (after a backoff of at most 0.1 s) to arrive
    # while the circuit is still open: a 5 s open window leaves room for a loaded machine.
    subs = [
        subscription(
            "down",
            dead_url(),
            max_attempts=3,
            circuit={"failure_threshold": 2, "reset_timeout_s": 5.0, "half_open_max_calls": 1},
        )
    ]
    async with Notifier(nc, settings, tmp_path, monkeypatch, subs) as n:
        ev = generated()
        await publish(nc, settings, ev)
        await wait_for(lambda: n.failed("down"), 30, "notification_failed")
        [f] = n.failed("down")
        assert (f.event_id, f.attempts, f.dead_lettered, f.error.code) == (ev.id, 3, True, "MAX_ATTEMPTS")
        assert "CONNECT_ERROR" in f.error.message
        assert n.delivered() == []

        js = nc.jetstream()
        # notification_failed is published before the dead-letter copy is stored: wait for the copy
        await wait_for(lambda: n.settled("notify-down"), 30, "the dead letter to be stored and the original terminated")
        dl = await js.get_last_msg(n.topo.dlq_stream, n.topo.dlq_subject("notify-down"))
        assert dl.headers["Chora-Dlq-Code"] == "MAX_ATTEMPTS"
        assert dl.headers["ce-id"] == ev.id
        # attempt 1 and 2 failed (circuit opens), delivery 3 was deferred, delivery 4 was the 3rd attempt
        assert dl.headers["Chora-Dlq-Deliveries"] == "4"
        circuit = n.app.targets["down"].circuit
        assert circuit.transitions[(CLOSED, OPEN)] == 1
        assert circuit.transitions[(OPEN, HALF_OPEN)] == 1 and circuit.transitions[(HALF_OPEN, OPEN)] == 1
        assert n.app.status()["down"]["deferred"] == 1


async def test_slow_endpoint_does_not_delay_a_healthy_subscription(nc, settings, tmp_path, monkeypatch):
    with Webhook(hold=True) as slow, Webhook() as fast:
        # The slow endpoint answers nothing until released, and its timeout outlasts the test's
        # waits: were deliveries serialised behind it, the fast ones could never arrive first.
        subs = [subscription("slow", slow.url, timeout_s=120.0), subscription("fast", fast.url)]
        async with Notifier(nc, settings, tmp_path, monkeypatch, subs) as n:
            events = [generated() for _ in range(5)]
            await publish(nc, settings, *events)
            await wait_for(
                lambda: len(n.delivered("fast")) == 5, 30, "5 deliveries to the fast endpoint while the slow one hangs"
            )
            assert {d.event_id for d in n.delivered("fast")} == {e.id for e in events}
            assert len(slow.received) >= 1 and slow.answered == 0  # still hanging on the slow one
            assert n.delivered("slow") == []
            slow.released.set()
            await wait_for(
                lambda: len({d.event_id for d in n.delivered("slow")}) == 5, 15, "slow deliveries once released"
            )


async def test_accepted_deliveries_share_one_keep_alive_connection():
    """A 2xx is read to its end before it is closed, so the next delivery goes out on the same
    connection: not a new TCP connection (and a new server thread) per event."""
    with Webhook() as hook:
        sender = WebhookSender(Subscription.model_validate(subscription("keepalive", hook.url)), parse_secrets(SECRET))
        try:
            results = [await sender.send(generated()) for _ in range(20)]
        finally:
            await sender.close()
    assert [r.outcome for r in results] == ["delivered"] * 20
    assert len(hook.received) == 20
    assert len({r.peer for r in hook.received}) == 1, "the deliveries did not share one connection"


async def test_no_config_means_no_subscriptions(nc, settings, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="chora.notifier")
    stop = asyncio.Event()
    task = asyncio.create_task(run_service("notifier", settings, stop=stop))
    run_dir = ready_file(settings, "notifier").parent
    await wait_for(lambda: run_dir.exists() and any(run_dir.glob("notifier.*.json")), 15, "ready")
    info = json.loads(next(run_dir.glob("notifier.*.json")).read_text())
    assert info["subscriptions"] == {} and info["config"] is None
    assert "no subscriptions" in caplog.text
    stop.set()
    await asyncio.wait_for(task, 15)
