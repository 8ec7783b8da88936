"""The generator's part in the saga: skipping the requests of stopped runs, undoing effects."""

from __future__ import annotations

import pytest

from composition.configs import ConfigStore
from composition.runs import run_of, undone_id
from contracts.catalogue import COMPENSATION_REQUESTED, EFFECTS_COMPENSATED, GENERATION_REQUESTED
from contracts.envelope import new_event
from contracts.events import CompensationRequested, Effect, GenerationRequested, Origin
from contracts.handling import Delivery, Retry
from services.generator.compensation import StoppedRuns, on_compensation_requested
from services.generator.generators import GeneratorRegistry
from services.generator.handlers import Deps, on_generation_requested
from tests.conftest import wait_for, write


@pytest.fixture
def deps(tmp_path) -> Deps:
    write(tmp_path / "greet.json", {"id": "greet", "generator": "template_fill", "template": "Hi {{ name }}"})
    return Deps(ConfigStore(tmp_path), GeneratorRegistry())


def request(run_id: str | None) -> object:
    origin = Origin(kind="batch", id=run_id, key="3") if run_id else None
    data = GenerationRequested(content_config_id="greet", context={"name": "x"}, origin=origin)
    return new_event(GENERATION_REQUESTED, data, source="urn:test")


async def test_requests_of_stopped_runs_get_run_cancelled_others_render(deps):
    deps.cancelled.add(run_of("batch", "run-1"))
    deps.cancelled.add(run_of("artifact", "run-2"))  # another kind: not this batch
    (skipped,) = await on_generation_requested(request("run-1"), Delivery.first(), deps)
    assert skipped.data.status == "error" and skipped.data.error.code == "RUN_CANCELLED"
    assert skipped.data.origin.id == "run-1" and skipped.data.content is None
    (other,) = await on_generation_requested(request("run-2"), Delivery.first(), deps)
    (plain,) = await on_generation_requested(request(None), Delivery.first(), deps)
    assert other.data.content == plain.data.content == "Hi x"
    assert other.data.cache_key is None  # no result cache here: no effect to register


class Undo:
    def __init__(self, fail: set[str] = frozenset()):
        self.calls: list[tuple[str, str]] = []
        self.fail = fail

    async def remove_cache_entry(self, key: str) -> None:
        if key in self.fail:
            raise OSError("store down")
        self.calls.append(("cache", key))

    async def remove_content(self, ref: str) -> None:
        self.calls.append(("content", ref))


def compensation(*effects: Effect):
    data = CompensationRequested(kind="batch", id="b1", chunk=1, chunks=2, effects=list(effects))
    return new_event(COMPENSATION_REQUESTED, data, source="urn:test")


async def test_effects_are_undone_in_the_given_order_and_the_fact_has_a_fixed_id(deps):
    deps.undo = Undo()
    req = compensation(
        Effect(key="9", cache_key="c9", content_ref="obj://b/9"), Effect(key="4", cache_key="c4"), Effect(key="1")
    )
    (fact,) = await on_compensation_requested(req, Delivery.first(), deps)
    assert fact.type == EFFECTS_COMPENSATED and fact.id == undone_id(req.id)
    assert (fact.data.id, fact.data.chunk, fact.data.chunks) == ("b1", 1, 2)
    assert fact.data.compensated == ["9", "4", "1"] and fact.data.failed == []
    assert deps.undo.calls == [("cache", "c9"), ("content", "obj://b/9"), ("cache", "c4")]
    (again,) = await on_compensation_requested(req, Delivery.first(), deps)  # a redelivery: the same fact
    assert again.id == fact.id and again.data == fact.data


async def test_a_failing_undo_is_retried_and_reported_on_the_last_delivery(deps):
    deps.undo = Undo(fail={"c4"})
    req = compensation(Effect(key="9", cache_key="c9"), Effect(key="4", cache_key="c4"))
    with pytest.raises(Retry):
        await on_compensation_requested(req, Delivery.first(max_attempts=3), deps)
    last = Delivery(attempt=3, max_attempts=3, consumer="generator-compensations", stream_seq=1)
    (fact,) = await on_compensation_requested(req, last, deps)
    assert fact.data.compensated == ["9"] and fact.data.failed == ["4"]


class FollowableState:
    """A state store that calls back the markers it was given, as a follow does."""

    def __init__(self, keys: list[str]):
        self.keys = keys
        self.follows = 0
        self.afters: list[int] = []  # the after_seq of each follow

    async def follow(self, pattern, on_change, after_seq=0):
        self.follows += 1
        self.afters.append(after_seq)
        for seq, k in enumerate(self.keys, start=1):  # the key's stream sequence: its place here
            if seq > after_seq:
                on_change(k, True, seq)

        class Sub:
            async def unsubscribe(self):
                pass

        return Sub()


async def test_stopped_runs_are_collected_from_the_markers():
    runs: set[str] = set()
    stopped = StoppedRuns(runs)
    state = FollowableState(
        [
            "cancelled.batch.r1",
            "cancelled.artifact.h01",
            "batch.b1",
            "cancelled.r2",
            "cancelled.x.r3",
            "cancelled.early.batch.r4",
        ]
    )
    stopped.start(state)
    try:
        await wait_for(lambda: runs, 5, "the markers followed")
        assert runs == {"batch.r1", "artifact.h01"}
    finally:
        await stopped.close()


async def test_the_follow_is_made_again_from_the_last_sequence_it_saw():
    runs: set[str] = set()
    stopped = StoppedRuns(runs)
    stopped.REFRESH_S = 0.01  # refresh at once (the period, not a synchronisation)
    state = FollowableState(["cancelled.batch.r1", "batch.b1", "cancelled.artifact.h02"])
    stopped.start(state)
    try:
        await wait_for(lambda: state.follows >= 2, 5, "the follow made again")
        state.keys.append("cancelled.batch.r4")  # written after the first follow
        await wait_for(lambda: "batch.r4" in runs, 5, "the marker written since, read by a refresh")
        assert state.afters[:2] == [0, 3]  # all markers first, then only what came after sequence 3
        assert stopped.seen_seq == 4
        assert runs == {"batch.r1", "artifact.h02", "batch.r4"}
    finally:
        await stopped.close()
