"""Per-request callbacks end to end: generator, validator, assembler and notifier in-process on
one real nats-server for the module, and real local HTTP receivers (tests.webhook): two on the
allow-list (one of them answers 500 once), one off it, which must receive nothing.

- a generation request with callback_url gets exactly one signed POST of its content_generated;
- an artifact gets exactly one artifact_assembled, a batch exactly one batch_completed: the
  parts and items (origin set) trigger none;
- a URL off the allow-list gets no connection, and a notification_failed CALLBACK_REFUSED;
- a 500 is retried: the second attempt delivers, with the same Idempotency-Key.
"""

from __future__ import annotations

import asyncio
import os
import uuid

import nats
import pytest
import pytest_asyncio

from bus.publisher import Publisher
from bus.server import EmbeddedServer
from bus.settings import NatsSettings
from bus.topology import CALLBACK_OUTCOMES, CALLBACK_REQUESTS
from contracts.catalogue import (
    ARTIFACT_ASSEMBLED,
    ARTIFACT_REQUESTED,
    BATCH_COMPLETED,
    BATCH_REQUESTED,
    CONTENT_GENERATED,
    GENERATION_REQUESTED,
    NOTIFICATION_DELIVERED,
    NOTIFICATION_FAILED,
    subject_for,
)
from contracts.envelope import CloudEvent, EnvelopeError, decode, new_event
from contracts.events import ArtifactRequested, BatchItem, BatchRequested, GenerationRequested
from services.runtime import ready_file, run_service
from services.settings import Settings
from tests.conftest import example_configs, stop_services, wait_for
from tests.webhook import Webhook

pytestmark = pytest.mark.asyncio(loop_scope="module")

SECRET_ENV = "CHORA_TEST_CALLBACK_SECRET"
SECRET = "callback-secret-" + uuid.uuid4().hex[:8]
SERVICES = ("generator", "validator", "assembler", "notifier")


class Stack:
    def __init__(self, settings: Settings, nc, ok: Webhook, flaky: Webhook, outside: Webhook):
        self.settings, self.nc = settings, nc
        self.ok, self.flaky, self.outside = ok, flaky, outside
        self.notifications: list[CloudEvent] = []

    async def request(self, event_type: str, data) -> CloudEvent:
        ev = new_event(event_type, data, source="chora://test")
        await Publisher(self.nc.jetstream(), self.settings.prefix).publish(ev)
        return ev

    def notes(self, event_type: str, outcome_type: str) -> list:
        return [
            e.data
            for e in self.notifications
            if e.type == event_type and e.data.subscription == "callback" and e.data.event_type == outcome_type
        ]

    async def settled(self) -> None:
        """Both callback consumers have nothing pending or unacknowledged."""
        js = self.nc.jetstream()

        async def idle() -> bool:
            for durable in (CALLBACK_REQUESTS, CALLBACK_OUTCOMES):
                ci = await js.consumer_info(self.settings.stream_name, durable)
                if ci.num_pending or ci.num_ack_pending:
                    return False
            return True

        await wait_for(idle, 30, "the callback consumers settled")


def posts(hook: Webhook, ce_type: str) -> list[tuple[dict, dict]]:
    """(headers, data) of every POST ``hook`` received of the CloudEvent type ``ce_type`` (the
    body is the whole CloudEvent, structured mode)."""
    return [(r.headers, r.event["data"]) for r in hook.received if r.event.get("type") == ce_type]


def data_of(r) -> dict:
    return r.event.get("data") or {}


def assert_signed(r) -> None:
    """Verified as a receiver does, with the standardwebhooks package (raw secret bytes)."""
    assert r.verify(SECRET.encode())["data"] == data_of(r)


