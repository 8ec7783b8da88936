"""Artifacts: the pure part (the run's plan, folding part outcomes, the events).

A run is planned once, when its ``artifact.requested`` is handled: the parts,
their contexts, the compose strategy and the layout source are frozen into
the run record, so that a redelivery, another instance or an edited config
file later can never change what the run does.

Part statuses: ``pending`` (waits for dependencies) -> ``requested`` ->
``done`` | ``failed`` (a required part: the run ends with an error naming it)
| ``omitted`` (an optional part that failed, or depends on an omitted part).
A required part depending on an omitted part fails the run.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from enum import Enum
from typing import Any, Mapping, Sequence

from composition.artifacts import LoadedArtifact
from contracts.catalogue import GENERATION_REQUESTED
from contracts.envelope import CloudEvent, new_event
from contracts.events import ArtifactAssembled, ErrorInfo, GenerationRequested, Origin
from services.assembler.compose import ComposeError, compose, merge_context
from services.assembler.saga_ops import SAGA_OPS, SagaOp, SagaResult, StopOp, saga_step
from services.assembler.state import ArtifactRun, PartPlan, PartState

NAMESPACE = uuid.UUID("5b2e8f1a-7c4d-5a3b-8e6f-1d9c0b2a4e73")
TERMINAL = frozenset({"done", "failed", "omitted"})


def part_request_id(run_id: str, part_id: str) -> str:
    return str(uuid.uuid5(NAMESPACE, f"artifact/{run_id}/{part_id}"))


def assembled_id(run_id: str) -> str:
    return str(uuid.uuid5(NAMESPACE, f"artifact/{run_id}/assembled"))


def deadline_id(run_id: str) -> str:
    """The id of the run's one deadline timer."""
    return str(uuid.uuid5(NAMESPACE, f"artifact/{run_id}/deadline"))


def needs_compensation(run: ArtifactRun) -> bool:
    """A run that did not succeed (failed, cancelled, timed out) has its parts' effects undone."""
    return run.closed and run.status != "success"


def stop_error(outcome: str) -> ErrorInfo:
    if outcome == "cancelled":
        return ErrorInfo(code="RUN_CANCELLED", message="the artifact run was cancelled")
    return ErrorInfo(code="DEADLINE_EXCEEDED", message="the artifact run was not complete by its deadline")


class Result(str, Enum):
    APPLIED = "applied"
    DUPLICATE = "duplicate"  # the part was already settled (redelivery, another instance)
    IGNORED = "ignored"  # the run was closed, or the part is unknown / not requested
    FINISHED = "finished"
    ALREADY = "already"


@dataclass(frozen=True, slots=True)
class PartOp:
    part_id: str
    ok: bool
    event_id: str
    error: ErrorInfo | None = None


@dataclass(frozen=True, slots=True)
class FinishOp:
    """The artifact_assembled is in the stream."""


FINISH = FinishOp()


# --------------------------------------------------------------------------- planning


def new_run(run_id: str, loaded: LoadedArtifact, request_context: Mapping[str, Any], now: float) -> ArtifactRun:
    spec = loaded.spec
    return ArtifactRun(
        run_id=run_id,
        artifact_id=spec.id,
        started_at=now,
        context=merge_context(spec.context, request_context),
        parts=[
            PartPlan(
                id=p.id,
                content_config_id=p.content_config_id,
                context=dict(p.context),
                required=p.required,
                depends_on=list(dict.fromkeys(p.depends_on)),
            )
            for p in spec.parts
        ],
        strategy=spec.compose.strategy,
        separator=spec.compose.separator,
        layout=loaded.layout,
        layout_name=loaded.layout_name,
        state={p.id: PartState() for p in spec.parts},
    )


def failed_run(run_id: str, artifact_id: str, error: ErrorInfo, now: float) -> ArtifactRun:
    """The record of a request refused before any work (unknown config, cycle, ...)."""
    return ArtifactRun(
        run_id=run_id,
        artifact_id=artifact_id,
        started_at=now,
        closed=True,
        closed_at=now,
        closed_by=run_id,
        status="error",
        error=error,
    )


def _close(
    run: ArtifactRun, event_id: str, now: float, *, failed_part: str | None = None, error: ErrorInfo | None = None
) -> None:
    run.closed = True
    run.closed_at = now
    run.closed_by = event_id
    run.status = "error" if error else "success"
    run.failed_part = failed_part
    run.error = error


def advance(run: ArtifactRun, event_id: str, now: float) -> list[str]:
    """Request the pending parts whose dependencies are all done, omit (or fail the run
    for) those depending on an omitted part, close the run when every part is settled.
    Returns the newly requested part ids (their ``requested_by`` is ``event_id``)."""
    if run.closed:
        return []
    requested: list[str] = []
    changed = True
    while changed:
        changed = False
        for p in run.parts:
            st = run.state[p.id]
            if st.status != "pending":
                continue
            dep_status = [run.state[d].status for d in p.depends_on]
            omitted = [d for d, s in zip(p.depends_on, dep_status) if s in ("omitted", "failed")]
            if omitted:
                err = ErrorInfo(
                    code="DEPENDENCY_OMITTED", message=f"part {p.id!r} depends on omitted part {omitted[0]!r}"
                )
                st.settled_by = event_id
                st.error = err
                if p.required:
                    st.status = "failed"
                    _close(
                        run,
                        event_id,
                        now,
                        failed_part=p.id,
                        error=ErrorInfo(
                            code="PART_FAILED", message=f"required part {p.id!r} depends on omitted part {omitted[0]!r}"
                        ),
                    )
                    return requested
                st.status = "omitted"
                changed = True
            elif all(s == "done" for s in dep_status):
                st.status = "requested"
                st.requested_by = event_id
                requested.append(p.id)
                changed = True
    if all(run.state[p.id].status in TERMINAL for p in run.parts):
        _close(run, event_id, now)
    return requested


