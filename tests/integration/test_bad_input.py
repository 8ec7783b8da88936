"""Bad input against the real services: every malformed message lands in the
dead-letter stream with its reason, once per consumer that received it, the
telemetry sink mirrors it as a ``malformed`` line with that reason, and the good
messages around it are all handled (a poison message blocks nothing)."""

from __future__ import annotations

import asyncio
import collections
import json
import uuid

import pytest

from bus.publisher import Publisher
from bus.topology import Topology
from contracts.catalogue import CONTENT_GENERATED, GENERATION_REQUESTED
from contracts.envelope import new_event
from contracts.events import GenerationRequested
from services.runtime import run_service
from tests.conftest import wait_for

SERVICES = ("generator", "validator", "assembler", "telemetry")


def good_headers(event_type: str = GENERATION_REQUESTED) -> dict[str, str]:
    eid = str(uuid.uuid4())
    return {
        "ce-specversion": "1.0",
        "ce-id": eid,
        "ce-source": "urn:test",
        "ce-type": event_type,
        "ce-datacontenttype": "application/json",
        "Nats-Msg-Id": eid,
    }


GOOD_BODY = json.dumps({"content_config_id": "hello-world"}).encode()

# (name, headers change, body, expected dead-letter code)
MALFORMED = [
    ("missing id", lambda h: {k: v for k, v in h.items() if k != "ce-id"}, GOOD_BODY, "MISSING_ATTRIBUTE"),
    ("missing source", lambda h: {k: v for k, v in h.items() if k != "ce-source"}, GOOD_BODY, "MISSING_ATTRIBUTE"),
    ("wrong specversion", lambda h: h | {"ce-specversion": "0.3"}, GOOD_BODY, "BAD_SPECVERSION"),
    ("invalid json", lambda h: h, b'{"content_config_id": ', "INVALID_JSON"),
    ("wrong datacontenttype", lambda h: h | {"ce-datacontenttype": "application/xml"}, b"<x/>", "BAD_CONTENT_TYPE"),
    ("data not matching the schema", lambda h: h, b'{"context": []}', "INVALID_DATA"),
    (
        "oversized data",
        lambda h: h,
        b'{"content_config_id": "hello-world", "context": {"x": "' + b"a" * (1 << 20) + b'"}}',
        "OVERSIZED",
    ),
    ("invalid percent-encoding", lambda h: h | {"ce-subject": "100%"}, GOOD_BODY, "BAD_HEADER_ENCODING"),
    ("invalid UTF-8 behind percent-encoding", lambda h: h | {"ce-source": "%FF%FE"}, GOOD_BODY, "BAD_HEADER_ENCODING"),
    ("unknown type on a known subject", lambda h: h | {"ce-type": "com.example.unknown"}, GOOD_BODY, "UNKNOWN_TYPE"),
    ("no CloudEvent at all", lambda h: {}, b"hello", "NOT_A_CLOUDEVENT"),
]


async def settled(js, topo: Topology) -> bool:
    """Every service's consumer has nothing pending and nothing unacknowledged."""
    for c in await js.consumers_info(topo.events_stream):
        if c.name in SERVICES and (c.num_ack_pending or c.num_pending):
            return False
    return True


@pytest.fixture
async def services(settings):
    settings.max_deliver = 3
    stop = asyncio.Event()
    tasks = [asyncio.create_task(run_service(name, settings, stop=stop)) for name in SERVICES]
    ready = settings.home / "run"
    await wait_for(
        lambda: ready.exists() and len(list(ready.glob("*.json"))) == len(SERVICES), timeout=30, what="services ready"
    )
    yield
    stop.set()
    await asyncio.gather(*tasks)


