"""A reference suite for bus/, after the universal Pub/Sub suite Watermill runs
against every transport. Each case gets a fresh nats-server and its own prefix."""

from __future__ import annotations

import asyncio
import collections
from dataclasses import replace

import pytest
from nats.errors import BadSubjectError
from nats.js.errors import APIError, NoStreamResponseError

from bus.consumer import ConsumerLoop, Retry
from bus.publisher import PubAcks, PublishError, Publisher
from bus.topology import Topology, provision
from contracts.catalogue import CONTENT_GENERATED, GENERATION_REQUESTED
from contracts.envelope import new_event
from contracts.events import ContentGenerated, GenerationRequested
from tests.conftest import wait_for


def req(i: int):
    return new_event(GENERATION_REQUESTED, GenerationRequested(content_config_id="c", context={"i": i}), source="suite")


def fact(i: int):
    return new_event(
        CONTENT_GENERATED, ContentGenerated(request_id=str(i), content_config_id="c", status="success"), source="suite"
    )


class Recorder:
    """A handler that records what it saw (and may be told to fail or block)."""

    def __init__(self):
        self.ids: list[str] = []
        self.counts: collections.Counter = collections.Counter()

    async def __call__(self, ev, delivery):
        self.ids.append(ev.id)
        self.counts[ev.id] += 1
        return []


@pytest.fixture
async def bus(nc, settings):
    js = nc.jetstream()
    topo = Topology.from_settings(settings)
    await provision(js, topo)
    loops: list[tuple[ConsumerLoop, asyncio.Task]] = []

    def start(handler, consumer="generator", spec=None, **kw) -> ConsumerLoop:
        loop = ConsumerLoop(nc, js, topo, spec or topo.consumers[consumer], handler, **kw)
        loops.append((loop, asyncio.create_task(loop.run())))
        return loop

    yield js, topo, Publisher(js, topo.prefix), start
    for loop, task in loops:
        await loop.stop(timeout=5)
        await task


async def publish_all(pub: Publisher, events, window: int = 1000):
    for i in range(0, len(events), window):
        await pub.publish_many(events[i : i + window])


@pytest.mark.parametrize("direct", [True, False], ids=["read-loop", "nats-py-callback"])
async def test_publish_subscribe(bus, direct):
    js, topo, pub, start = bus
    rec = Recorder()
    loop = start(rec, direct=direct)
    events = [req(i) for i in range(100)]
    await publish_all(pub, events)
    await wait_for(lambda: len(rec.counts) == 100, what="100 messages")
    assert set(rec.counts) == {e.id for e in events}
    # the loop took the path asked for: its subscription is in the read loop's table, or not
    table = getattr(js._nc, "_chora_direct", None) or {}
    assert (loop._sub._id in table) is direct


@pytest.mark.parametrize("fast", [True, False], ids=["pubacks", "nats-py-publish-async"])
async def test_both_publish_paths_store_once_and_tell_a_duplicate(nc, settings, fast):
    js = nc.jetstream()
    topo = Topology.from_settings(settings)
    await provision(js, topo)
    pub = Publisher(js, topo.prefix, fast=fast)
    assert pub.fast is fast
    ev = req(1)
    first, again = await pub.publish(ev), await pub.publish(ev)
    assert (first.stream, first.duplicate) == (topo.events_stream, None)
    assert again.seq == first.seq and again.duplicate is True
    acks = await pub.publish_many([req(i) for i in range(2, 502)])
    assert [a.seq for a in acks] == list(range(first.seq + 1, first.seq + 501))


async def test_a_publish_the_stream_refuses_is_the_servers_error(nc):
    js = nc.jetstream()
    await js.add_stream(name="TINY", subjects=["tiny.>"], max_msg_size=64)
    pub = Publisher(js, "tiny")
    with pytest.raises(APIError) as e:
        await pub.publish(req(1))
    assert e.value.code == 400 and "size" in (e.value.description or "")
    assert (await PubAcks.of(nc)).pending == 0  # nothing left waiting for an answer


async def test_concurrent_subscribers_each_get_everything(bus):
    js, topo, pub, start = bus
    recs = [Recorder() for _ in range(4)]
    for n, rec in enumerate(recs):
        spec = topo.consumer_spec(f"fan-{n}", (GENERATION_REQUESTED,))
        await provision(js, topo, consumers=[], extra=[spec])
        start(rec, spec=spec)
    events = [req(i) for i in range(300)]
    await publish_all(pub, events)
    await wait_for(lambda: all(len(r.counts) == 300 for r in recs), what="each subscriber sees all 300")


async def test_several_subjects_at_once(bus):
    js, topo, pub, start = bus
    rec = Recorder()
    spec = topo.consumer_spec("both", (GENERATION_REQUESTED, CONTENT_GENERATED))
    await provision(js, topo, consumers=[], extra=[spec])
    start(rec, spec=spec)
    events = [req(i) for i in range(50)] + [fact(i) for i in range(50)]
    await publish_all(pub, events)
    await wait_for(lambda: len(rec.counts) == 100, what="messages from both subjects")


