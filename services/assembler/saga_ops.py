"""The saga's record updates, shared by the batch and the artifact folds (pure).

A run's record (:class:`~composition.batch_records.BatchRecord`,
:class:`~services.assembler.state.ArtifactRun`) gets three more kinds of update,
each applied exactly once by compare-and-set like the others:

- :class:`StopOp`: a cancel request or the run's deadline closes an open run
  (``outcome`` cancelled / timed_out, ``closed_by`` = that event); a closed run
  ignores it.
- :class:`PlanOp`: the closing event of a run that ended badly, having read the
  run's registered effects, fixes how many compensation requests it sends (0:
  nothing to undo). Set once. A run that succeeded gets no plan (``None``).
- :class:`UndoneOp`: one compensation request's ``effects_compensated`` is counted;
  the one that completes the set is ``compensated_by`` and announces the completion.

Who announces what is :func:`announcer`; see docs/saga.md for the argument.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, Literal


class SagaResult(str, Enum):
    STOPPED = "stopped"  # this op closed the run
    PLANNED = "planned"
    UNDONE = "undone"  # a chunk counted, more to come
    COMPLETED = "completed"  # the last chunk counted: the compensation is complete
    IGNORED = "ignored"  # closed already / planned already / a chunk counted already or unknown


@dataclass(frozen=True, slots=True)
class StopOp:
    event_id: str  # the cancel request, or the deadline timer
    outcome: Literal["cancelled", "timed_out"]


@dataclass(frozen=True, slots=True)
class PlanOp:
    chunks: int


@dataclass(frozen=True, slots=True)
class UndoneOp:
    chunk: int
    event_id: str  # the effects_compensated


SagaOp = StopOp | PlanOp | UndoneOp
SAGA_OPS = (StopOp, PlanOp, UndoneOp)


def saga_step(record: Any, op: SagaOp, now: float) -> SagaResult:
    """Apply one saga op to ``record`` (a batch record or an artifact run), in place."""
    if isinstance(op, StopOp):
        if record.closed:
            return SagaResult.IGNORED
        record.closed = True
        record.closed_at = now
        record.closed_by = op.event_id
        record.outcome = op.outcome
        return SagaResult.STOPPED
    if isinstance(op, PlanOp):
        if not record.closed or record.compensation is not None:
            return SagaResult.IGNORED
        record.compensation = max(0, op.chunks)
        return SagaResult.PLANNED
    planned = record.compensation or 0
    if not 0 <= op.chunk < planned or op.chunk in record.compensated:
        return SagaResult.IGNORED
    record.compensated = sorted([*record.compensated, op.chunk])
    if len(record.compensated) < planned:
        return SagaResult.UNDONE
    record.compensated_at = now
    record.compensated_by = op.event_id
    return SagaResult.COMPLETED


def compensating(record: Any) -> bool:
    """Planned compensation requests still wait for their facts."""
    return bool(record.compensation) and len(record.compensated) < record.compensation


def announcer(record: Any) -> str | None:
    """The id of the one event whose handling announces what comes next for a closed run:
    the closing event until the compensation is planned and while its requests wait for
    their facts (it announces the requests), then the completion: by the closing event
    when there was nothing to undo, else by the fact that completed the compensation."""
    if not record.closed:
        return None
    if record.compensation is None or compensating(record) or record.compensation == 0:
        return record.closed_by
    return record.compensated_by


def decided_at(record: Any) -> float | None:
    """When the completion was decided (for the duplicate-window check of a re-announcement)."""
    return record.compensated_at if record.compensation else record.closed_at
