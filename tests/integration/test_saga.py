"""The saga against a real nats-server (docs/saga.md): cancel, deadlines and compensation,
with the assembler and the generator running in-process through run_service."""

from __future__ import annotations

import uuid

import msgspec
import pytest

from bus.cache import ResultCacheStore
from bus.content import ContentMissing, ContentStore
from bus.publisher import Publisher
from bus.state import StateStore
from bus.topology import Topology, provision
from composition.runs import MARKERS, cancelled_key, early_cancel_key
from contracts.catalogue import (
    ARTIFACT_ASSEMBLED,
    ARTIFACT_REQUESTED,
    BATCH_COMPLETED,
    BATCH_REQUESTED,
    CANCEL_REQUESTED,
    COMPENSATION_REQUESTED,
    CONTENT_GENERATED,
    CONTENT_VALIDATED,
    EFFECTS_COMPENSATED,
    GENERATION_REQUESTED,
)
from contracts.envelope import new_event
from contracts.events import ArtifactRequested, CancelRequested
from services.assembler.state import batch_item_key, batch_key, decode_batch, decode_stored
from services.assembler.status import read_batch_status
from tests.conftest import wait_for
from tests.integration.test_assembler_artifacts import ARTIFACTS, with_configs
from tests.integration.test_assembler_batches import Collector, batch, bus, completed_for, count_stored, running

__all__ = ["bus"]  # the fixture, shared

SLOW = """
id: slow
deadline_s: 1
parts:
  - {id: one, content_config_id: intro}
"""
# the required part fails after the first one is done (validated): that one's effects are undone
LATE_FAILURE = """
id: late-failure
context: {product: P, edition: e}
parts:
  - {id: intro, content_config_id: intro}
  - {id: broken, content_config_id: needs-var, depends_on: [intro]}
"""


@pytest.fixture
def settings(settings):
    """Every deterministic render cached, whatever it costs (the cache's cost policy aside): the
    saga undoes the cache entries of a stopped run."""
    return settings.model_copy(update={"cache_min_render_ms": 0})


@pytest.fixture
def asettings(settings, tmp_path):
    """The artifact tests' configs, and an artifact with a deadline in its config."""
    return with_configs(settings, tmp_path, {**ARTIFACTS, "slow.yaml": SLOW, "late-failure.yaml": LATE_FAILURE})


def cancel(batch_id: str, kind: str = "batch"):
    return new_event(CANCEL_REQUESTED, CancelRequested(kind=kind, id=batch_id, reason="test"), source="urn:test")


async def test_a_cancel_before_its_batch_request_is_honoured_once_nothing_generated(settings, bus, nc):
    js, topo, col = bus
    pub = Publisher(js, settings.prefix)
    req = new_event(BATCH_REQUESTED, batch(20), source="urn:test")
    async with running(("assembler", settings)):
        await pub.publish(cancel(req.id))
        state = StateStore(js, topo.state_bucket)
        await wait_for(lambda: state.get(early_cancel_key("batch", req.id)), 10, "the early marker of an unknown batch")
        assert await read_batch_status(nc, settings, req.id) is None  # nothing else changed
        assert await state.get(cancelled_key("batch", req.id)) is None  # nothing for the generator to follow
        await pub.publish(req)
        await wait_for(lambda: completed_for(col, req.id), 10, "batch_completed of the cancelled batch")
        await wait_for(lambda: _finished(nc, settings, req.id), 10, "the completion read back (finished)")
        ack = await pub.publish(cancel(req.id))  # a second cancel, of a closed batch: changes nothing

        async def handled() -> bool:
            info = await js.consumer_info(topo.events_stream, "assembler-cancels")
            return info.ack_floor.stream_seq >= ack.seq

        await wait_for(handled, 10, "the second cancel handled (acknowledged)")
    done = completed_for(col, req.id)
    assert len(done) == 1
    d = done[0].data
    assert (d.status, d.total, d.successful, d.failed, d.skipped) == ("cancelled", 20, 0, 0, 20)
    assert d.error.code == "RUN_CANCELLED" and d.compensated_parts == []
    assert await count_stored(js, topo, GENERATION_REQUESTED) == 0
    assert await count_stored(js, topo, BATCH_COMPLETED) == 1
    # closed by its own request before any generation: the generator never needed a marker
    assert await StateStore(js, topo.state_bucket).get(cancelled_key("batch", req.id)) is None