@pytest.fixture(scope="module")
def hooks():
    with Webhook() as ok, Webhook(lambda n: (500, {}) if n == 0 else (200, {})) as flaky, Webhook() as outside:
        yield ok, flaky, outside


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory, hooks):
    ok, flaky, outside = hooks
    d = tmp_path_factory.mktemp("callbacks")
    server = EmbeddedServer(d / "store", log_path=d / "nats.log").start()
    os.environ[SECRET_ENV] = SECRET
    settings = Settings(
        home=d / "var",
        prefix="cb",
        configs_dir=example_configs(),
        metrics_port=-1,
        render_workers=1,
        nats=NatsSettings(url=server.url),
        # a URL prefix on ok's port, a host:port for flaky; outside's port is on neither
        callback_allow=[ok.url.rsplit("/", 1)[0] + "/hook", "127.0.0.1:" + flaky.url.split(":")[2].split("/")[0]],
        callback_secret_env=SECRET_ENV,
    )
    stop = asyncio.Event()
    tasks = [asyncio.create_task(run_service(n, settings, stop=stop), name=n) for n in SERVICES]
    nc = await nats.connect(server.url)
    try:

        def ready() -> bool:
            for t in tasks:
                if t.done():
                    t.result()
            return all(ready_file(settings, n).exists() for n in SERVICES)

        await wait_for(ready, 60, "generator, validator, assembler and notifier ready")
        s = Stack(settings, nc, ok, flaky, outside)

        async def collect(msg) -> None:
            try:
                s.notifications.append(decode(msg.headers, msg.data))
            except EnvelopeError:
                pass

        for t in (NOTIFICATION_DELIVERED, NOTIFICATION_FAILED):
            await nc.subscribe(subject_for(t, settings.prefix), cb=collect)
        await nc.flush()
        yield s
    finally:
        errors = await stop_services(stop, tasks)
        await nc.close()
        server.stop()
        os.environ.pop(SECRET_ENV, None)
    assert errors == []


async def test_a_generation_request_gets_exactly_one_signed_post_of_its_outcome(stack):
    req = await stack.request(
        GENERATION_REQUESTED,
        GenerationRequested(content_config_id="hello-world", context={"name": "Ada"}, callback_url=stack.ok.url),
    )

    def delivered() -> list:
        return [n for n in stack.notes(NOTIFICATION_DELIVERED, CONTENT_GENERATED) if n.attempts == 1]

    await wait_for(lambda: any(p[1]["request_id"] == req.id for p in posts(stack.ok, CONTENT_GENERATED)), 30, "POST")
    await wait_for(delivered, 30, "notification_delivered of the callback")
    await stack.settled()
    mine = [r for r in stack.ok.received if data_of(r).get("request_id") == req.id]
    assert len(mine) == 1
    got = mine[0]
    assert got.event["type"] == CONTENT_GENERATED and got.event["source"] == "chora://generator"
    assert_signed(got)
    body = data_of(got)
    assert body["status"] == "success" and "Ada" in body["content"]
    assert got.headers["Idempotency-Key"] == f"{got.event['id']}:callback"
    assert delivered()[0].event_id == got.event["id"] and delivered()[0].status_code == 200
    assert stack.outside.received == []


async def test_an_artifact_and_a_batch_each_get_exactly_one_post_of_their_completion(stack):
    art = await stack.request(
        ARTIFACT_REQUESTED, ArtifactRequested(artifact_id="product-docs", callback_url=stack.ok.url + "/art")
    )
    batch = await stack.request(
        BATCH_REQUESTED,
        BatchRequested(
            items=[BatchItem(content_config_id="hello-world", context={"name": f"n{i}"}) for i in range(5)],
            callback_url=stack.ok.url,
        ),
    )

    def completed() -> bool:
        a = [p for p in posts(stack.ok, ARTIFACT_ASSEMBLED) if p[1]["request_id"] == art.id]
        b = [p for p in posts(stack.ok, BATCH_COMPLETED) if p[1]["batch_id"] == batch.id]
        return bool(a and b)

    await wait_for(completed, 60, "the artifact_assembled and batch_completed callbacks")
    await stack.settled()
    assembled = [p for p in posts(stack.ok, ARTIFACT_ASSEMBLED) if p[1]["request_id"] == art.id]
    finished = [p for p in posts(stack.ok, BATCH_COMPLETED) if p[1]["batch_id"] == batch.id]
    assert len(assembled) == 1 and len(finished) == 1
    assert assembled[0][1]["status"] == "success" and finished[0][1]["successful"] == 5
    # parts and items (origin set) triggered nothing: no content_generated POST carries an origin
    assert [p for p in posts(stack.ok, CONTENT_GENERATED) if "origin" in p[1]] == []
    assert len(stack.notes(NOTIFICATION_DELIVERED, ARTIFACT_ASSEMBLED)) == 1
    assert len(stack.notes(NOTIFICATION_DELIVERED, BATCH_COMPLETED)) == 1


