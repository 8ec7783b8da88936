"""Batches: the pure part (record folding, requests, the completion).

The I/O around it (KV reads and writes, the Object Store) is in
:mod:`services.assembler.handlers`; the exactly-once argument is in
:mod:`services.assembler`.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from enum import Enum
from typing import Iterable, Sequence

from contracts.catalogue import GENERATION_REQUESTED
from contracts.envelope import CloudEvent, new_event
from contracts.events import BatchCompleted, BatchItemOutcome, BatchRequested, ErrorInfo, GenerationRequested, Origin
from services.assembler.saga_ops import SAGA_OPS, SagaOp, SagaResult, saga_step
from services.assembler.state import BatchRecord, bit_is_set, new_bitmap, set_bit

NAMESPACE = uuid.UUID("0d7a4c0e-3b1f-5e8a-9c2d-6a1b7f4e2c90")


def item_request_id(batch_id: str, index: int) -> str:
    """The id of item ``index``'s generation request: the same however often it is published."""
    return str(uuid.uuid5(NAMESPACE, f"batch/{batch_id}/{index}"))


def completed_id(batch_id: str) -> str:
    """The id of the batch's one ``batch_completed``."""
    return str(uuid.uuid5(NAMESPACE, f"batch/{batch_id}/completed"))


# --------------------------------------------------------------------------- folding


class Result(str, Enum):
    COUNTED = "counted"  # this op set its item's bit
    DUPLICATE = "duplicate"  # the bit was already set (a redelivery, another instance)
    IGNORED = "ignored"  # the batch was closed before this outcome (continue_on_error false)
    FINISHED = "finished"  # the finished flag was set by this op
    ALREADY = "already"  # the finished flag was already set


@dataclass(frozen=True, slots=True)
class ItemOp:
    index: int
    ok: bool
    event_id: str  # the content_generated that carries the outcome


@dataclass(frozen=True, slots=True)
class FinishOp:
    """The batch_completed is in the stream."""


FINISH = FinishOp()


def deadline_id(batch_id: str) -> str:
    """The id of the batch's one deadline timer."""
    return str(uuid.uuid5(NAMESPACE, f"batch/{batch_id}/deadline"))


def new_record(total: int, continue_on_error: bool, now: float, deadline_s: float | None = None) -> BatchRecord:
    return BatchRecord(
        total=total,
        started_at=now,
        continue_on_error=continue_on_error,
        bitmap=new_bitmap(total),
        deadline_at=None if deadline_s is None else now + deadline_s,
    )


def needs_compensation(record: BatchRecord) -> bool:
    """A batch that was cancelled, timed out or stopped on an error has its items' effects
    undone; one that ran every item (continue_on_error) keeps them, failures or not: each
    item stands on its own."""
    return record.closed and (record.outcome is not None or record.stopped_by_index is not None)


def fold(
    record: BatchRecord, ops: Sequence[ItemOp | FinishOp | SagaOp], now: float
) -> tuple[BatchRecord | None, list[Result | SagaResult]]:
    """Apply ``ops`` in order to ``record`` (which this may change).

    Setting a bit that is set is a no-op, so a redelivered outcome is counted
    once. The op whose bit completes the bitmap (or, with continue_on_error
    false, the first failed one) closes the batch and is named in
    ``closed_by``; ops after it are ignored. Returns (the record, or None when
    nothing changed; one :class:`Result` per op).
    """
    results: list[Result | SagaResult] = []
    bitmap = bytearray(record.bitmap)
    changed = False
    for op in ops:
        if isinstance(op, SAGA_OPS):
            res = saga_step(record, op, now)
            changed = changed or res is not SagaResult.IGNORED
            results.append(res)
            continue
        if isinstance(op, FinishOp):
            if record.finished:
                results.append(Result.ALREADY)
            else:
                record.finished = True
                changed = True
                results.append(Result.FINISHED)
            continue
        if record.closed or not 0 <= op.index < record.total:
            results.append(
                Result.DUPLICATE if 0 <= op.index < record.total and bit_is_set(bitmap, op.index) else Result.IGNORED
            )
            continue
        if not set_bit(bitmap, op.index):
            results.append(Result.DUPLICATE)
            continue
        changed = True
        if op.ok:
            record.successful += 1
        else:
            record.failed += 1
        results.append(Result.COUNTED)
        stop = not op.ok and not record.continue_on_error
        if stop or record.successful + record.failed == record.total:
            record.closed = True
            record.closed_at = now
            record.closed_by = op.event_id
            if stop:
                record.stopped_by_index = op.index
    if not changed:
        return None, results
    record.bitmap = bytes(bitmap)
    return record, results