async def test_malformed_events_are_dead_lettered_and_nothing_else_is_lost(nc, settings, services):
    js = nc.jetstream()
    topo = Topology.from_settings(settings)
    subject = topo.subject(GENERATION_REQUESTED)
    good = []
    for name, change, body, _ in MALFORMED:
        await js.publish(subject, body, headers=change(good_headers()))
        ev = new_event(
            GENERATION_REQUESTED,
            GenerationRequested(content_config_id="hello-world", context={"case": name}),
            source="t",
        )
        await Publisher(js, topo.prefix).publish(ev)
        good.append(ev.id)

    # Every good request gets its outcome, despite the bad messages in between.
    outcomes: dict[str, str] = {}

    async def collect():
        sub = await js.subscribe(topo.subject(CONTENT_GENERATED), ordered_consumer=True)
        try:
            while len(outcomes) < len(good):
                msg = await sub.next_msg(timeout=20)
                body = json.loads(msg.data)
                outcomes[body["request_id"]] = body["status"]
        finally:
            await sub.unsubscribe()

    await asyncio.wait_for(collect(), 30)
    assert {outcomes[i] for i in good} == {"success"}

    # Each malformed message is dead-lettered by each consumer of its subject (the generator).
    expected = collections.Counter()
    for _, _, _, code in MALFORMED:
        expected[("generator", code)] += 1

    async def dead_letters() -> collections.Counter:
        info = await js.stream_info(topo.dlq_stream)
        got = collections.Counter()
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            m = await js.get_msg(topo.dlq_stream, seq)
            got[(m.headers["Chora-Dlq-Consumer"], m.headers["Chora-Dlq-Code"])] += 1
        return got

    async def all_there():
        return await dead_letters() == expected

    await wait_for(all_there, timeout=30, what="one dead letter per malformed message and consumer")
    m = await js.get_msg(topo.dlq_stream, (await js.stream_info(topo.dlq_stream)).state.first_seq)
    assert m.headers["Chora-Dlq-Reason"] and m.headers["Chora-Dlq-Subject"] == subject

    # Nothing is left unacknowledged or waiting for a retry.
    await wait_for(lambda: settled(js, topo), timeout=30, what="every consumer settled")

    # The sink mirrors every stream message once, in order; a malformed one as a `malformed`
    # line with its code. It reads the envelope, not the payload: data that does not match its
    # type's schema and a type it does not know are mirrored as they are.
    mirrored_as_is = {"INVALID_DATA", "UNKNOWN_TYPE"}
    want = sorted(code for *_, code in MALFORMED if code not in mirrored_as_is)

    def malformed_lines() -> list[dict]:
        try:
            raw = settings.jsonl_path.read_bytes()
        except FileNotFoundError:
            return []
        return [r for r in map(json.loads, raw.splitlines()) if r["status"] == "malformed"]

    await wait_for(lambda: len(malformed_lines()) == len(want), timeout=30, what="a malformed line per bad message")
    assert sorted(r["error_code"] for r in malformed_lines()) == want
    seqs = [json.loads(x)["seq"] for x in settings.jsonl_path.read_bytes().splitlines()]
    assert seqs == sorted(set(seqs))


async def test_a_bad_config_is_an_error_event_not_a_dead_letter(nc, settings, services):
    js = nc.jetstream()
    topo = Topology.from_settings(settings)
    pub = Publisher(js, topo.prefix)
    cases = {"no-such-config": "CONFIG_NOT_FOUND", "../etc/passwd": "INVALID_CONFIG_ID", "Hello": "INVALID_CONFIG_ID"}
    ids = {}
    for config_id in cases:
        ev = new_event(GENERATION_REQUESTED, GenerationRequested(content_config_id=config_id), source="t")
        await pub.publish(ev)
        ids[ev.id] = config_id
    got = {}
    sub = await js.subscribe(topo.subject(CONTENT_GENERATED), ordered_consumer=True)
    while len(got) < len(ids):
        body = json.loads((await sub.next_msg(timeout=20)).data)
        if body["request_id"] in ids:
            got[ids[body["request_id"]]] = (body["status"], body["error"]["code"])
    await sub.unsubscribe()
    assert got == {cid: ("error", code) for cid, code in cases.items()}
    # every service has handled (or given up on) everything it was sent: only then can the
    # dead-letter stream's emptiness mean that nobody dead-lettered these requests
    await wait_for(lambda: settled(js, topo), timeout=30, what="every consumer settled")
    info = await js.stream_info(topo.dlq_stream)
    assert info.state.messages == 0
