"""The assembler's batches against a real nats-server, with the generator (and a second
assembler instance) running in-process through run_service."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import msgspec
import nats.errors
import pytest

from bus.publisher import Publisher
from bus.topology import Topology, provision
from services.assembler.status import read_batch_status
from contracts.catalogue import BATCH_COMPLETED, BATCH_REQUESTED, CONTENT_GENERATED, GENERATION_REQUESTED
from contracts.envelope import CloudEvent, EnvelopeError, decode, new_event
from contracts.events import BatchItem, BatchItemOutcome, BatchRequested
from services.assembler.batches import completed_id
from services.runtime import ready_file, run_service
from tests.conftest import acked, wait_for


# --------------------------------------------------------------------------- helpers (shared with the other assembler tests)


@contextlib.asynccontextmanager
async def running(*pairs):
    """Run services in-process: ``running(("generator", settings), ("assembler", settings_b), ...)``.

    Waits for each one's readiness file; on exit, drains them all.
    """
    stop = asyncio.Event()
    tasks = []
    for name, s in pairs:
        for old in (s.home / "run").glob(f"{name}.*.json") if (s.home / "run").exists() else []:
            old.unlink()
        tasks.append(asyncio.create_task(run_service(name, s, stop=stop), name=f"svc-{name}"))
    try:
        for (name, s), t in zip(pairs, tasks):

            async def ready(name=name, s=s, t=t):
                if t.done():
                    t.result()  # raise what killed it
                return ready_file(s, name).exists()

            await wait_for(ready, timeout=20, what=f"{name} ready")
        yield tasks
    finally:
        stop.set()
        await asyncio.gather(*tasks)


class Collector:
    """Every event on ``<prefix>.>`` as seen by a core subscription (duplicates included)."""

    def __init__(self):
        self.events: list[CloudEvent] = []

    async def start(self, nc, prefix: str) -> "Collector":
        async def cb(msg):
            try:
                self.events.append(decode(msg.headers, msg.data, max_bytes=8 << 20))
            except EnvelopeError:
                pass

        self.sub = await nc.subscribe(f"{prefix}.>", cb=cb)
        return self

    def of(self, event_type: str, pred=lambda e: True) -> list[CloudEvent]:
        return [e for e in self.events if e.type == event_type and pred(e)]


async def stored(js, topo: Topology, event_type: str) -> list[CloudEvent]:
    """The events of ``event_type`` stored in the stream (what JetStream kept, duplicates dropped)."""
    n = await count_stored(js, topo, event_type)
    sub = await js.pull_subscribe(topo.subject(event_type), durable=None, stream=topo.events_stream)
    out: list[CloudEvent] = []
    try:
        while len(out) < n:
            for m in await sub.fetch(min(1000, n - len(out)), timeout=5):
                out.append(decode(m.headers, m.data, max_bytes=8 << 20))
                await m.ack()
    finally:
        await sub.unsubscribe()
    return out


async def count_stored(js, topo: Topology, event_type: str) -> int:
    info = await js.stream_info(topo.events_stream, subjects_filter=topo.subject(event_type))
    return sum((info.state.subjects or {}).values())  # every subject the filter matches


def batch(n: int, *, bad=(), coe=True, config="hello-world") -> BatchRequested:
    items = [
        BatchItem(content_config_id="no-such-config" if i in bad else config, context={"name": f"n{i}"})
        for i in range(n)
    ]
    return BatchRequested(items=items, context={"topics": ["x"]}, continue_on_error=coe)


@pytest.fixture
async def bus(nc, settings):
    js = nc.jetstream()
    topo = Topology.from_settings(settings)
    await provision(js, topo)
    col = await Collector().start(nc, settings.prefix)
    return js, topo, col


def completed_for(col: Collector, batch_id: str) -> list[CloudEvent]:
    return col.of(BATCH_COMPLETED, lambda e: e.data.batch_id == batch_id)


# --------------------------------------------------------------------------- tests


async def test_thousand_items_some_failing_one_completion_exact_counts(settings, bus):
    js, topo, col = bus
    bad = set(range(5, 1000, 97))
    req = new_event(BATCH_REQUESTED, batch(1000, bad=bad), source="test")
    async with running(("generator", settings), ("assembler", settings)):
        t0 = time.perf_counter()
        await Publisher(js, topo.prefix).publish(req)
        await wait_for(lambda: completed_for(col, req.id), timeout=60, what="batch_completed")
        elapsed = time.perf_counter() - t0
    (done,) = {e.id: e for e in completed_for(col, req.id)}.values()
    c = done.data
    assert done.id == completed_id(req.id)
    assert (c.status, c.total, c.successful, c.failed, c.skipped) == ("error", 1000, 1000 - len(bad), len(bad), 0)
    assert c.items is not None and [i.index for i in c.items] == list(range(1000))
    assert {i.index for i in c.items if i.status == "error"} == bad
    assert all(i.error.code == "CONFIG_NOT_FOUND" for i in c.items if i.status == "error")
    assert await count_stored(js, topo, BATCH_COMPLETED) == 1
    assert await count_stored(js, topo, GENERATION_REQUESTED) == 1000
    print(f"1,000 items end to end: {elapsed:.2f}s")


async def test_two_assembler_instances_on_one_batch(settings, bus, nc):
    js, topo, col = bus
    a = settings.model_copy(update={"home": settings.home / "a"})
    b = settings.model_copy(update={"home": settings.home / "b"})
    req = new_event(BATCH_REQUESTED, batch(1000, bad={10, 500}), source="test")
    async with running(("generator", settings), ("assembler", a), ("assembler", b)):
        await Publisher(js, topo.prefix).publish(req)
        await wait_for(lambda: completed_for(col, req.id), timeout=60, what="batch_completed")
        # what each instance handled, from its own /metrics (the last ack may follow batch_completed)
        urls = [json.loads(ready_file(s, "assembler").read_text())["metrics_url"] for s in (a, b)]
        per_instance: list[float] = []

        def all_acked() -> bool:
            per_instance[:] = [acked(url, CONTENT_GENERATED) for url in urls]
            return sum(per_instance) >= 1000

        await wait_for(all_acked, timeout=30, what="1,000 outcomes acked between the two assemblers", interval=0.1)
        # the completion was read back by the completions consumer: the record is finished

        async def finished():
            st = await read_batch_status(nc, settings, req.id)
            return st is not None and st["finished"]

        await wait_for(finished, timeout=20, what="the record marked finished")
    stored_done = await stored(js, topo, BATCH_COMPLETED)
    assert [e.id for e in stored_done] == [completed_id(req.id)]
    c = stored_done[0].data
    assert (c.total, c.successful, c.failed, c.skipped) == (1000, 998, 2, 0)
    assert sorted(i.index for i in c.items) == list(range(1000))  # every item, once
    assert len({i.request_id for i in c.items}) == 1000
    # both instances handled outcomes of this batch (each acked part of the 1,000; together all)
    print("content_generated acked per assembler instance:", per_instance)
    assert all(n > 0 for n in per_instance), per_instance


async def test_continue_on_error_false_stops_on_the_first_failure(settings, bus, nc):
    js, topo, col = bus
    req = new_event(BATCH_REQUESTED, batch(300, bad={0}, coe=False), source="test")
    async with running(("generator", settings), ("assembler", settings)):
        await Publisher(js, topo.prefix).publish(req)
        await wait_for(lambda: completed_for(col, req.id), timeout=60, what="batch_completed")
        # every generation still finishes; none of the later outcomes changes the record
        await wait_for(
            lambda: (
                len(col.of(CONTENT_GENERATED, lambda e: e.data.origin is not None and e.data.origin.id == req.id))
                >= 300
            ),
            timeout=60,
            what="all 300 outcomes",
        )
    c = completed_for(col, req.id)[0].data
    assert c.status == "error" and c.failed >= 1 and c.error.code == "BATCH_STOPPED"
    assert c.successful + c.failed + c.skipped == 300
    assert [i.status for i in c.items].count("skipped") == c.skipped
    assert c.items[0].status == "error" and c.items[0].error.code == "CONFIG_NOT_FOUND"
    assert all(i.content_config_id == "hello-world" for i in c.items if i.status == "skipped")
    assert await count_stored(js, topo, BATCH_COMPLETED) == 1

    st = await read_batch_status(nc, settings, req.id)
    assert (st["successful"], st["failed"], st["skipped"]) == (c.successful, c.failed, c.skipped)


async def test_batch_status_while_running(settings, bus, nc):
    js, topo, col = bus
    req = new_event(BATCH_REQUESTED, batch(50), source="test")
    async with running(("assembler", settings)):  # no generator yet: the batch waits
        await Publisher(js, topo.prefix).publish(req)
        await wait_for(lambda: read_batch_status(nc, settings, req.id), timeout=20, what="the batch record")
        st = await read_batch_status(nc, settings, req.id)
        assert (st["total"], st["done"], st["closed"], st["finished"]) == (50, 0, False, False)
        await wait_for(lambda: len(col.of(GENERATION_REQUESTED)) >= 50, timeout=20, what="50 requests")
        async with running(("generator", settings)):
            await wait_for(lambda: completed_for(col, req.id), timeout=60, what="batch_completed")

            async def finished():
                s = await read_batch_status(nc, settings, req.id)
                return s["finished"]

            await wait_for(finished, timeout=20, what="finished")
    st = await read_batch_status(nc, settings, req.id)
    assert (st["done"], st["successful"], st["failed"], st["closed"]) == (50, 50, 0, True)
    assert await read_batch_status(nc, settings, "no-such-batch") is None


async def test_large_batch_reports_items_by_reference(settings, bus):
    js, topo, col = bus
    req = new_event(BATCH_REQUESTED, batch(1001, config="welcome-email"), source="test")
    async with running(("generator", settings), ("assembler", settings)):
        await Publisher(js, topo.prefix).publish(req)
        await wait_for(lambda: completed_for(col, req.id), timeout=60, what="batch_completed")
    c = completed_for(col, req.id)[0].data
    assert c.status == "success" and c.items is None and c.items_ref
    from bus.content import ContentStore

    raw = await ContentStore(js, topo.content_bucket).get(c.items_ref)
    items = msgspec.json.decode(raw, type=list[BatchItemOutcome])
    assert len(items) == 1001 and all(i.status == "success" for i in items)


async def test_fan_out_of_five_thousand_items(settings, bus):
    """Only the assembler runs: a 5,000-item batch becomes 5,000 stored generation requests,
    one per item. The time it took is printed (a figure, not a pass/fail bound)."""
    js, topo, col = bus
    req = new_event(BATCH_REQUESTED, batch(5000), source="test")
    async with running(("assembler", settings)):
        t0 = time.perf_counter()
        await Publisher(js, topo.prefix).publish(req)

        async def all_stored():
            try:
                return await count_stored(js, topo, GENERATION_REQUESTED) == 5000
            except nats.errors.TimeoutError:  # a loaded server answers late: ask again, within the wait
                return False

        await wait_for(all_stored, timeout=120, what="5,000 generation requests stored", interval=0.1)
        elapsed = time.perf_counter() - t0
    print(f"fan-out of 5,000 items: {elapsed:.2f}s")
    requests = await stored(js, topo, GENERATION_REQUESTED)
    assert sorted(int(e.data.origin.key) for e in requests) == list(range(5000))
    assert {e.data.origin.id for e in requests} == {req.id}