# --------------------------------------------------------------------------- events


def item_requests(event: CloudEvent, data: BatchRequested, indexes: Iterable[int], source: str) -> list[CloudEvent]:
    """One generation request per item: context = shared context < item context."""
    batch_id = event.id
    shared = data.context or {}
    out = []
    for i in indexes:
        item = data.items[i]
        ctx = {**shared, **item.context} if item.context else dict(shared)
        out.append(
            new_event(
                GENERATION_REQUESTED,
                GenerationRequested(
                    content_config_id=item.content_config_id,
                    context=ctx,
                    origin=Origin(kind="batch", id=batch_id, key=str(i)),
                ),
                source=source,
                cause=event,
                event_id=item_request_id(batch_id, i),
            )
        )
    return out


def build_completed(
    batch_id: str,
    record: BatchRecord,
    outcomes: dict[int, BatchItemOutcome],
    config_ids: Sequence[str] | None = None,
    compensated: Sequence[str] = (),
) -> tuple[BatchCompleted, list[BatchItemOutcome]]:
    """The batch_completed of a closed record (without ``items``/``items_ref``) and the item list.

    The bitmap decides: an item whose bit is set has its stored outcome, any
    other one is skipped (an outcome stored after the batch stopped is not counted).
    """
    items: list[BatchItemOutcome] = []
    for i in range(record.total):
        if bit_is_set(record.bitmap, i):
            o = outcomes.get(i)
            if o is None:  # cannot happen (stored before its bit is set); say so rather than invent one
                o = BatchItemOutcome(
                    index=i,
                    content_config_id=config_ids[i] if config_ids and i < len(config_ids) else "",
                    status="error",
                    request_id=item_request_id(batch_id, i),
                    error=ErrorInfo(code="OUTCOME_MISSING", message="the item's outcome was counted but not found"),
                )
            items.append(o)
        else:
            items.append(
                BatchItemOutcome(
                    index=i,
                    content_config_id=config_ids[i] if config_ids and i < len(config_ids) else "",
                    status="skipped",
                    request_id=item_request_id(batch_id, i),
                )
            )
    skipped = record.total - (record.successful + record.failed)
    error = None
    status = "success" if record.failed == 0 else "error"
    if record.outcome is not None:
        status = record.outcome
        why = "cancelled" if record.outcome == "cancelled" else "past its deadline"
        error = ErrorInfo(
            code="RUN_CANCELLED" if record.outcome == "cancelled" else "DEADLINE_EXCEEDED",
            message=f"the batch was {why}: {record.successful + record.failed} item(s) ran, {skipped} were skipped",
        )
    elif record.stopped_by_index is not None:
        stopper = items[record.stopped_by_index]
        why = f" with {stopper.error.code}" if stopper.error else ""
        error = ErrorInfo(
            code="BATCH_STOPPED",
            message=f"item {record.stopped_by_index} ({stopper.content_config_id}) failed{why}; "
            f"continue_on_error is false, so {skipped} item(s) were skipped",
        )
    elif record.failed:
        error = ErrorInfo(code="ITEMS_FAILED", message=f"{record.failed} of {record.total} items failed")
    completed = BatchCompleted(
        batch_id=batch_id,
        status=status,  # type: ignore[arg-type]
        total=record.total,
        successful=record.successful,
        failed=record.failed,
        skipped=skipped,
        duration_ms=round(((record.closed_at or record.started_at) - record.started_at) * 1000.0, 3),
        error=error,
        compensated_parts=list(compensated),
    )
    return completed, items