def fold(
    run: ArtifactRun, ops: Sequence[PartOp | FinishOp | SagaOp], now: float
) -> tuple[ArtifactRun | None, list[Result | SagaResult]]:
    """Apply part outcomes in order (see :func:`services.assembler.batches.fold` for the contract)."""
    results: list[Result | SagaResult] = []
    changed = False
    for op in ops:
        if isinstance(op, SAGA_OPS):
            res = saga_step(run, op, now)
            if res is SagaResult.STOPPED and isinstance(op, StopOp):
                run.status, run.error = op.outcome, stop_error(op.outcome)
            changed = changed or res is not SagaResult.IGNORED
            results.append(res)
            continue
        if isinstance(op, FinishOp):
            if run.finished:
                results.append(Result.ALREADY)
            else:
                run.finished = True
                changed = True
                results.append(Result.FINISHED)
            continue
        st = run.state.get(op.part_id)
        if st is None:
            results.append(Result.IGNORED)
            continue
        if st.status in TERMINAL:
            results.append(Result.DUPLICATE)
            continue
        if run.closed or st.status != "requested":
            results.append(Result.IGNORED)
            continue
        changed = True
        results.append(Result.APPLIED)
        st.settled_by = op.event_id
        run.settled.append(op.part_id)
        if op.ok:
            st.status = "done"
        else:
            st.error = op.error or ErrorInfo(code="PART_FAILED", message="the part failed")
            plan = run.plan(op.part_id)
            if plan is not None and plan.required:
                st.status = "failed"
                _close(
                    run,
                    op.event_id,
                    now,
                    failed_part=op.part_id,
                    error=ErrorInfo(
                        code="PART_FAILED",
                        message=f"required part {op.part_id!r} failed: {st.error.code}: {st.error.message}",
                    ),
                )
                continue
            st.status = "omitted"
        advance(run, op.event_id, now)
    return (run if changed else None), results


# --------------------------------------------------------------------------- events


def part_request(cause: CloudEvent, run: ArtifactRun, part_id: str, deps: Mapping[str, str], source: str) -> CloudEvent:
    """The generation request of one part: artifact defaults < request context < part context, plus ``deps``."""
    plan = run.plan(part_id)
    assert plan is not None
    return new_event(
        GENERATION_REQUESTED,
        GenerationRequested(
            content_config_id=plan.content_config_id,
            context=merge_context(run.context, plan.context, deps=deps),
            origin=Origin(kind="artifact", id=run.run_id, key=part_id),
        ),
        source=source,
        cause=cause,
        event_id=part_request_id(run.run_id, part_id),
    )


def assembled_data(run: ArtifactRun, contents: Mapping[str, str], compensated: Sequence[str] = ()) -> ArtifactAssembled:
    """The outcome of a closed run; ``contents`` holds the done parts' contents (success only),
    ``compensated`` the parts whose effects were undone (a run that did not succeed)."""
    omitted = run.omitted()
    duration = round(((run.closed_at or run.started_at) - run.started_at) * 1000.0, 3)

    def failed(error: ErrorInfo | None, failed_part: str | None = None) -> ArtifactAssembled:
        return ArtifactAssembled(
            request_id=run.run_id,
            artifact_id=run.artifact_id,
            status=run.status if run.status in ("cancelled", "timed_out") else "error",  # type: ignore[arg-type]
            parts_count=sum(1 for p in run.parts if run.state[p.id].status == "done"),
            duration_ms=duration,
            omitted_parts=omitted,
            failed_part=failed_part,
            error=error,
            compensated_parts=list(compensated),
        )

    if run.status != "success":
        return failed(run.error, run.failed_part)
    order = [p.id for p in run.parts]
    try:
        content = compose(
            run.strategy,
            order=order,
            parts={p: contents[p] for p in order if p in contents},
            omitted=omitted,
            separator=run.separator,
            layout=run.layout,
            layout_name=run.layout_name,
            context=run.context,
            artifact_id=run.artifact_id,
        )
    except ComposeError as e:
        return failed(ErrorInfo(code=e.code, message=e.message))
    raw = content.encode("utf-8", "surrogatepass")
    return ArtifactAssembled(
        request_id=run.run_id,
        artifact_id=run.artifact_id,
        status="success",
        parts_count=len(contents),
        duration_ms=duration,
        content=content,
        content_hash="sha256:" + hashlib.sha256(raw).hexdigest(),
        content_length=len(content),
        omitted_parts=omitted,
    )
