"""bus/ against a real nats-server: publish, consume, ack, retry, dead letters, drain."""

from __future__ import annotations

import asyncio

import pytest

from bus.consumer import ConsumerLoop, Reject, Retry
from bus.deadletter import H_REPLAY_FOR
from bus.publisher import Publisher
from bus.topology import Topology, provision
from contracts.catalogue import (
    ARTIFACT_REQUESTED,
    BATCH_REQUESTED,
    CATALOGUE,
    CONTENT_GENERATED,
    GENERATION_REQUESTED,
)
from contracts.envelope import encode_binary, encode_structured, new_event
from contracts.events import ArtifactRequested, BatchItem, BatchRequested, ContentGenerated, GenerationRequested
from tests.conftest import wait_for


def request(config_id: str = "hello-world", **ctx) -> object:
    return new_event(GENERATION_REQUESTED, GenerationRequested(content_config_id=config_id, context=ctx), source="test")


async def settled(js, topo, durable: str = "generator") -> bool:
    """Nothing pending, nothing awaiting its ack and nothing redelivered on ``durable``."""
    ci = await js.consumer_info(topo.events_stream, durable)
    return ci.num_ack_pending == 0 and ci.num_pending == 0 and ci.num_redelivered == 0


@pytest.fixture
async def js_topo(nc, settings):
    js = nc.jetstream()
    topo = Topology.from_settings(settings)
    await provision(js, topo)
    return js, topo


async def test_provision_is_idempotent(nc, settings):
    js = nc.jetstream()
    topo = Topology.from_settings(settings)
    await provision(js, topo)
    await provision(js, topo)
    info = await js.stream_info(topo.events_stream)
    assert set(info.config.subjects) == {s for t in CATALOGUE for s in CATALOGUE[t].subjects(topo.prefix)}
    assert f"{topo.prefix}.generation.requested.callback" in info.config.subjects
    names = {c.name for c in await js.consumers_info(topo.events_stream)}
    assert names == set(topo.consumers)
    assert (await js.key_value(topo.state_bucket)) is not None
    assert (await js.object_store(topo.content_bucket)) is not None


async def test_handler_outputs_published_and_input_acked(nc, js_topo):
    js, topo = js_topo
    seen = []

    async def handler(ev, delivery):
        seen.append(ev.id)
        return [
            new_event(
                CONTENT_GENERATED,
                ContentGenerated(request_id=ev.id, content_config_id="x", status="success"),
                source="t",
                cause=ev,
            )
        ]

    loop = ConsumerLoop(nc, js, topo, topo.consumers["generator"], handler)
    task = asyncio.create_task(loop.run())
    pub = Publisher(js, topo.prefix)
    reqs = [request(n=i) for i in range(200)]
    await pub.publish_many(reqs)
    await wait_for(lambda: loop.stats.acked == 200, what="200 acks")
    await loop.stop()
    await task
    assert sorted(seen) == sorted(r.id for r in reqs)
    info = await js.stream_info(topo.events_stream)
    assert info.state.messages == 400
    await wait_for(lambda: settled(js, topo), timeout=10, what="all 200 acks applied, nothing redelivered")


async def test_republished_output_is_dropped_as_duplicate(nc, js_topo):
    js, topo = js_topo
    pub = Publisher(js, topo.prefix)
    ev = request()
    first = await pub.publish(ev)
    again = await pub.publish(ev)
    assert not first.duplicate and again.duplicate


