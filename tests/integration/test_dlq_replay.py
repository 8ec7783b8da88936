"""Dead letters against a real nats-server: list, replay, advisories, and the `chora dlq` command."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys

import pytest
from nats.js.api import AckPolicy, ConsumerConfig

from bus.consumer import ConsumerLoop, Reject
from bus.dlq import DlqError, list_dead_letters, read, replay
from bus.publisher import Publisher
from bus.topology import Topology, provision
from chora.commands.dlq import run_list, run_replay
from contracts.catalogue import CONTENT_GENERATED, GENERATION_REQUESTED
from contracts.envelope import decode, encode_binary, new_event
from contracts.events import GenerationRequested
from tests.conftest import child_env, wait_for
from tests.integration.test_notifier_webhooks import Notifier, generated, publish, subscription
from tests.webhook import Webhook


def request(config_id: str) -> object:
    return new_event(GENERATION_REQUESTED, GenerationRequested(content_config_id=config_id), source="test")


@pytest.fixture
async def topo(nc, settings) -> Topology:
    t = Topology.from_settings(settings)
    await provision(nc.jetstream(), t, consumers=["generator"])
    return t


class Picky:
    """A generator-like handler that rejects configs named in ``refuse`` with ``code``, and records
    every call and what it handled."""

    def __init__(self, *refuse: str, code: str = "CONFIG_BROKEN"):
        self.refuse = set(refuse)
        self.code = code
        self.calls: list = []
        self.handled: list = []

    async def __call__(self, ev, delivery):
        self.calls.append(ev)
        if ev.data.content_config_id in self.refuse:
            raise Reject(self.code, f"cannot render {ev.data.content_config_id}")
        self.handled.append(ev)
        return []


async def dead_letters_from_a_loop(nc, topo, handler, *events):
    loop = ConsumerLoop(nc, nc.jetstream(), topo, topo.consumers["generator"], handler)
    task = asyncio.create_task(loop.run())
    await Publisher(nc.jetstream(), topo.prefix).publish_many(events)
    return loop, task


async def test_list_then_replay_one_to_the_consumer_that_failed(nc, settings, topo):
    js = nc.jetstream()
    picky = Picky("broken")
    bad1, good, bad2 = request("broken"), request("fine"), request("broken")
    loop, task = await dead_letters_from_a_loop(nc, topo, picky, bad1, good, bad2)
    try:
        await wait_for(lambda: loop.stats.dead == 2 and loop.stats.acked == 1, 10, "2 dead letters, 1 ack")
        entries = await list_dead_letters(js, topo)
        assert [(d.consumer, d.code, d.event_id, d.event_type) for d in entries] == [
            ("generator", "CONFIG_BROKEN", bad1.id, GENERATION_REQUESTED),
            ("generator", "CONFIG_BROKEN", bad2.id, GENERATION_REQUESTED),
        ]
        first = entries[0]
        assert first.subject == topo.subject(GENERATION_REQUESTED) and first.deliveries == 1
        assert "cannot render broken" in first.reason and first.time is not None
        assert not any(k.startswith("Chora-Dlq-") for k in first.headers)
        assert [d.seq for d in await list_dead_letters(js, topo, limit=1)] == [first.seq]
        assert await list_dead_letters(js, topo, consumer="validator") == []

        out = io.StringIO()
        assert await run_list(nc, settings, out=out) == 0
        lines = out.getvalue().splitlines()
        assert len(lines) == 2
        fields = lines[0].split("  ")
        assert fields[0] == str(first.seq) and fields[2:7] == [
            "generator",
            first.subject,
            "CONFIG_BROKEN",
            GENERATION_REQUESTED,
            bad1.id,
        ]

        picky.refuse.clear()  # "fixed"
        # Replaying the same id twice inside the duplicate window would be dropped: the replay has its own msg id.
        r = await replay(js, topo, first.seq)
        assert r.msg_id == f"{bad1.id}:replay:{first.seq}" and not r.duplicate
        await wait_for(lambda: any(e.id == bad1.id for e in picky.handled), 10, "the replayed request handled")
        replayed = next(e for e in picky.handled if e.id == bad1.id)
        assert replayed.data.content_config_id == "broken"
        assert replayed.extensions == {}  # the replay marks are NATS headers, not part of the event

        stored = await js.get_msg(topo.events_stream, r.stream_seq)
        assert stored.headers["ce-id"] == bad1.id and stored.headers["Nats-Msg-Id"] == r.msg_id
        assert stored.headers["Chora-Replayed-From"] == f"{topo.dlq_stream}:{first.seq}"
        assert stored.headers["Chora-Replay-For"] == "generator"
        assert [d.seq for d in await list_dead_letters(js, topo)] == [entries[1].seq]  # deleted after the ack
        with pytest.raises(DlqError, match=f"no dead letter {first.seq}"):
            await replay(js, topo, first.seq)
    finally:
        await loop.stop()
        await task


async def test_replay_all_for_one_consumer(nc, settings, topo):
    js = nc.jetstream()
    picky = Picky("a", "b")
    reqs = [request("a"), request("b")]
    loop, task = await dead_letters_from_a_loop(nc, topo, picky, *reqs)
    try:
        await wait_for(lambda: loop.stats.dead == 2, 10, "2 dead letters")
        # a dead letter of another consumer stays where it is
        await js.publish(
            topo.dlq_subject("validator"), b"{}", headers={"Chora-Dlq-Code": "X", "Chora-Dlq-Consumer": "validator"}
        )
        picky.refuse.clear()
        out = io.StringIO()
        assert await run_replay(nc, settings, all_=True, consumer="generator", out=out) == 0
        assert out.getvalue().count("replayed ") == 2
        await wait_for(lambda: {e.id for e in picky.handled} == {r.id for r in reqs}, 10, "both handled")
        left = await list_dead_letters(js, topo)
        assert [d.consumer for d in left] == ["validator"]
        # that one has no original subject: replay says so and leaves it
        assert await run_replay(nc, settings, ids=[left[0].seq], out=io.StringIO()) == 1
        assert len(await list_dead_letters(js, topo)) == 1
    finally:
        await loop.stop()
        await task


async def test_max_deliveries_advisory_is_listed_and_replayed_from_the_events_stream(nc, settings, topo):
    js = nc.jetstream()
    ev = generated()
    await Publisher(js, topo.prefix).publish(ev)
    # A consumer that gives up after 2 deliveries without the loop (as when a process dies on the last one).
    await js.add_consumer(
        topo.events_stream,
        ConsumerConfig(
            durable_name="raw",
            max_deliver=2,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=30,
            filter_subject=topo.subject(CONTENT_GENERATED),
        ),
    )
    sub = await js.pull_subscribe_bind("raw", stream=topo.events_stream)
    for _ in range(2):
        [msg] = await sub.fetch(1, timeout=5)
        await msg.nak()

    async def advisory():
        try:
            await sub.fetch(1, timeout=0.2)  # a pending pull lets the server notice max deliveries
        except Exception:
            pass
        return await list_dead_letters(js, topo, consumer="raw")

    [adv] = await wait_for(advisory, 10, "the MAX_DELIVERIES advisory in the DLQ")
    assert adv.advisory and adv.code == "MAX_DELIVERIES" and adv.deliveries == 2
    assert (adv.event_id, adv.event_type, adv.subject) == (
        ev.id,
        CONTENT_GENERATED,
        f"{topo.prefix}.content_generated.standalone",
    )
    assert (await read(js, topo, adv.seq)).stream_seq == adv.stream_seq

    r = await replay(js, topo, adv.seq)
    assert r.msg_id == f"{ev.id}:replay:{adv.seq}"
    [again] = await sub.fetch(1, timeout=5)  # the consumer that gave up gets it again
    await again.ack()
    assert decode(again.headers, again.data).id == ev.id
    assert again.metadata.sequence.stream == r.stream_seq
    assert await list_dead_letters(js, topo) == []


async def test_replayed_notification_is_delivered_once_the_endpoint_is_back(nc, settings, tmp_path, monkeypatch):
    healthy = {"up": False}
    with Webhook(lambda n: (200, {}) if healthy["up"] else (500, {})) as flaky, Webhook() as other:
        subs = [subscription("flaky", flaky.url, max_attempts=2), subscription("other", other.url)]
        async with Notifier(nc, settings, tmp_path, monkeypatch, subs) as n:
            js = nc.jetstream()
            ev = generated()
            await publish(nc, settings, ev)
            await wait_for(lambda: n.failed("flaky") and n.delivered("other"), 10, "a failure and a delivery")
            [dl] = await wait_for(lambda: list_dead_letters(js, n.topo, consumer="notify-flaky"), 10, "the dead letter")
            assert (dl.code, dl.event_id, dl.event_type) == ("MAX_ATTEMPTS", ev.id, CONTENT_GENERATED)
            assert "HTTP_500" in dl.reason

            healthy["up"] = True
            out = io.StringIO()
            assert await run_replay(nc, settings, ids=[dl.seq], out=out) == 0
            await wait_for(lambda: n.delivered("flaky"), 10, "the replayed notification delivered")
            [d] = n.delivered("flaky")
            assert d.event_id == ev.id and d.status_code == 200
            last = flaky.received[-1].headers
            assert flaky.received[-1].event["id"] == ev.id and last["Idempotency-Key"] == f"{ev.id}:flaky"
            assert not {k.lower() for k in last} & {"chora-replay-for", "chora-replayed-from"}
            # The other subscription saw the replayed message too, and left it alone.
            await wait_for(lambda: n.settled("notify-other"), 10, "notify-other to settle")
            ci = await js.consumer_info(n.topo.events_stream, "notify-other")
            assert ci.delivered.stream_seq > dl.stream_seq  # it was offered the replay
            assert len(other.received) == 1 and len(n.delivered("other")) == 1
            assert await list_dead_letters(js, n.topo) == []


def test_the_dlq_command(nats_server, settings, tmp_path):
    async def make_dead_letter() -> str:
        import nats

        nc = await nats.connect(nats_server.url)
        try:
            topo = Topology.from_settings(settings)
            await provision(nc.jetstream(), topo, consumers=["generator"])
            req = request("broken")
            loop, task = await dead_letters_from_a_loop(nc, topo, Picky("broken"), req)
            await wait_for(lambda: loop.stats.dead == 1, 10, "a dead letter")
            await loop.stop()
            await task
            return req.id
        finally:
            await nc.close()

    event_id = asyncio.run(make_dead_letter())
    env = child_env(NATS_URL=nats_server.url, CHORA_PREFIX=settings.prefix, CHORA_HOME=str(tmp_path / "var"))

    def chora(*args):
        return subprocess.run(
            [sys.executable, "-m", "chora", "dlq", *args], env=env, capture_output=True, text=True, timeout=60
        )

    listed = chora("list", "--json")
    assert listed.returncode == 0, listed.stderr
    [entry] = [json.loads(ln) for ln in listed.stdout.splitlines()]
    assert entry["event_id"] == event_id and entry["consumer"] == "generator" and entry["code"] == "CONFIG_BROKEN"
    assert chora("replay").returncode == 64  # neither ids nor --all
    replayed = chora("replay", "--all")
    assert replayed.returncode == 0, replayed.stderr
    assert f"replayed {entry['seq']} -> " in replayed.stdout
    empty = chora("list")
    assert empty.returncode == 0 and empty.stdout == "" and "no dead letters" in empty.stderr


async def dead_letters_except(js, topo, seq: int) -> list:
    return [d for d in await list_dead_letters(js, topo) if d.seq != seq]


async def test_a_replay_that_fails_again_is_one_new_dead_letter_with_its_code_and_a_link(nc, settings, topo):
    js = nc.jetstream()
    picky = Picky("broken")
    bad = request("broken")
    loop, task = await dead_letters_from_a_loop(nc, topo, picky, bad)
    try:
        [first] = await wait_for(lambda: list_dead_letters(js, topo), 10, "the first dead letter")
        picky.code = "STILL_BROKEN"  # fails again, for another reason
        r = await replay(js, topo, first.seq)
        assert "Nats-Expected-Stream" in (await js.get_msg(topo.events_stream, r.stream_seq)).headers

        [again] = await wait_for(lambda: dead_letters_except(js, topo, first.seq), 10, "the replay's dead letter")
        assert (again.code, again.event_id, again.stream_seq, again.deliveries) == (
            "STILL_BROKEN",
            bad.id,
            r.stream_seq,
            1,
        )
        assert "cannot render broken" in again.reason
        assert again.replay_of == f"{topo.dlq_stream}:{first.seq}"
        raw = await js.get_msg(topo.dlq_stream, again.seq)
        assert not [k for k in raw.headers if k.startswith("Nats-") and k != "Nats-Msg-Id"]
        assert "Chora-Replay-For" not in raw.headers and "Chora-Replayed-From" not in raw.headers

        async def settled():
            ci = await js.consumer_info(topo.events_stream, "generator")
            return ci.num_pending == 0 and ci.num_ack_pending == 0 and ci

        ci = await wait_for(settled, 10, "the generator consumer to settle")
        assert ci.num_redelivered == 0 and loop.stats.naked == 0
        assert len(picky.calls) == 2  # the original and the replay, once each
        assert [d.seq for d in await list_dead_letters(js, topo)] == [again.seq]

        out = io.StringIO()
        assert await run_list(nc, settings, as_json_lines=True, out=out) == 0
        assert json.loads(out.getvalue())["replay_of"] == again.replay_of
    finally:
        await loop.stop()
        await task


async def test_a_replay_of_an_undecodable_message_reaches_only_the_consumer_it_targets(nc, settings, topo):
    js = nc.jetstream()
    observer = topo.consumer_spec("observer", None)  # a second consumer of every event
    await provision(js, topo, consumers=[], extra=[observer])
    seen_by_telemetry = []

    async def telemetry(ev):
        seen_by_telemetry.append(ev)
        return []

    gen = ConsumerLoop(nc, js, topo, topo.consumers["generator"], Picky())
    tel = ConsumerLoop(nc, js, topo, observer, telemetry)
    tasks = [asyncio.create_task(loop.run()) for loop in (gen, tel)]
    try:
        headers, _ = encode_binary(request("x"))
        await js.publish(topo.subject(GENERATION_REQUESTED), b"{not json", headers=headers)
        await wait_for(lambda: gen.stats.dead == 1 and tel.stats.dead == 1, 10, "a dead letter from each consumer")
        [mine] = await list_dead_letters(js, topo, consumer="generator")
        [theirs] = await list_dead_letters(js, topo, consumer="observer")

        r = await replay(js, topo, mine.seq)

        async def telemetry_past_the_replay():
            ci = await js.consumer_info(topo.events_stream, "observer")
            return ci.delivered.stream_seq >= r.stream_seq and ci.num_ack_pending == 0

        await wait_for(lambda: gen.stats.dead == 2, 10, "the generator to dead-letter the replay")
        await wait_for(telemetry_past_the_replay, 10, "the observer to ack the replay")
        assert tel.stats.dead == 1 and seen_by_telemetry == []
        entries = await list_dead_letters(js, topo)
        assert [(d.seq, d.consumer, d.replay_of) for d in entries[:1]] == [(theirs.seq, "observer", None)]
        assert len(entries) == 2  # the observer's own, and exactly one new one for the replay
        assert (entries[1].consumer, entries[1].code, entries[1].replay_of) == (
            "generator",
            mine.code,
            f"{topo.dlq_stream}:{mine.seq}",
        )
    finally:
        for loop in (gen, tel):
            await loop.stop()
        await asyncio.gather(*tasks)


async def test_a_misrouted_callback_request_is_replayed_on_its_callback_subject_for_every_consumer(nc, settings, topo):
    """A request with a callback_url on the plain subject was taken by no consumer (the loop
    refuses it before any handler). Replayed to that subject it would be refused again: it goes
    to <subject>.callback, with no Chora-Replay-For, so the notifier's durable records its
    callback and the generator renders it."""
    js = nc.jetstream()
    await provision(js, topo, consumers=["generator", "notifier-callback-requests"])
    picky = Picky()
    recorded: list[str] = []

    async def notifier(ev, delivery):
        recorded.append(ev.id)
        return []

    loops = [
        ConsumerLoop(nc, js, topo, topo.consumers["generator"], picky),
        ConsumerLoop(nc, js, topo, topo.consumers["notifier-callback-requests"], notifier),
    ]
    tasks = [asyncio.create_task(loop.run()) for loop in loops]
    try:
        data = GenerationRequested(content_config_id="x", callback_url="https://hooks.example.com/x")
        ev = new_event(GENERATION_REQUESTED, data, source="test")
        subject = topo.subject(GENERATION_REQUESTED)
        headers, body = encode_binary(ev)
        await js.publish(subject, body, headers=headers)  # a publisher that forgot .callback
        await wait_for(lambda: loops[0].stats.dead == 1, 10, "the generator's dead letter")
        [dl] = await list_dead_letters(js, topo)
        assert (dl.code, dl.subject, dl.consumer) == ("MISROUTED_CALLBACK", subject, "generator")
        assert picky.calls == [] and recorded == []

        r = await replay(js, topo, dl.seq)
        assert (r.subject, r.msg_id) == (f"{subject}.callback", f"{ev.id}:rerouted")
        await wait_for(
            lambda: [e.id for e in picky.handled] == [ev.id] and recorded == [ev.id],
            10,
            "the generator and the notifier to take the replay",
        )
        stored = await js.get_msg(topo.events_stream, r.stream_seq)
        assert stored.subject == f"{subject}.callback" and stored.headers["ce-id"] == ev.id
        assert "Chora-Replay-For" not in stored.headers
        assert stored.headers["Chora-Replayed-From"] == f"{topo.dlq_stream}:{dl.seq}"
        assert await list_dead_letters(js, topo) == [] and loops[0].stats.dead == 1
    finally:
        for loop in loops:
            await loop.stop()
        await asyncio.gather(*tasks)


async def test_a_replayed_notification_rejected_again_is_posted_once_and_dead_lettered_once(
    nc, settings, tmp_path, monkeypatch
):
    with Webhook(lambda n: (400, {})) as hook:
        async with Notifier(nc, settings, tmp_path, monkeypatch, [subscription("strict", hook.url)]) as n:
            js = nc.jetstream()
            ev = generated()
            await publish(nc, settings, ev)
            [first] = await wait_for(lambda: list_dead_letters(js, n.topo), 10, "the first dead letter")
            assert first.code == "WEBHOOK_REJECTED" and len(hook.received) == 1

            await replay(js, n.topo, first.seq)
            [again] = await wait_for(lambda: dead_letters_except(js, n.topo, first.seq), 10, "the replay's dead letter")
            assert (again.consumer, again.code, again.event_id) == ("notify-strict", "WEBHOOK_REJECTED", ev.id)
            assert "400" in again.reason and again.replay_of == f"{n.topo.dlq_stream}:{first.seq}"
            await wait_for(lambda: n.settled("notify-strict"), 10, "notify-strict to settle")
            ci = await js.consumer_info(n.topo.events_stream, "notify-strict")
            assert ci.num_redelivered == 0
            assert len(hook.received) == 2  # once for the event, once for its replay
