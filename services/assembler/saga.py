"""The saga's handlers: cancel, deadline, compensation (docs/saga.md has the whole story).

Consumers of the assembler (see :mod:`services.assembler.service`):

- ``assembler-cancels``: ``cancel.requested`` (close the run as cancelled) and
  ``effects_compensated`` (count one compensation request as done);
- ``assembler-deadlines``: ``deadline.requested``, the assembler's own timer, held
  (Retry with the remaining delay: a nak) until it is due, then the run is closed as
  timed_out if it is still open.

After a run is closed (by its last outcome, a failure, a cancel or its deadline),
:func:`after_batch_close` / :func:`after_run_close` decide what the event that
closed it announces: first the compensation requests of the effects the run
registered (none for a run that succeeded), and once each request's
``effects_compensated`` is counted, the completion. Who may announce is fixed by
the record (:func:`services.assembler.saga_ops.announcer`): one event at a time,
the same one on every redelivery; see :mod:`services.assembler`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from typing import TYPE_CHECKING, Any, Sequence

import msgspec

from composition.runs import RunMarker, cancelled_key, early_cancel_key, encode_marker, undone_id
from contracts.catalogue import (
    CANCEL_REQUESTED,
    COMPENSATION_REQUESTED,
    DEADLINE_REQUESTED,
    EFFECTS_COMPENSATED,
)
from contracts.envelope import CloudEvent, new_event
from contracts.events import CancelRequested, CompensationRequested, DeadlineRequested, Effect, EffectsCompensated
from contracts.handling import Delivery, EventHandlers, Retry
from services.assembler import artifacts as art
from services.assembler import batches as bat
from services.assembler import handlers as h
from services.assembler.saga_ops import PlanOp, SagaResult, StopOp, UndoneOp, announcer, compensating, decided_at
from services.assembler.state import (
    ArtifactRun,
    BatchRecord,
    artifact_key,
    batch_item_prefix,
    batch_key,
    bit_is_set,
    comp_key,
    decode_part,
    decode_stored,
)

if TYPE_CHECKING:
    from services.assembler.handlers import Deps

log = logging.getLogger("chora.assembler")

NAMESPACE = uuid.UUID("9c51e0d2-4a7b-5f3e-8d16-2b7a0c9e4f58")
CHUNK = 1000  # effects per compensation request (each well under the event size limit)


def compensation_id(kind: str, run_id: str, chunk: int) -> str:
    return str(uuid.uuid5(NAMESPACE, f"{kind}/{run_id}/compensate/{chunk}"))


def chunks_of(effects: Sequence[Effect]) -> list[list[Effect]]:
    return [list(effects[i : i + CHUNK]) for i in range(0, len(effects), CHUNK)]


# --------------------------------------------------------------------------- markers


async def put_marker(
    deps: Deps, kind: str, run_id: str, outcome: str, by: str, reason: str | None = None, *, early: bool = False
) -> None:
    """The stopped-run marker the generator follows, put before the run's record is closed; or,
    ``early``, the marker of a cancel of a run not known yet, which only the run's request
    handler reads (composition/runs.py): a flood of cancels for runs that never come then
    grows nothing in the generator (its memory, its follow's reading at start)."""
    marker = RunMarker(kind=kind, outcome=outcome, by=by, at=deps.clock(), reason=reason)  # type: ignore[arg-type]
    key = early_cancel_key(kind, run_id) if early else cancelled_key(kind, run_id)
    await deps.state.put(key, encode_marker(marker))


async def marked(deps: Deps, kind: str, run_id: str) -> bool:
    """Whether a cancel or a timeout marked the run, early or not."""
    got = await asyncio.gather(
        deps.state.get(early_cancel_key(kind, run_id)), deps.state.get(cancelled_key(kind, run_id))
    )
    return any(g is not None for g in got)


# --------------------------------------------------------------------------- cancel and deadline


async def on_cancel_requested(event: CloudEvent, delivery: Delivery, deps: Deps) -> list[CloudEvent]:
    """Close the run as cancelled (nothing changes for a closed one). A run not known yet
    gets the marker anyway: its request's handler honours it (docs/saga.md)."""
    data: CancelRequested = event.data
    return await _stop(event, data.kind, data.id, "cancelled", delivery, deps, reason=data.reason)


async def on_deadline(event: CloudEvent, delivery: Delivery, deps: Deps) -> list[CloudEvent]:
    """The run's deadline timer: held until due, then the run, if still open, times out."""
    data: DeadlineRequested = event.data
    left = data.at - deps.clock()
    if left > 0 and not delivery.last:
        raise Retry(f"{data.kind} {data.id}: deadline in {left:.1f}s", delay=left)
    return await _stop(event, data.kind, data.id, "timed_out", delivery, deps, known_only=True)


async def _stop(
    event: CloudEvent,
    kind: str,
    run_id: str,
    outcome: str,
    delivery: Delivery,
    deps: Deps,
    *,
    reason: str | None = None,
    known_only: bool = False,
) -> list[CloudEvent]:
    committer: Any = deps.batch(run_id) if kind == "batch" else deps.run(run_id)
    record = await committer.read(fresh=True)
    if record is not None and record.closed:
        return await _after_close(event, kind, run_id, record, delivery, deps, again=True)
    if record is None and known_only:
        return []  # a timer of a run that is gone (expired): nothing to time out
    if record is None:
        # Not known yet: the early marker, which the run's request handler reads after creating
        # its record; then read again: the request may have been handled since (docs/saga.md).
        await put_marker(deps, kind, run_id, outcome, event.id, reason, early=True)
        record = await committer.read(fresh=True)
        if record is None:
            deps.count("cancel_before_request")
            return []
    # A run with a record may have generations asked for: the marker the generator follows.
    await put_marker(deps, kind, run_id, outcome, event.id, reason)
    try:
        committed = await committer.submit(StopOp(event.id, outcome))  # type: ignore[arg-type]
    except KeyError:
        return []  # expired meanwhile
    deps.count(f"run_{outcome}" if committed.result is SagaResult.STOPPED else "stop_ignored")
    again = committed.result is not SagaResult.STOPPED
    return await _after_close(event, kind, run_id, committed.record, delivery, deps, again=again)


async def _after_close(
    event: CloudEvent, kind: str, run_id: str, record: Any, delivery: Delivery, deps: Deps, *, again: bool
) -> list[CloudEvent]:
    if kind == "batch":
        return await after_batch_close(event, run_id, record, delivery, deps, again=again)
    return await after_run_close(event, record, delivery, deps, again=again)


def deadline_event(cause: CloudEvent, kind: str, run_id: str, at: float, source: str) -> CloudEvent:
    event_id = bat.deadline_id(run_id) if kind == "batch" else art.deadline_id(run_id)
    data = DeadlineRequested(kind=kind, id=run_id, at=at)  # type: ignore[arg-type]
    return new_event(DEADLINE_REQUESTED, data, source=source, cause=cause, event_id=event_id)


# --------------------------------------------------------------------------- after a run is closed


async def after_batch_close(
    event: CloudEvent, batch_id: str, record: BatchRecord, delivery: Delivery, deps: Deps, *, again: bool
) -> list[CloudEvent]:
    """What ``event`` announces for the closed batch: nothing, unless it is the record's announcer."""
    if not record.closed or record.finished or announcer(record) != event.id:
        return []
    committer = deps.batch(batch_id)
    if record.compensation is None and bat.needs_compensation(record):  # (else: nothing to undo, no plan)
        effects = await batch_effects(batch_id, record, deps)
        record = (await committer.submit(PlanOp(len(chunks_of(effects))))).record
        if compensating(record):
            return _requests(event, "batch", batch_id, record, effects, deps)
    elif compensating(record):
        return _requests(event, "batch", batch_id, record, await batch_effects(batch_id, record, deps), deps)
    if announcer(record) != event.id:
        return []
    if again:
        h.announce_again_allowed(decided_at(record), f"batch {batch_id}", delivery, deps)
        deps.count("batch_announced_again")
    compensated = await compensated_keys(batch_key(batch_id), deps) if record.compensation else []
    return await h.batch_completed_events(event, batch_id, record, deps, compensated)


async def after_run_close(
    event: CloudEvent, run: ArtifactRun, delivery: Delivery, deps: Deps, *, again: bool
) -> list[CloudEvent]:
    """The same for an artifact run."""
    if not run.closed or run.finished or announcer(run) != event.id:
        return []
    committer = deps.run(run.run_id)
    if run.compensation is None and art.needs_compensation(run):
        effects = await run_effects(run, deps)
        run = (await committer.submit(PlanOp(len(chunks_of(effects))))).record
        if compensating(run):
            return _requests(event, "artifact", run.run_id, run, effects, deps)
    elif compensating(run):
        return _requests(event, "artifact", run.run_id, run, await run_effects(run, deps), deps)
    if announcer(run) != event.id:
        return []
    if again:
        h.announce_again_allowed(decided_at(run), f"artifact run {run.run_id}", delivery, deps)
        deps.count("artifact_announced_again")
    compensated = await compensated_keys(artifact_key(run.run_id), deps) if run.compensation else []
    return [await h.assembled_event(event, run, deps, compensated)]


def _requests(
    event: CloudEvent, kind: str, run_id: str, record: Any, effects: Sequence[Effect], deps: Deps
) -> list[CloudEvent]:
    """The compensation requests still waiting for their fact (same ids on every redelivery)."""
    chunks = chunks_of(effects)
    out = []
    for i, chunk in enumerate(chunks):
        if i in record.compensated:
            continue
        data = CompensationRequested(kind=kind, id=run_id, chunk=i, chunks=len(chunks), effects=chunk)  # type: ignore[arg-type]
        out.append(
            new_event(
                COMPENSATION_REQUESTED,
                data,
                source=deps.source,
                cause=event,
                event_id=compensation_id(kind, run_id, i),
            )
        )
    deps.count("compensation_requested", len(out))
    return out


async def batch_effects(batch_id: str, record: BatchRecord, deps: Deps) -> list[Effect]:
    """The effects the counted items registered (their stored outcomes), the last item first."""
    raw = await deps.state.items(batch_item_prefix(batch_id))
    effects: dict[int, Effect] = {}
    for k, v in raw.items():
        try:
            i, stored = int(k.rsplit(".", 1)[1]), decode_stored(v)
        except (ValueError, msgspec.DecodeError):
            continue
        if 0 <= i < record.total and bit_is_set(record.bitmap, i) and (stored.cache_key or stored.content_ref):
            effects[i] = Effect(key=str(i), cache_key=stored.cache_key, content_ref=stored.content_ref)
    return [effects[i] for i in sorted(effects, reverse=True)]


async def run_effects(run: ArtifactRun, deps: Deps) -> list[Effect]:
    """The effects the run's parts registered (cache entries, stored content), in the reverse
    of the order the parts were settled (parts still in flight first)."""
    raw = await deps.state.items(artifact_key(run.run_id))
    cache: dict[str, str] = {}
    refs: dict[str, str] = {}
    prefix = artifact_key(run.run_id) + "."
    for k, v in raw.items():
        what, _, part = k.removeprefix(prefix).partition(".")
        if what == "cache":
            cache[part] = v.decode()
        elif what == "part":
            try:
                ref = decode_part(v).content_ref
            except msgspec.DecodeError:
                continue
            if ref:
                refs[part] = ref
    in_flight = [p.id for p in run.parts if p.id not in run.settled]
    order = [*reversed(in_flight), *reversed(run.settled)]
    return [Effect(key=p, cache_key=cache.get(p), content_ref=refs.get(p)) for p in order if p in cache or p in refs]


async def compensated_keys(record_key: str, deps: Deps) -> list[str]:
    """What the compensation requests undid, request by request (each in the order undone)."""
    raw = await deps.state.items(f"{record_key}.comp")
    out: list[str] = []
    for k in sorted(raw, key=lambda k: int(k.rsplit(".", 1)[1]) if k.rsplit(".", 1)[1].isdigit() else -1):
        try:
            out.extend(str(x) for x in json.loads(raw[k]))
        except ValueError:
            log.warning("unreadable compensation record %s", k)
    return out


# --------------------------------------------------------------------------- compensation facts


async def on_effects_compensated(event: CloudEvent, delivery: Delivery, deps: Deps) -> list[CloudEvent]:
    """One compensation request done: record what it undid, count it; the fact that completes
    the compensation announces the completion (and again on its redeliveries)."""
    data: EffectsCompensated = event.data
    if event.id != undone_id(compensation_id(data.kind, data.id, data.chunk)):
        return []  # not the answer to one of our requests
    committer: Any = deps.batch(data.id) if data.kind == "batch" else deps.run(data.id)
    record_key = batch_key(data.id) if data.kind == "batch" else artifact_key(data.id)
    record = await committer.read(fresh=True)
    if record is None:
        return []
    if data.chunk not in record.compensated:
        await deps.state.put(comp_key(record_key, data.chunk), json.dumps(data.compensated).encode())
        try:
            record = (await committer.submit(UndoneOp(data.chunk, event.id))).record
        except KeyError:
            return []
        again = False
    else:
        again = True
    return await _after_close(event, data.kind, data.id, record, delivery, deps, again=again)


SAGA_HANDLERS: EventHandlers[Deps] = {
    CANCEL_REQUESTED: on_cancel_requested,
    EFFECTS_COMPENSATED: on_effects_compensated,
    DEADLINE_REQUESTED: on_deadline,
}