async def test_retry_then_success_and_malformed_goes_to_dlq(nc, js_topo):
    js, topo = js_topo
    attempts = {}

    async def handler(ev, delivery):
        attempts[ev.id] = attempts.get(ev.id, 0) + 1
        if ev.data.context.get("flaky") and attempts[ev.id] < 2:
            raise Retry("not yet", delay=0.05)
        if ev.data.context.get("never"):
            raise Reject("NOPE", "this one can never work")
        return []

    loop = ConsumerLoop(nc, js, topo, topo.consumers["generator"], handler)
    task = asyncio.create_task(loop.run())
    pub = Publisher(js, topo.prefix)
    flaky, never = request(flaky=True), request(never=True)
    await pub.publish_many([flaky, never])
    subject = topo.subject(GENERATION_REQUESTED)
    await js.publish(
        subject,
        b"not json",
        headers={"ce-specversion": "1.0", "ce-id": "m1", "ce-source": "t", "ce-type": GENERATION_REQUESTED},
    )
    await js.publish(subject, b"{}", headers={"ce-id": "m2", "ce-source": "t", "ce-type": GENERATION_REQUESTED})
    h, b = encode_structured(request())
    await js.publish(subject, b, headers=h)
    await wait_for(lambda: loop.stats.acked == 2 and loop.stats.dead == 3, what="2 acks and 3 dead letters")
    await loop.stop()
    await task
    assert attempts[flaky.id] == 2
    dlq = await js.pull_subscribe(f"{topo.prefix}.dlq.>", stream=topo.dlq_stream)
    msgs = await dlq.fetch(3, timeout=2)
    codes = sorted(m.headers["Chora-Dlq-Code"] for m in msgs)
    assert codes == ["INVALID_JSON", "MISSING_ATTRIBUTE", "NOPE"]
    assert all(m.headers["Chora-Dlq-Consumer"] == "generator" for m in msgs)


@pytest.mark.parametrize(
    "durable, event",
    [
        ("generator", (GENERATION_REQUESTED, GenerationRequested(content_config_id="hello-world"))),
        ("assembler", (ARTIFACT_REQUESTED, ArtifactRequested(artifact_id="doc"))),
        ("assembler", (BATCH_REQUESTED, BatchRequested(items=[BatchItem(content_config_id="hello-world")]))),
    ],
    ids=["generation", "artifact", "batch"],
)
async def test_a_callback_url_on_the_plain_subject_is_dead_lettered_with_the_subject_to_use(
    nc, js_topo, durable, event
):
    """The notifier reads only <subject>.callback: a request with a callback_url on the plain
    subject would have its callback neither made nor refused. The loop dead-letters it before
    any handler sees it; on the .callback subject the same request is handled."""
    js, topo = js_topo
    handled: list[str] = []

    async def handler(ev, delivery):
        handled.append(ev.id)
        return []

    loop = ConsumerLoop(nc, js, topo, topo.consumers[durable], handler)
    task = asyncio.create_task(loop.run())
    event_type, data = event
    data.callback_url = "https://hooks.example.com/x"
    plain, asks = new_event(event_type, data, source="t"), new_event(event_type, data, source="t")
    subject = topo.subject(event_type)
    for ev, to in ((plain, subject), (asks, f"{subject}.callback")):
        headers, body = encode_binary(ev)
        await js.publish(to, body, headers=headers)
    await wait_for(lambda: loop.stats.dead == 1 and handled == [asks.id], what="a dead letter and one handled")
    await loop.stop()
    await task
    copy = await js.get_msg(topo.dlq_stream, seq=1)
    assert copy.headers["Chora-Dlq-Code"] == "MISROUTED_CALLBACK"
    assert copy.headers["ce-id"] == plain.id and f"{subject}.callback" in copy.headers["Chora-Dlq-Reason"]


@pytest.mark.parametrize("direct", [True, False], ids=["read-loop", "nats-py-callback"])
async def test_a_stored_message_that_looks_like_a_status_is_dead_lettered_at_once(nc, js_topo, direct):
    # an empty body and a header named Status, as the server's heartbeats have: but stored,
    # so it has an ack subject and is a message like any other that is not an event
    js, topo = js_topo
    loop = ConsumerLoop(nc, js, topo, topo.consumers["generator"], lambda ev, d: [], direct=direct)
    task = asyncio.create_task(loop.run())
    await js.publish(
        topo.subject(GENERATION_REQUESTED), b"", headers={"Status": "100", "Description": "Idle Heartbeat"}
    )
    await wait_for(lambda: loop.stats.dead == 1, what="its dead letter")
    await loop.stop()
    await task
    # (read by sequence: a nats-py fetch would itself take the copy for a status and skip it)
    assert (await js.stream_info(topo.dlq_stream)).state.messages == 1
    copy = await js.get_msg(topo.dlq_stream, seq=1)
    assert copy.headers["Chora-Dlq-Code"] == "NOT_A_CLOUDEVENT" and not copy.data


