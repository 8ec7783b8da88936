"""The saga's pure folds: cancel, deadline and compensation on batch records and artifact runs."""

from __future__ import annotations

from services.assembler import artifacts as art
from services.assembler import batches as bat
from services.assembler.saga_ops import PlanOp, SagaResult, StopOp, UndoneOp, announcer, compensating, decided_at
from services.assembler.state import ArtifactRun, PartPlan, PartState

T0 = 1000.0


def record(total: int = 4, coe: bool = True):
    return bat.new_record(total, coe, T0, deadline_s=30)


def test_a_new_record_carries_its_deadline():
    assert record().deadline_at == T0 + 30 and bat.new_record(1, True, T0).deadline_at is None


def test_a_cancel_closes_an_open_batch_once_and_later_outcomes_are_not_counted():
    r = record()
    r, res = bat.fold(r, [bat.ItemOp(0, True, "o0"), StopOp("c1", "cancelled"), bat.ItemOp(1, True, "o1")], T0 + 1)
    assert res == [bat.Result.COUNTED, SagaResult.STOPPED, bat.Result.IGNORED]
    assert (r.closed, r.closed_by, r.outcome, r.closed_at, r.successful) == (True, "c1", "cancelled", T0 + 1, 1)
    again, res = bat.fold(r, [StopOp("c2", "cancelled"), StopOp("t", "timed_out")], T0 + 2)
    assert again is None and res == [SagaResult.IGNORED, SagaResult.IGNORED]  # nothing changed: no write


def test_a_cancel_after_the_last_outcome_changes_nothing():
    r, _ = bat.fold(record(1), [bat.ItemOp(0, True, "o0")], T0)
    assert r.closed and r.closed_by == "o0"
    assert bat.fold(r, [StopOp("c", "cancelled")], T0) == (None, [SagaResult.IGNORED])


def test_the_deadline_times_out_and_the_completion_says_so_with_counts_of_what_ran():
    r, _ = bat.fold(record(5), [bat.ItemOp(0, True, "a"), bat.ItemOp(3, False, "b"), StopOp("d", "timed_out")], T0 + 30)
    completed, items = bat.build_completed("b1", r, {}, None, ["0"])
    assert (completed.status, completed.successful, completed.failed, completed.skipped) == ("timed_out", 1, 1, 3)
    assert completed.error.code == "DEADLINE_EXCEEDED" and completed.compensated_parts == ["0"]
    assert completed.duration_ms == 30000.0
    assert [i.status for i in items].count("skipped") == 3


def test_which_batches_are_compensated():
    ran, _ = bat.fold(record(2), [bat.ItemOp(0, True, "a"), bat.ItemOp(1, False, "b")], T0)
    assert ran.closed and not bat.needs_compensation(ran)  # continue_on_error: each item stands alone
    stopped, _ = bat.fold(record(3, coe=False), [bat.ItemOp(0, True, "a"), bat.ItemOp(1, False, "b")], T0)
    assert stopped.stopped_by_index == 1 and bat.needs_compensation(stopped)
    cancelled, _ = bat.fold(record(), [StopOp("c", "cancelled")], T0)
    assert bat.needs_compensation(cancelled)
    assert not bat.needs_compensation(record())  # open


def test_compensation_plan_is_set_once_and_each_chunk_counts_once():
    r, _ = bat.fold(record(), [StopOp("c", "cancelled")], T0)
    assert announcer(r) == "c" and not compensating(r)
    r, res = bat.fold(r, [PlanOp(3), PlanOp(1)], T0)
    assert res == [SagaResult.PLANNED, SagaResult.IGNORED] and r.compensation == 3
    assert compensating(r) and announcer(r) == "c"  # the closing event (re)announces the requests
    r, res = bat.fold(r, [UndoneOp(2, "f2"), UndoneOp(2, "f2"), UndoneOp(7, "x"), UndoneOp(0, "f0")], T0 + 5)
    assert res == [SagaResult.UNDONE, SagaResult.IGNORED, SagaResult.IGNORED, SagaResult.UNDONE]
    assert r.compensated == [0, 2] and announcer(r) == "c"
    r, res = bat.fold(r, [UndoneOp(1, "f1")], T0 + 6)
    assert res == [SagaResult.COMPLETED] and not compensating(r)
    assert (announcer(r), r.compensated_by, decided_at(r)) == ("f1", "f1", T0 + 6)  # the last fact announces
    assert bat.fold(r, [UndoneOp(1, "f1")], T0 + 7) == (None, [SagaResult.IGNORED])  # its redelivery: no change


