"""The saga against a real nats-server (docs/saga.md): cancel, deadlines and compensation,
with the assembler and the generator running in-process through run_service."""

from __future__ import annotations

import msgspec

from bus.cache import ResultCacheStore
from bus.content import ContentStore
from bus.publisher import Publisher
from bus.state import StateStore
from composition.runs import cancelled_key
from contracts.catalogue import (
    BATCH_COMPLETED,
    BATCH_REQUESTED,
    CANCEL_REQUESTED,
    COMPENSATION_REQUESTED,
    CONTENT_GENERATED,
    EFFECTS_COMPENSATED,
    GENERATION_REQUESTED,
)
from contracts.envelope import new_event
from contracts.events import CancelRequested
from services.assembler.state import batch_item_key, decode_stored
from services.assembler.status import read_batch_status
from tests.conftest import wait_for
from tests.integration.test_assembler_batches import batch, bus, completed_for, count_stored, running

__all__ = ["bus"]  # the fixture, shared


def cancel(batch_id: str, kind: str = "batch"):
    return new_event(CANCEL_REQUESTED, CancelRequested(kind=kind, id=batch_id, reason="test"), source="urn:test")


async def test_a_cancel_before_its_batch_request_is_honoured_once_nothing_generated(settings, bus, nc):
    js, topo, col = bus
    pub = Publisher(js, settings.prefix)
    req = new_event(BATCH_REQUESTED, batch(20), source="urn:test")
    async with running(("assembler", settings)):
        await pub.publish(cancel(req.id))
        state = StateStore(js, topo.state_bucket)
        await wait_for(lambda: state.get(cancelled_key(req.id)), 10, "the cancelled-run marker of an unknown batch")
        assert await read_batch_status(nc, settings, req.id) is None  # nothing else changed
        await pub.publish(req)
        await wait_for(lambda: completed_for(col, req.id), 10, "batch_completed of the cancelled batch")
        await pub.publish(cancel(req.id))  # a second cancel of a closed batch: changes nothing
        await wait_for(lambda: read_batch_status(nc, settings, req.id), 10, "the batch record")
        await wait_for(lambda: _finished(nc, settings, req.id), 10, "the completion read back (finished)")
    done = completed_for(col, req.id)
    assert len(done) == 1
    d = done[0].data
    assert (d.status, d.total, d.successful, d.failed, d.skipped) == ("cancelled", 20, 0, 0, 20)
    assert d.error.code == "RUN_CANCELLED" and d.compensated_parts == []
    assert await count_stored(js, topo, GENERATION_REQUESTED) == 0
    assert await count_stored(js, topo, BATCH_COMPLETED) == 1


async def _finished(nc, settings, batch_id: str) -> bool:
    st = await read_batch_status(nc, settings, batch_id)
    return st is not None and st["finished"]


async def test_a_deadline_fires_once_after_an_assembler_restart(settings, bus, nc):
    js, topo, col = bus
    pub = Publisher(js, settings.prefix)
    data = msgspec.structs.replace(batch(30), deadline_s=1.5)
    req = new_event(BATCH_REQUESTED, data, source="urn:test")
    async with running(("assembler", settings)):  # no generator: the items wait
        await pub.publish(req)
        await wait_for(lambda: read_batch_status(nc, settings, req.id), 10, "the batch record")
    assert completed_for(col, req.id) == []  # stopped before its deadline
    async with running(("assembler", settings)):  # a new process: the timer is in the stream
        await wait_for(lambda: completed_for(col, req.id), 20, "batch_completed timed_out")
        await wait_for(lambda: _finished(nc, settings, req.id), 10, "the completion read back (finished)")
    done = completed_for(col, req.id)
    assert len(done) == 1
    d = done[0].data
    assert (d.status, d.successful, d.failed, d.skipped) == ("timed_out", 0, 0, 30)
    assert d.error.code == "DEADLINE_EXCEEDED"
    assert d.duration_ms >= 1500
    st = await read_batch_status(nc, settings, req.id)
    assert st["outcome"] == "timed_out"


async def test_cancel_mid_batch_skips_the_rest_and_compensates_what_ran(settings, bus, nc):
    js, topo, col = bus
    pub = Publisher(js, settings.prefix)
    n = 1000  # the completion lists them inline
    req = new_event(BATCH_REQUESTED, batch(n), source="urn:test")
    async with running(("assembler", settings), ("generator", settings)):
        await pub.publish(req)

        async def some_done() -> bool:
            st = await read_batch_status(nc, settings, req.id)
            return st is not None and st["done"] >= 50

        await wait_for(some_done, 30, "50 items done")
        await pub.publish(cancel(req.id))
        await wait_for(lambda: completed_for(col, req.id), 30, "batch_completed cancelled")
        await wait_for(
            lambda: len(col.of(CONTENT_GENERATED, lambda e: e.data.origin.id == req.id)) >= n,
            60,
            "an outcome for every item",
        )
    done = completed_for(col, req.id)
    assert len(done) == 1
    d = done[0].data
    assert d.status == "cancelled" and d.successful >= 50 and d.skipped > 0
    assert d.successful + d.failed + d.skipped == n
    outcomes = col.of(CONTENT_GENERATED, lambda e: e.data.origin.id == req.id)
    assert len({e.data.origin.key for e in outcomes}) == n  # nothing lost
    skipped_by_generator = [e for e in outcomes if e.data.status == "error"]
    assert skipped_by_generator and all(e.data.error.code == "RUN_CANCELLED" for e in skipped_by_generator)
    # compensation: each counted item's cache entry, undone the last item first, and reported
    state = StateStore(js, topo.state_bucket)
    counted = [i for i in range(n) if (await state.get(batch_item_key(req.id, i))) is not None]
    registered = {}
    for i in counted:
        stored = decode_stored((await state.get(batch_item_key(req.id, i)))[0])
        if stored.status == "success" and stored.cache_key:
            registered[str(i)] = stored.cache_key
    assert len(registered) >= d.successful  # every counted success wrote its entry (a cold cache)
    requests = col.of(COMPENSATION_REQUESTED, lambda e: e.data.id == req.id)
    facts = col.of(EFFECTS_COMPENSATED, lambda e: e.data.id == req.id)
    assert requests and len(facts) == len({e.id for e in facts}) == requests[0].data.chunks
    assert set(d.compensated_parts) == {k for k in registered if int(k) in _counted_bits(d)}
    assert [int(k) for k in d.compensated_parts] == sorted((int(k) for k in d.compensated_parts), reverse=True)
    cache = ResultCacheStore(js, topo.cache_bucket, ContentStore(js, topo.content_bucket))
    for k in d.compensated_parts:
        assert await cache.get(registered[k]) is None, f"item {k}'s cache entry is still there"


def _counted_bits(d) -> set[int]:
    return {o.index for o in d.items if o.status != "skipped"}