async def test_redelivery_after_nak(bus):
    js, topo, pub, start = bus
    seen = collections.Counter()

    async def flaky(ev, delivery):
        seen[ev.id] += 1
        if seen[ev.id] == 1:
            raise Retry("first time fails", delay=0.01)
        return []

    loop = start(flaky)
    events = [req(i) for i in range(20)]
    await publish_all(pub, events)
    await wait_for(lambda: loop.stats.acked == 20, what="20 acks after one nak each")
    assert all(seen[e.id] == 2 for e in events)


async def test_no_progress_past_max_ack_pending_without_acks(bus):
    js, topo, pub, start = bus
    spec = replace(topo.consumers["generator"], durable="capped", max_ack_pending=10)
    await provision(js, topo, consumers=[], extra=[spec])
    release = asyncio.Event()
    started = []

    async def blocking(ev, delivery):
        started.append(ev.id)
        await release.wait()
        return []

    loop = start(blocking, spec=spec, max_in_flight=100)
    await publish_all(pub, [req(i) for i in range(50)])
    await wait_for(lambda: len(started) == 10, what="10 in flight")

    async def capped():
        ci = await js.consumer_info(topo.events_stream, "capped")
        return ci.num_ack_pending == 10 and ci.num_pending == 40

    await wait_for(capped, what="server holds back past max_ack_pending")
    assert len(started) == 10
    release.set()
    await wait_for(lambda: loop.stats.acked == 50, what="all 50 once acks flow")


# A message in flight at the moment a subscriber closes comes back after ack_wait:
# the closing tests use a short one so that such a message is seen again within the test.
def short_ack_wait(topo):
    return replace(topo.consumers["generator"], ack_wait_s=2.0)


async def test_continue_after_subscriber_closes(bus):
    js, topo, pub, start = bus
    await provision(js, topo, consumers=[], extra=[short_ack_wait(topo)])
    rec = Recorder()
    first = start(rec, spec=short_ack_wait(topo), max_in_flight=10, pull_batch=10)
    events = [req(i) for i in range(500)]
    await publish_all(pub, events)
    await wait_for(lambda: first.stats.acked >= 100, what="first subscriber makes progress")
    await first.stop()
    start(rec, spec=short_ack_wait(topo))
    await wait_for(lambda: set(rec.counts) == {e.id for e in events}, what="second subscriber finishes the rest")


async def test_subscribers_closing_concurrently(bus):
    js, topo, pub, start = bus
    await provision(js, topo, consumers=[], extra=[short_ack_wait(topo)])
    rec = Recorder()
    loops = [start(rec, spec=short_ack_wait(topo), max_in_flight=8, pull_batch=8) for _ in range(5)]
    events = [req(i) for i in range(1000)]
    await publish_all(pub, events)
    await wait_for(lambda: sum(lp.stats.acked for lp in loops) >= 200, what="progress before closing")
    await asyncio.gather(*(lp.stop() for lp in loops))
    start(rec, spec=short_ack_wait(topo))
    await wait_for(lambda: set(rec.counts) == {e.id for e in events}, what="a new subscriber finishes the rest")


async def test_continue_after_errors(bus):
    js, topo, pub, start = bus
    ok = set()
    tries = collections.Counter()

    async def sometimes(ev, delivery):
        tries[ev.id] += 1
        if ev.data.context["i"] % 3 == 0 and tries[ev.id] < 3:
            raise RuntimeError("transient")
        ok.add(ev.id)
        return []

    spec = replace(topo.consumers["generator"], backoff_s=(0.01,))
    start(sometimes, spec=spec)
    events = [req(i) for i in range(90)]
    await publish_all(pub, events)
    await wait_for(lambda: len(ok) == 90, what="every message handled despite errors")
    assert sum(1 for e in events if tries[e.id] == 3) == 30


async def test_order_with_a_single_subscriber(bus):
    js, topo, pub, start = bus
    rec = Recorder()
    start(rec, max_in_flight=1, pull_batch=1)
    events = [req(i) for i in range(200)]
    await publish_all(pub, events)
    await wait_for(lambda: len(rec.ids) == 200, what="200 messages")
    assert rec.ids == [e.id for e in events]


async def test_ten_thousand_published_then_publisher_closed_none_lost(nats_server, settings):
    import nats

    pub_nc = await nats.connect(nats_server.url)
    js = pub_nc.jetstream()
    topo = Topology.from_settings(settings)
    await provision(js, topo)
    events = [req(i) for i in range(10_000)]
    await publish_all(Publisher(js, topo.prefix), events)
    await pub_nc.close()

    nc = await nats.connect(nats_server.url)
    rec = Recorder()
    loop = ConsumerLoop(nc, nc.jetstream(), topo, topo.consumers["generator"], rec)
    task = asyncio.create_task(loop.run())
    try:
        await wait_for(lambda: len(rec.counts) == 10_000, timeout=60, what="10,000 messages")
    finally:
        await loop.stop()
        await task
        await nc.close()
    assert set(rec.counts) == {e.id for e in events}