async def test_a_callback_off_the_allow_list_gets_no_connection_and_a_notification_failed(stack):
    req = await stack.request(
        GENERATION_REQUESTED, GenerationRequested(content_config_id="hello-world", callback_url=stack.outside.url)
    )

    def refused() -> list:  # the only refusal of the module
        return [n for n in stack.notes(NOTIFICATION_FAILED, CONTENT_GENERATED) if n.error.code == "CALLBACK_REFUSED"]

    await wait_for(refused, 30, "notification_failed CALLBACK_REFUSED")
    await stack.settled()
    assert len(refused()) == 1
    n = refused()[0]
    assert "not on the callback allow-list" in n.error.message and n.attempts == 0 and n.dead_lettered is False
    assert stack.outside.received == []  # never a connection attempt
    assert [r for r in stack.ok.received + stack.flaky.received if data_of(r).get("request_id") == req.id] == []


async def test_a_callback_answered_with_500_is_retried_and_delivered(stack):
    req = await stack.request(
        GENERATION_REQUESTED, GenerationRequested(content_config_id="hello-world", callback_url=stack.flaky.url)
    )

    def delivered() -> list:
        return [n for n in stack.notes(NOTIFICATION_DELIVERED, CONTENT_GENERATED) if n.attempts == 2]

    await wait_for(delivered, 30, "the callback delivered on its second attempt")
    await stack.settled()
    mine = [r for r in stack.flaky.received if data_of(r).get("request_id") == req.id]
    assert len(mine) == 2
    assert mine[0].headers["Idempotency-Key"] == mine[1].headers["Idempotency-Key"]
    assert stack.flaky.answered == 2 and delivered()[0].status_code == 200
    for r in mine:
        assert_signed(r)


async def test_requests_without_a_callback_never_reach_the_notifier_and_their_outcomes_settle(stack):
    """With callbacks on: the requests consumer reads only <subject>.callback; the outcome of a
    plain request is looked up, found without a record once that consumer is caught up, and
    settled (acknowledged) without a POST."""
    js = stack.nc.jetstream()
    stream, prefix = stack.settings.stream_name, stack.settings.prefix
    before = (await js.consumer_info(stream, CALLBACK_REQUESTS)).delivered.consumer_seq
    seen: set[str] = set()

    async def on_outcome(msg) -> None:
        seen.add(decode(msg.headers, msg.data).data.request_id)

    sub = await stack.nc.subscribe(f"{prefix}.content_generated.standalone", cb=on_outcome)
    ids = set()
    for i in range(5):
        data = GenerationRequested(content_config_id="hello-world", context={"name": f"p{i}"})
        ids.add((await stack.request(GENERATION_REQUESTED, data)).id)
    await wait_for(lambda: ids <= seen, 30, "the outcomes of the plain requests")
    await sub.unsubscribe()
    last = (await js.get_last_msg(stream, f"{prefix}.content_generated.standalone")).seq

    async def settled() -> bool:
        info = await js.consumer_info(stream, CALLBACK_OUTCOMES)
        return info.ack_floor.stream_seq >= last and not info.num_ack_pending

    await wait_for(settled, 30, "the notifier settled those outcomes")
    after = (await js.consumer_info(stream, CALLBACK_REQUESTS)).delivered.consumer_seq
    assert after == before  # not one of the requests was sent to the notifier
    everywhere = stack.ok.received + stack.flaky.received + stack.outside.received
    assert not [r for r in everywhere if data_of(r).get("request_id") in ids]