def test_nothing_to_undo_leaves_the_completion_to_the_closing_event():
    r, _ = bat.fold(record(), [StopOp("c", "cancelled"), PlanOp(0)], T0)
    assert (r.compensation, announcer(r), decided_at(r)) == (0, "c", T0)
    assert bat.fold(r, [UndoneOp(0, "f")], T0) == (None, [SagaResult.IGNORED])


def test_a_plan_needs_a_closed_run():
    assert bat.fold(record(), [PlanOp(2)], T0) == (None, [SagaResult.IGNORED])


def test_finish_after_a_cancel_marks_it_finished():
    r, _ = bat.fold(record(), [StopOp("c", "cancelled"), PlanOp(0)], T0)
    r, res = bat.fold(r, [bat.FINISH], T0)
    assert res == [bat.Result.FINISHED] and r.finished


# --------------------------------------------------------------------------- artifacts


def run(*parts: tuple[str, bool, list[str]]) -> ArtifactRun:
    r = ArtifactRun(
        run_id="r1",
        artifact_id="doc",
        started_at=T0,
        parts=[PartPlan(id=p, content_config_id="c", required=req, depends_on=deps) for p, req, deps in parts],
        state={p: PartState() for p, _, _ in parts},
    )
    art.advance(r, "r1", T0)
    return r


def test_a_cancel_closes_an_artifact_run_with_its_status_and_error():
    r = run(("a", True, []), ("b", True, ["a"]))
    r, res = art.fold(r, [art.PartOp("a", True, "oa"), StopOp("c", "cancelled"), art.PartOp("b", True, "ob")], T0 + 2)
    assert res == [art.Result.APPLIED, SagaResult.STOPPED, art.Result.IGNORED]
    assert (r.closed_by, r.status, r.outcome, r.error.code) == ("c", "cancelled", "cancelled", "RUN_CANCELLED")
    assert r.settled == ["a"] and art.needs_compensation(r)
    data = art.assembled_data(r, {}, ["a"])
    assert (data.status, data.parts_count, data.compensated_parts, data.content) == ("cancelled", 1, ["a"], None)


def test_an_artifact_deadline_and_a_failed_run_are_compensated_a_successful_one_is_not():
    timed, _ = art.fold(run(("a", True, [])), [StopOp("d", "timed_out")], T0)
    assert timed.status == "timed_out" and timed.error.code == "DEADLINE_EXCEEDED" and art.needs_compensation(timed)
    assert art.assembled_data(timed, {}).status == "timed_out"
    failed, _ = art.fold(run(("a", True, [])), [art.PartOp("a", False, "x")], T0)
    assert failed.status == "error" and art.needs_compensation(failed)
    ok, _ = art.fold(run(("a", True, [])), [art.PartOp("a", True, "x")], T0)
    assert ok.status == "success" and not art.needs_compensation(ok)
    assert art.fold(ok, [StopOp("c", "cancelled")], T0) == (None, [SagaResult.IGNORED])


def test_parts_are_recorded_in_the_order_they_settle():
    r = run(("a", True, []), ("b", False, []), ("c", True, ["a"]))
    r, _ = art.fold(r, [art.PartOp("b", False, "ob"), art.PartOp("a", True, "oa"), art.PartOp("c", True, "oc")], T0)
    assert r.settled == ["b", "a", "c"] and r.status == "success"