async def _publish_raw(url: str, subject: bytes, headers: dict[str, str], body: bytes) -> None:
    """A publish as any NATS client may send it, bytes the Python client would refuse included."""
    host, port = url.removeprefix("nats://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        await reader.readline()  # INFO
        hdr = ("NATS/1.0\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n").encode()
        writer.write(b'CONNECT {"verbose":false,"pedantic":false,"headers":true}\r\n')
        writer.write(b"HPUB %s %d %d\r\n%s%s\r\nPING\r\n" % (subject, len(hdr), len(hdr) + len(body), hdr, body))
        await writer.drain()
        assert await reader.readline() == b"PONG\r\n"
    finally:
        writer.close()


@pytest.mark.parametrize("direct", [True, False], ids=["read-loop", "nats-py-callback"])
async def test_a_subject_that_is_not_utf8_stalls_nothing(nats_server, nc, js_topo, direct):
    # the server stores what a client publishes on chora.content_generated.<anything>: here a
    # last token that is not UTF-8. The validator's consumer reads content_generated.*: it
    # must handle that message (it is a valid event) and every one after it
    js, topo = js_topo
    seen: list[str] = []

    async def handler(ev, delivery):
        seen.append(ev.id)
        return []

    loop = ConsumerLoop(nc, js, topo, topo.consumers["validator"], handler, direct=direct)
    task = asyncio.create_task(loop.run())
    hostile = new_event(
        CONTENT_GENERATED, ContentGenerated(request_id="r", content_config_id="x", status="success"), source="t"
    )
    h, b = encode_binary(hostile)
    await _publish_raw(nats_server.url, f"{topo.prefix}.content_generated.".encode() + b"\xff\xfe", h, b)
    after = new_event(
        CONTENT_GENERATED, ContentGenerated(request_id="r2", content_config_id="x", status="success"), source="t"
    )
    await Publisher(js, topo.prefix).publish(after)
    await wait_for(lambda: loop.stats.acked == 2, what="both messages handled and acked")
    await loop.stop()
    await task
    assert seen == [hostile.id, after.id]


async def test_a_bug_is_retried_a_bounded_number_of_times_then_dead_lettered(nc, settings):
    js = nc.jetstream()
    settings.max_deliver = 3
    topo = Topology.from_settings(settings)
    await provision(js, topo)
    spec = topo.consumers["generator"]
    object.__setattr__(spec, "backoff_s", (0.01,))
    calls = []

    async def handler(ev, delivery):
        calls.append((delivery.attempt, delivery.max_attempts, delivery.last, delivery.consumer))
        raise ZeroDivisionError("bug")

    loop = ConsumerLoop(nc, js, topo, spec, handler)
    task = asyncio.create_task(loop.run())
    await Publisher(js, topo.prefix).publish(request())
    await wait_for(lambda: loop.stats.dead == 1, what="dead letter after max_deliver")
    await loop.stop()
    await task
    # the handler is told each delivery's attempt number, and when it is the last one
    assert calls == [(1, 3, False, "generator"), (2, 3, False, "generator"), (3, 3, True, "generator")]
    info = await js.stream_info(topo.dlq_stream)
    assert info.state.messages == 1


async def test_stop_drains_in_flight_work(nc, js_topo):
    js, topo = js_topo
    started, release = asyncio.Event(), asyncio.Event()

    async def handler(ev, delivery):
        started.set()
        await release.wait()
        return []

    loop = ConsumerLoop(nc, js, topo, topo.consumers["generator"], handler)
    task = asyncio.create_task(loop.run())
    await Publisher(js, topo.prefix).publish(request())
    await asyncio.wait_for(started.wait(), 5)
    stopping = asyncio.create_task(loop.stop())
    await asyncio.sleep(0)  # let stop() begin; the handler is still blocked
    assert not stopping.done()
    release.set()
    await stopping
    await task
    assert loop.stats.acked == 1

    async def settled():
        ci = await js.consumer_info(topo.events_stream, "generator")
        return ci.num_ack_pending == 0 and ci.num_redelivered == 0

    await wait_for(settled, timeout=10, what="the ack to reach the server (ack_wait is 30 s)")


async def test_large_content_travels_by_reference_transparently(nc, js_topo):
    from bus.content import ContentStore
    from contracts.envelope import decode

    js, topo = js_topo
    content = ContentStore(js, topo.content_bucket, threshold=64 * 1024)
    big = "é" * 100_000  # 200,000 UTF-8 bytes
    observer = topo.consumer_spec("observer", None)  # a second consumer of every event
    await provision(js, topo, consumers=[], extra=[observer])

    async def generate(ev, delivery):
        return [
            new_event(
                CONTENT_GENERATED,
                ContentGenerated(request_id=ev.id, content_config_id="x", status="success", content=big),
                source="g",
                cause=ev,
            )
        ]

    received = []

    async def mirror(ev, delivery):
        if ev.type == CONTENT_GENERATED:
            received.append(ev.data.content)
        return []

    loops = [
        ConsumerLoop(nc, js, topo, topo.consumers["generator"], generate, content=content),
        ConsumerLoop(nc, js, topo, observer, mirror, content=content),
    ]
    tasks = [asyncio.create_task(lp.run()) for lp in loops]
    await Publisher(js, topo.prefix).publish(request())
    await wait_for(lambda: len(received) == 1, what="content delivered to the second consumer")
    for lp in loops:
        await lp.stop()
    await asyncio.gather(*tasks)
    assert received == [big]
    stored = await js.get_last_msg(topo.events_stream, topo.subject(CONTENT_GENERATED))
    assert len(stored.data) < 2000  # the stream holds the reference, not the content
    ev = decode(stored.headers, stored.data)
    assert ev.data.content is None and ev.data.content_ref.startswith("obj://")
    assert (await content.get(ev.data.content_ref)).decode() == big


async def test_a_replay_meant_for_another_consumer_is_acked_unhandled(nc, js_topo):
    js, topo = js_topo
    seen = []

    async def handler(ev, delivery):
        seen.append(ev.id)
        return []

    loop = ConsumerLoop(nc, js, topo, topo.consumers["generator"], handler)
    task = asyncio.create_task(loop.run())
    other, mine, plain = request(), request(), request()
    for ev, target in ((other, "validator"), (mine, "generator"), (plain, None)):
        headers, body = encode_binary(ev)
        if target:
            headers[H_REPLAY_FOR] = target
        await js.publish(topo.subject(GENERATION_REQUESTED), body, headers=headers)
    # not even decoded when it is not ours: garbage replayed for another consumer is acked, not dead-lettered
    await js.publish(topo.subject(GENERATION_REQUESTED), b"\xff not an event", headers={H_REPLAY_FOR: "validator"})
    await wait_for(lambda: loop.stats.acked == 2 and len(seen) == 2, what="two handled")

    async def all_acked():
        ci = await js.consumer_info(topo.events_stream, "generator")
        return ci.num_ack_pending == 0 and ci.num_pending == 0

    await wait_for(all_acked, what="the skipped replay acked too")
    await loop.stop()
    await task
    assert sorted(seen) == sorted([mine.id, plain.id])
    assert loop.stats.dead == 0


async def test_work_longer_than_ack_wait_is_kept_alive_not_redelivered(nc, js_topo):
    from dataclasses import replace as _replace

    js, topo = js_topo
    # ack_wait 2 s: the loop's +WPI every ack_wait / 3 leaves 1.3 s of slack per period for a
    # loaded machine to be late in (0.6 s / 0.2 s left 0.4 s, too little under CPU contention).
    ack_wait = 2.0
    spec = _replace(topo.consumers["generator"], ack_wait_s=ack_wait)
    await provision(js, topo, consumers=[], extra=[spec])
    calls = []

    async def slow(ev, delivery):
        calls.append(ev.id)
        await asyncio.sleep(2.5 * ack_wait)  # the work itself outlasts two ack_waits
        return []

    loop = ConsumerLoop(nc, js, topo, spec, slow)
    task = asyncio.create_task(loop.run())
    await Publisher(js, topo.prefix).publish(request())
    await wait_for(lambda: loop.stats.acked == 1, timeout=60, what="the slow message acked")
    await loop.stop()
    await task
    assert len(calls) == 1, "redelivered while still being worked on"
    ci = await js.consumer_info(topo.events_stream, "generator")
    assert ci.num_redelivered == 0