async def test_cancels_of_runs_never_requested_leave_nothing_for_the_generator_to_follow(settings, bus, nc):
    # Any client may publish cancels. Those of runs the assembler does not know leave only early
    # markers, which the generator's follow of the stopped runs (its memory, its read at start)
    # never sees; before, each one stayed in every generator's memory for good.
    js, topo, _ = bus
    pub = Publisher(js, settings.prefix)
    state = StateStore(js, topo.state_bucket)
    runs = [(kind, str(uuid.uuid4())) for kind in ("batch", "artifact") for _ in range(40)]
    async with running(("assembler", settings)):
        for kind, run_id in runs:
            await pub.publish(cancel(run_id, kind))
        for kind, run_id in runs:
            await wait_for(lambda k=kind, r=run_id: state.get(early_cancel_key(k, r)), 10, "an early marker")
    seen: list[str] = []
    sub = await state.follow(MARKERS, lambda key, present, seq: seen.append(key))
    try:
        await state.put(cancelled_key("batch", "sentinel"), b"m")  # written after every early marker
        await wait_for(lambda: "cancelled.batch.sentinel" in seen, 10, "the follow's reading up to the sentinel")
        assert seen == ["cancelled.batch.sentinel"]
    finally:
        await sub.unsubscribe()


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


# A render of about 10 ms (loops the sandbox allows): 500 of them take seconds, so the
# generator cannot finish the batch in the moment between "30 done" and its stop
SLOW_HELLO = (
    "id: slow-hello\ngenerator: jinja2\n"
    "template: '{% for i in range(400) %}{% for j in range(300) %}{% endfor %}{% endfor %}# Hello, {{ name }}!'\n"
)


@pytest.fixture
def slow_settings(settings, tmp_path):
    d = tmp_path / "slow-configs"
    d.mkdir()
    (d / "slow-hello.yaml").write_text(SLOW_HELLO)
    return settings.model_copy(update={"configs_dir": d})


async def test_cancel_mid_batch_skips_the_rest_and_compensates_what_ran(slow_settings, bus, nc):
    settings = slow_settings
    js, topo, col = bus
    pub = Publisher(js, settings.prefix)
    n = 500  # the completion lists them inline
    req = new_event(BATCH_REQUESTED, batch(n, config="slow-hello"), source="urn:test")
    # Three phases, so that the generator cannot have rendered every item before the cancel
    # (it runs ahead of the assembler's counting, and each render takes milliseconds): some
    # items run; then, with the generator stopped, the cancel closes the batch; then the
    # generator comes back to a stopped run.
    async with running(("assembler", settings), ("generator", settings)):
        await pub.publish(req)

        async def some_done() -> bool:
            st = await read_batch_status(nc, settings, req.id)
            return st is not None and st["done"] >= 30

        await wait_for(some_done, 30, "30 items done")
    state = StateStore(js, topo.state_bucket)
    async with running(("assembler", settings)):
        await pub.publish(cancel(req.id))

        async def closed_as_cancelled() -> bool:
            got = await state.get(batch_key(req.id))
            return got is not None and decode_batch(got[0]).outcome == "cancelled"

        await wait_for(closed_as_cancelled, 30, "the batch closed as cancelled")
    async with running(("assembler", settings), ("generator", settings)):
        await wait_for(lambda: completed_for(col, req.id), 30, "batch_completed cancelled")
        await wait_for(
            lambda: len(col.of(CONTENT_GENERATED, lambda e: e.data.origin.id == req.id)) >= n,
            60,
            "an outcome for every item",
        )
    done = completed_for(col, req.id)
    assert len(done) == 1
    d = done[0].data
    assert d.status == "cancelled" and d.successful >= 30 and d.skipped > 0
    assert d.successful + d.failed + d.skipped == n
    outcomes = col.of(CONTENT_GENERATED, lambda e: e.data.origin.id == req.id)
    assert len({e.data.origin.key for e in outcomes}) == n  # nothing lost
    skipped_by_generator = [e for e in outcomes if e.data.status == "error"]
    assert skipped_by_generator and all(e.data.error.code == "RUN_CANCELLED" for e in skipped_by_generator)
    # compensation: each counted item's cache entry, undone the last item first, and reported
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