async def test_subject_isolation(bus):
    js, topo, pub, start = bus
    rec = Recorder()
    start(rec)  # the generator consumer: generation requests only
    await publish_all(pub, [fact(i) for i in range(30)])
    other = Publisher(js, "someone-else")  # another prefix: no stream captures it, nothing answers
    with pytest.raises(NoStreamResponseError):
        await other.publish(req(0))
    marker = req(999)
    await pub.publish(marker)
    await wait_for(lambda: marker.id in rec.counts, what="the marker")
    assert list(rec.counts) == [marker.id]


async def test_a_publish_nobody_acknowledges_is_an_error_after_the_timeout(nc):
    # a plain subscriber on the subject and no stream: the message is taken, no PubAck ever comes
    seen: list[str] = []

    async def silent(msg) -> None:
        seen.append(msg.subject)

    await nc.subscribe("mute.>", cb=silent)
    pub = Publisher(nc.jetstream(), "mute", timeout=0.3)
    with pytest.raises(PublishError, match=r"no PubAck within 0.3s"):
        await pub.publish_many([req(1), req(2)])
    assert seen == ["mute.generation.requested"] * 2
    # and a caller that gives up first is cancelled, not told the publish failed
    task = asyncio.create_task(pub.publish(req(3)))
    await wait_for(lambda: len(seen) == 3, what="the third publish on the wire")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_publish_that_cannot_go_out_is_an_error_and_leaves_nothing_waiting(nc, settings):
    js = nc.jetstream()
    topo = Topology.from_settings(settings)
    await provision(js, topo)
    with pytest.raises(BadSubjectError):  # a prefix that is not a subject token: refused before the wire
        await Publisher(js, "two words").publish(req(1))
    pub = Publisher(js, topo.prefix, max_bytes=2000)
    big = new_event(
        GENERATION_REQUESTED, GenerationRequested(content_config_id="c", context={"x": "y" * 5000}), source="t"
    )
    with pytest.raises(PublishError, match="over 2000"):
        await pub.publish_many([req(2), big])  # the first went out, the second cannot
    assert (await PubAcks.of(nc)).pending == 0
    assert (await pub.publish(req(3))).seq == 2  # req(2) was stored; the connection is fine


async def test_new_subscriber_receives_old_messages(bus):
    js, topo, pub, start = bus
    events = [req(i) for i in range(40)]
    await publish_all(pub, events)
    late = topo.consumer_spec("late-joiner", (GENERATION_REQUESTED,))
    await provision(js, topo, consumers=[], extra=[late])  # created after the messages
    rec = Recorder()
    start(rec, spec=late)
    await wait_for(lambda: set(rec.counts) == {e.id for e in events}, what="the old messages")


@pytest.mark.parametrize("at", [1 / 3, 1 / 2])
async def test_reconnect_with_server_restarted_mid_stream(nats_server, settings, at):
    import nats

    total = 10_000
    nc = await nats.connect(nats_server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.1)
    js = nc.jetstream()
    topo = Topology.from_settings(settings)
    await provision(js, topo)
    rec = Recorder()
    loop = ConsumerLoop(nc, js, topo, topo.consumers["generator"], rec, heartbeat_s=0.5)
    task = asyncio.create_task(loop.run())
    pub = Publisher(js, topo.prefix, timeout=2)
    events = [req(i) for i in range(total)]
    received_at_restart: int | None = None
    published_at_restart = 0
    try:
        i = 0
        while i < total:
            if received_at_restart is None and i >= int(total * at):
                received_at_restart, published_at_restart = len(rec.counts), i
                nats_server.stop()
                nats_server.restart()
            chunk = events[i : i + 250]
            try:
                await pub.publish_many(chunk)  # same Nats-Msg-Id on a retry: no duplicates stored
            except Exception:
                await asyncio.sleep(0.1)  # the client is reconnecting; then publish the chunk again
                continue
            i += len(chunk)
        await wait_for(lambda: set(rec.counts) >= {e.id for e in events}, timeout=60, what="all 10,000 after restart")
        info = await js.stream_info(topo.events_stream)
        assert info.state.messages == total
    finally:
        await loop.stop()
        await task
        await nc.close()
    # the restart cut a running stream: the client reconnected, part of the messages had been
    # consumed before it and the rest (published after it) were consumed over the new connection
    assert nc.stats["reconnects"] >= 1
    assert received_at_restart is not None and 0 < received_at_restart <= published_at_restart < total


async def test_consumer_group_shares_the_work(bus):
    js, topo, pub, start = bus
    a, b = Recorder(), Recorder()
    la = start(a, max_in_flight=16, pull_batch=16)
    lb = start(b, max_in_flight=16, pull_batch=16)
    events = [req(i) for i in range(2000)]
    await publish_all(pub, events)
    await wait_for(lambda: la.stats.acked + lb.stats.acked == 2000, what="2,000 acks between two instances")
    assert set(a.counts) | set(b.counts) == {e.id for e in events}
    assert not set(a.counts) & set(b.counts), "a message went to both instances"
    assert a.counts and b.counts, "one instance did all the work"