# --------------------------------------------------------------------------- artifacts


async def test_artifacts_cancelled_timed_out_and_failed_are_compensated(nc, asettings):
    """Three artifact runs on one stack: a cancel and a config deadline while the parts wait
    (no generator yet), then a run whose required part fails after another part wrote its
    cache entry: that entry is removed and the part reported in compensated_parts."""
    js = nc.jetstream()
    topo = Topology.from_settings(asettings)
    await provision(js, topo)
    col = await Collector().start(nc, asettings.prefix)
    pub = Publisher(js, asettings.prefix)

    def assembled(run_id: str):
        return col.of(ARTIFACT_ASSEMBLED, lambda e: e.data.request_id == run_id)

    waiting = new_event(ARTIFACT_REQUESTED, ArtifactRequested(artifact_id="chain"), source="urn:test")
    timed = new_event(ARTIFACT_REQUESTED, ArtifactRequested(artifact_id="slow"), source="urn:test")
    async with running(("assembler", asettings)):
        await pub.publish(waiting)
        await pub.publish(timed)
        await wait_for(lambda: len(col.of(GENERATION_REQUESTED)) >= 2, 10, "the first part of each run requested")
        await pub.publish(cancel(waiting.id, kind="artifact"))
        await wait_for(lambda: assembled(waiting.id), 10, "artifact_assembled of the cancelled run")
        await wait_for(lambda: assembled(timed.id), 10, "artifact_assembled of the run past its config deadline")
    c, t = assembled(waiting.id)[0].data, assembled(timed.id)[0].data
    assert (c.status, c.error.code, c.parts_count, c.compensated_parts) == ("cancelled", "RUN_CANCELLED", 0, [])
    assert (t.status, t.error.code, t.compensated_parts) == ("timed_out", "DEADLINE_EXCEEDED", [])
    assert t.duration_ms >= 1000

    failing = new_event(ARTIFACT_REQUESTED, ArtifactRequested(artifact_id="late-failure"), source="urn:test")
    tiny = asettings.model_copy(update={"content_threshold_bytes": 8})  # every content by reference
    async with running(("generator", tiny), ("validator", tiny), ("assembler", tiny)):
        await pub.publish(failing)
        await wait_for(lambda: assembled(failing.id), 30, "artifact_assembled of the failed run")
        # the generator answers what the stopped runs still had waiting, unrendered
        await wait_for(
            lambda: len(col.of(CONTENT_GENERATED, lambda e: e.data.origin.id in (waiting.id, timed.id))) >= 2,
            10,
            "the outcomes of the stopped runs' waiting parts",
        )
    f = assembled(failing.id)[0].data
    assert f.status == "error" and f.failed_part == "broken" and f.compensated_parts == ["intro"]
    intro = col.of(CONTENT_GENERATED, lambda e: e.data.origin.id == failing.id and e.data.origin.key == "intro")
    assert intro and intro[0].data.cache_key
    cache = ResultCacheStore(js, topo.cache_bucket, ContentStore(js, topo.content_bucket))
    assert await cache.get(intro[0].data.cache_key) is None
    # the part's content was stored by reference (the validator's object): deleted too
    valid = col.of(CONTENT_VALIDATED, lambda e: e.data.origin.id == failing.id and e.data.origin.key == "intro")
    assert valid and valid[0].data.content_ref
    with pytest.raises(ContentMissing):
        await ContentStore(js, topo.content_bucket).get(valid[0].data.content_ref)
    fact = col.of(EFFECTS_COMPENSATED, lambda e: e.data.id == failing.id)
    assert len(fact) == 1 and fact[0].data.compensated == ["intro"]
    skipped = col.of(CONTENT_GENERATED, lambda e: e.data.origin.id in (waiting.id, timed.id))
    assert {e.data.error.code for e in skipped} == {"RUN_CANCELLED"}
