"""The assembler's handlers: plain async functions of (event, delivery, :class:`Deps`) returning events.

They read and write the KV state (compare-and-set through the group
committers) and the Object Store through ``deps``; they never publish: the
consumer loop publishes what they return, then acknowledges. Why that gives
exactly one ``batch_completed`` / ``artifact_assembled`` is explained in
:mod:`services.assembler`.

Dispatch (the ``assembler`` consumer), by :data:`EVENT_HANDLERS` and, for the
outcomes of generations, by their origin's kind (:data:`OUTCOME_HANDLERS`):

- ``artifact.requested``  check, plan, request the parts without dependencies;
- ``batch.requested``     create the batch record, request every item;
- ``content_generated``   batch origin: count the item; artifact origin: a failed part (status error);
- ``content_validated``   artifact origin: the part is done (valid) or failed (invalid);
- anything without an origin, or with one the assembler does not know: nothing.

and (the ``assembler-completions`` consumer) ``batch_completed`` /
``artifact_assembled`` with the assembler's own id: mark the record finished.
Once a run is closed, what its closing event announces (compensation requests,
then the completion) is decided in :mod:`.saga`, which also handles cancels,
deadline timers and the compensations' facts on consumers of their own.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import msgspec

from composition.artifacts import ArtifactError, ArtifactStore, check_artifact
from composition.configs import ConfigStore
from contracts.catalogue import (
    ARTIFACT_ASSEMBLED,
    ARTIFACT_REQUESTED,
    BATCH_COMPLETED,
    BATCH_REQUESTED,
    CONTENT_GENERATED,
    CONTENT_VALIDATED,
)
from contracts.envelope import CloudEvent, encode_binary, new_event
from contracts.events import (
    ArtifactAssembled,
    ArtifactRequested,
    BatchCompleted,
    BatchItemOutcome,
    BatchItems,
    BatchRequested,
    ContentGenerated,
    ContentValidated,
    ErrorInfo,
)
from contracts.handling import Delivery, EventHandlers, Handler, Reject, Retry, route
from services.assembler import artifacts as art
from services.assembler import batches as bat
from services.assembler import saga
from services.assembler.compose import ComposeError, compile_layout
from services.assembler.retention import keep_batch_results
from services.assembler.state import (
    ArtifactRun,
    BatchRecord,
    Committer,
    Committers,
    PartContent,
    State,
    StoredOutcome,
    artifact_key,
    batch_item_key,
    batch_item_prefix,
    batch_key,
    batch_spec_key,
    bit_is_set,
    decode_batch,
    decode_item,
    decode_part,
    decode_run,
    decode_spec,
    encode,
    encode_spec,
    key_id,
    part_cache_key,
    part_key,
    unset_bits,
)
from services.assembler.saga_ops import SagaResult, StopOp

log = logging.getLogger("chora.assembler")

SOURCE = "chora://assembler"
INLINE_ITEMS = 1000
COMPLETIONS_CONSUMER = "assembler-completions"


class Content(Protocol):
    """What the assembler needs of :class:`bus.content.ContentStore`."""

    async def put(self, name: str, data: bytes) -> str: ...
    async def get(self, ref: str, max_bytes: int | None = None) -> bytes: ...


@dataclass
class Deps:
    state: State
    content: Content
    configs: ConfigStore
    artifacts: ArtifactStore
    committers: Committers = None  # type: ignore[assignment]
    source: str = SOURCE
    clock: Callable[[], float] = time.time
    duplicate_window_s: float = 120.0
    ack_wait_s: float = 30.0
    inline_items: int = INLINE_ITEMS
    max_event_bytes: int = 1 << 20  # the bus refuses larger events: stay well under it
    results_ttl_s: float | None = None  # a finished batch's results TTL (retention.py); None: the bucket's max age
    state_max_age_s: float | None = None  # the state bucket's max age (the stream's), which bounds every record
    batch_deadline_s: float | None = None  # a batch request without deadline_s gets this one
    stats: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.committers is None:
            self.committers = Committers(self.state)

    def batch(self, batch_id: str) -> Committer:
        clock = self.clock
        return self.committers.get(batch_key(batch_id), decode_batch, lambda r, ops: bat.fold(r, ops, clock()))

    def run(self, run_id: str) -> Committer:
        clock = self.clock
        return self.committers.get(artifact_key(run_id), decode_run, lambda r, ops: art.fold(r, ops, clock()))

    def count(self, what: str, n: int = 1) -> None:
        self.stats[what] = self.stats.get(what, 0) + n


# --------------------------------------------------------------------------- dispatch


async def on_outcome(event: CloudEvent, delivery: Delivery, deps: Deps) -> Sequence[CloudEvent]:
    """A generation's outcome: to the workflow its origin names (nothing without one)."""
    origin = getattr(event.data, "origin", None)
    handler = OUTCOME_HANDLERS.get((event.type, origin.kind)) if origin is not None else None
    return await handler(event, delivery, deps) if handler is not None else []


async def on_part_generated(event: CloudEvent, delivery: Delivery, deps: Deps) -> list[CloudEvent]:
    data: ContentGenerated = event.data
    if data.status == "success":
        if data.cache_key and data.origin is not None:  # its effect, registered for compensation
            run = await deps.run(data.origin.id).read()
            if run is not None and not run.closed:
                await deps.state.put(part_cache_key(run.run_id, data.origin.key), data.cache_key.encode())
        return []  # done once validated
    return await on_part_outcome(event, delivery, deps, ok=False, error=data.error)


async def on_part_validated(event: CloudEvent, delivery: Delivery, deps: Deps) -> list[CloudEvent]:
    data: ContentValidated = event.data
    if data.valid:
        return await on_part_outcome(event, delivery, deps, ok=True)
    return await on_part_outcome(event, delivery, deps, ok=False, error=_validation_error(data))


async def handle(event: CloudEvent, delivery: Delivery, deps: Deps) -> Sequence[CloudEvent]:
    """Every event of both assembler consumers, through :data:`EVENT_HANDLERS`."""
    return await route(EVENT_HANDLERS, deps, "assembler")(event, delivery)


def _validation_error(data: ContentValidated) -> ErrorInfo:
    errors = [i for i in data.issues if i.severity == "error"] or data.issues
    text = "; ".join(f"{i.rule}: {i.message}" for i in errors[:5]) or "the validator found the content invalid"
    return ErrorInfo(code="VALIDATION_FAILED", message=text[:2000])


# --------------------------------------------------------------------------- announcing again


def announce_again_allowed(closed_at: float | None, what: str, delivery: Delivery, deps: Deps) -> None:
    """Before announcing a completion a second time (a redelivery of the event that
    decided it): if it was decided so long ago that JetStream's duplicate window may
    no longer catch a second copy, give the completions consumer time to mark it
    finished first (Retry), except on the last delivery, where announcing wins."""
    if closed_at is None:
        return
    age = deps.clock() - closed_at
    if age <= deps.duplicate_window_s - deps.ack_wait_s:
        return
    if not delivery.last:
        raise Retry(
            f"{what} was decided {age:.0f}s ago and is not marked finished yet; "
            "waiting for the completions consumer before announcing it again",
            delay=5.0,
        )


# --------------------------------------------------------------------------- batches


# A batch's items by reference: 100,000 items with a small context each fit well under this.
MAX_ITEMS_BYTES = 64 << 20


async def batch_items(data: BatchRequested, deps: Deps) -> BatchRequested:
    """The request with its items, read from the Object Store when it has an ``items_ref``
    (a missing object is a dead letter CONTENT_MISSING, a malformed one INVALID_DATA)."""
    if data.items_ref is None:
        return data
    raw = await deps.content.get(data.items_ref, max_bytes=MAX_ITEMS_BYTES)
    try:
        items = msgspec.json.decode(raw, type=BatchItems)
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        raise Reject("INVALID_DATA", f"the items at {data.items_ref} are not a list of batch items: {e}") from None
    if not items or (data.item_count is not None and data.item_count != len(items)):
        raise Reject(
            "INVALID_DATA", f"{data.items_ref} holds {len(items)} items, expected {data.item_count or 'at least 1'}"
        )
    return msgspec.structs.replace(data, items=items, items_ref=None, item_count=None)


async def on_batch_requested(event: CloudEvent, delivery: Delivery, deps: Deps) -> list[CloudEvent]:
    data: BatchRequested = await batch_items(event.data, deps)
    batch_id = event.id
    total = len(data.items)
    committer = deps.batch(batch_id)
    new = bat.new_record(total, data.continue_on_error, deps.clock(), data.deadline_s or deps.batch_deadline_s)
    record: BatchRecord = new
    rev = await deps.state.create(batch_key(batch_id), encode(new))
    if rev is None:  # a redelivery, or another instance got it first: resume
        found = await committer.read(fresh=True)
        if found is None:
            raise Retry("the batch record exists but cannot be read yet")
        record = found
        if record.total != total:
            log.warning(
                "batch %s: a request with this id and %d items was already handled (%d items); ignored",
                batch_id,
                total,
                record.total,
            )
            return []
        if record.closed:
            return await saga.after_batch_close(event, batch_id, record, delivery, deps, again=True)
        indexes: Any = unset_bits(record.bitmap, total)
        deps.count("batch_resumed")
    else:
        committer.prime(new, rev)
        indexes = range(total)
        deps.count("batch_started")
    if await saga.marked(
        deps, "batch", batch_id
    ):  # cancelled before we got here (checked after the create: docs/saga.md)
        committed = await committer.submit(StopOp(event.id, "cancelled"))
        again = committed.result is not SagaResult.STOPPED
        return await saga.after_batch_close(event, batch_id, committed.record, delivery, deps, again=again)
    if not data.continue_on_error:
        await deps.state.put(batch_spec_key(batch_id), encode_spec([i.content_config_id for i in data.items]))
    out = bat.item_requests(event, data, indexes, deps.source)
    if record.deadline_at is not None:
        out.append(saga.deadline_event(event, "batch", batch_id, record.deadline_at, deps.source))
    return out


def _item_index(key: str, total: int) -> int | None:
    if not key.isdigit() or len(key) > 9:
        return None
    i = int(key)
    return i if i < total else None


async def on_item_outcome(event: CloudEvent, delivery: Delivery, deps: Deps) -> list[CloudEvent]:
    data: ContentGenerated = event.data
    origin = data.origin
    if origin is None:
        return []  # routed here by its origin: never without one
    batch_id = origin.id
    committer = deps.batch(batch_id)
    record: BatchRecord | None = await committer.read()
    if record is None:
        return []  # not a batch of ours (or expired)
    index = _item_index(origin.key, record.total)
    if index is None:
        log.warning("batch %s has no item %r (outcome %s); ignored", batch_id, origin.key, event.id)
        return []
    if record.closed or bit_is_set(record.bitmap, index):
        return await _batch_again(event, batch_id, committer, delivery, deps)
    outcome = StoredOutcome(  # the outcome, and the effects it registers for compensation
        index=index,
        content_config_id=data.content_config_id,
        status=data.status,
        request_id=data.request_id,
        content_hash=data.content_hash,
        error=data.error,
        cache_key=data.cache_key,
        content_ref=data.content_ref,
    )
    await deps.state.put(batch_item_key(batch_id, index), encode(outcome))  # before the bit that counts it
    committed = await committer.submit(bat.ItemOp(index, data.status == "success", event.id))
    record = committed.record
    if committed.result is bat.Result.COUNTED:
        return await saga.after_batch_close(event, batch_id, record, delivery, deps, again=False)
    if committed.result is bat.Result.DUPLICATE:
        return await _batch_again(event, batch_id, committer, delivery, deps)
    return []  # the batch stopped before this outcome: not counted, reported as skipped


async def _batch_again(
    event: CloudEvent, batch_id: str, committer: Committer, delivery: Delivery, deps: Deps
) -> list[CloudEvent]:
    """A redelivered (or duplicate) outcome: if it is the one that closed the batch and the
    completion is not known to be in the stream, announce it (again: same id)."""
    record = await committer.read(fresh=True)
    if record is None:
        return []
    return await saga.after_batch_close(event, batch_id, record, delivery, deps, again=True)


async def batch_completed_events(
    event: CloudEvent, batch_id: str, record: BatchRecord, deps: Deps, compensated: Sequence[str] = ()
) -> list[CloudEvent]:
    raw = await deps.state.items(batch_item_prefix(batch_id))
    outcomes: dict[int, BatchItemOutcome] = {}
    for k, v in raw.items():
        try:
            outcomes[int(k.rsplit(".", 1)[1])] = decode_item(v)
        except (ValueError, msgspec.DecodeError):
            log.warning("batch %s: unreadable item record %s", batch_id, k)
    config_ids = None
    if record.total > record.successful + record.failed:
        got = await deps.state.get(batch_spec_key(batch_id))
        config_ids = decode_spec(got[0]) if got else None
    completed, items = bat.build_completed(batch_id, record, outcomes, config_ids, compensated)
    body = msgspec.json.encode(items)
    # Inline up to inline_items items, and only if they leave room in the event (long error messages).
    if len(items) <= deps.inline_items and len(body) <= deps.max_event_bytes // 2:
        completed.items = items
    else:
        completed.items_ref = await deps.content.put(f"batch-{key_id(batch_id)}-items.json", body)
    return [new_event(BATCH_COMPLETED, completed, source=deps.source, cause=event, event_id=bat.completed_id(batch_id))]


# --------------------------------------------------------------------------- artifacts


async def on_artifact_requested(event: CloudEvent, delivery: Delivery, deps: Deps) -> list[CloudEvent]:
    data: ArtifactRequested = event.data
    run_id = event.id
    key = artifact_key(run_id)
    committer = deps.run(run_id)
    existing = await committer.read(fresh=True)
    if existing is not None:
        return await _run_requested(event, existing, delivery, deps, again=True)
    now = deps.clock()
    try:
        loaded = deps.artifacts.get(data.artifact_id)
        check_artifact(loaded, deps.configs)
        if loaded.spec.compose.strategy == "layout":
            try:
                compile_layout(loaded.layout or "", loaded.layout_name)
            except ComposeError as e:
                raise ArtifactError(e.code, e.message) from None
        run = art.new_run(run_id, loaded, data.context, now)
        deadline_s = data.deadline_s or loaded.spec.deadline_s
        run.deadline_at = None if deadline_s is None else now + deadline_s
        art.advance(run, run_id, now)
    except ArtifactError as e:
        log.info("artifact request %s refused: %s", run_id, e)
        run = art.failed_run(run_id, data.artifact_id, ErrorInfo(code=e.code, message=e.message), now)
    rev = await deps.state.create(key, encode(run))
    if rev is None:  # another instance got there first
        existing = await committer.read(fresh=True)
        if existing is None:
            raise Retry("the artifact record exists but cannot be read yet")
        return await _run_requested(event, existing, delivery, deps, again=True)
    committer.prime(run, rev)
    deps.count("artifact_started")
    return await _run_requested(event, run, delivery, deps, again=False)


async def _run_requested(
    event: CloudEvent, run: ArtifactRun, delivery: Delivery, deps: Deps, *, again: bool
) -> list[CloudEvent]:
    """The first parts (requested_by = run id) and the deadline timer, or the refusal; or the
    cancel that came before the request (checked after the create: docs/saga.md)."""
    if not run.closed and await saga.marked(deps, "artifact", run.run_id):
        committed = await deps.run(run.run_id).submit(StopOp(event.id, "cancelled"))
        return await _caused_by(
            event, committed.record, delivery, deps, again=again or committed.result is not SagaResult.STOPPED
        )
    out = await _caused_by(event, run, delivery, deps, again=again)
    if run.deadline_at is not None and not run.closed:
        out.append(saga.deadline_event(event, "artifact", run.run_id, run.deadline_at, deps.source))
    return out


async def on_part_outcome(
    event: CloudEvent, delivery: Delivery, deps: Deps, *, ok: bool, error: ErrorInfo | None = None
) -> list[CloudEvent]:
    data = event.data
    run_id, part_id = data.origin.id, data.origin.key
    committer = deps.run(run_id)
    run: ArtifactRun | None = await committer.read()
    if run is None:
        return []
    st = run.state.get(part_id)
    if st is None:
        log.warning("artifact run %s has no part %r (outcome %s); ignored", run_id, part_id, event.id)
        return []
    if run.closed or st.status != "requested":  # maybe only our copy is behind: look again
        run = await committer.read(fresh=True)
        if run is None:
            return []
        if run.closed or run.state[part_id].status != "requested":
            return await _run_again(event, run, delivery, deps)
    if ok:
        if data.content_ref:  # large: it stays in the Object Store
            pc = PartContent(content_ref=data.content_ref, content_hash=data.content_hash)
        else:
            pc = PartContent(content=data.content or "", content_hash=data.content_hash)
        await deps.state.put(part_key(run_id, part_id), encode(pc))  # before the update that marks it done
    committed = await committer.submit(art.PartOp(part_id, ok, event.id, error))
    if committed.result is art.Result.APPLIED:
        return await _caused_by(event, committed.record, delivery, deps, again=False)
    if committed.result is art.Result.DUPLICATE:
        fresh = await committer.read(fresh=True)
        return await _run_again(event, fresh, delivery, deps) if fresh is not None else []
    return []


async def _run_again(event: CloudEvent, run: ArtifactRun, delivery: Delivery, deps: Deps) -> list[CloudEvent]:
    return await _caused_by(event, run, delivery, deps, again=True)


async def _caused_by(
    event: CloudEvent, run: ArtifactRun, delivery: Delivery, deps: Deps, *, again: bool
) -> list[CloudEvent]:
    """What handling ``event`` decided, as events: the parts it requested that are still
    waiting for an outcome, and the completion if it closed the run (unless finished).

    A request that would not fit in an event (its dependencies' content is too
    large) fails its part right here, as if its generation had failed, with
    CONTEXT_TOO_LARGE; a redelivery of ``event`` finds it failed already."""
    out: list[CloudEvent] = []
    while not run.closed:
        waiting = [
            p.id
            for p in run.parts
            if run.state[p.id].status == "requested" and run.state[p.id].requested_by == event.id
        ]
        out = await part_requests(event, run, waiting, deps) if waiting else []
        too_big = [(e, n) for e in out if (n := _size(e)) > deps.max_event_bytes - 4096]
        if not too_big:
            break
        for e, n in too_big:
            error = ErrorInfo(
                code="CONTEXT_TOO_LARGE",
                message=f"the generation request of part {e.data.origin.key!r} would have {n} bytes with its "
                f"dependencies' content, over the event limit of {deps.max_event_bytes}",
            )
            committed = await deps.run(run.run_id).submit(art.PartOp(e.data.origin.key, False, event.id, error))
            run = committed.record
        out = []
    if run.closed:
        out.extend(await saga.after_run_close(event, run, delivery, deps, again=again))
    return out


def _size(event: CloudEvent) -> int:
    return len(encode_binary(event)[1])


async def _part_content(run_id: str, part_id: str, deps: Deps) -> str:
    got = await deps.state.get(part_key(run_id, part_id))
    if got is None:
        raise Retry(f"content of part {part_id!r} of run {run_id} not found")
    pc = decode_part(got[0])
    if pc.content_ref and pc.content is None:
        return (await deps.content.get(pc.content_ref)).decode("utf-8")
    return pc.content or ""


async def part_requests(cause: CloudEvent, run: ArtifactRun, part_ids: list[str], deps: Deps) -> list[CloudEvent]:
    out = []
    cache: dict[str, str] = {}
    for pid in part_ids:
        plan = run.plan(pid)
        if plan is None:
            raise ValueError(f"artifact run {run.run_id} has no part {pid!r}")
        dep_contents = {}
        for d in plan.depends_on:
            if d not in cache:
                cache[d] = await _part_content(run.run_id, d, deps)
            dep_contents[d] = cache[d]
        out.append(art.part_request(cause, run, pid, dep_contents, deps.source))
    return out


async def assembled_event(
    cause: CloudEvent, run: ArtifactRun, deps: Deps, compensated: Sequence[str] = ()
) -> CloudEvent:
    contents = {}
    if run.status == "success":
        for p in run.parts:
            if run.state[p.id].status == "done":
                contents[p.id] = await _part_content(run.run_id, p.id, deps)
    data: ArtifactAssembled = art.assembled_data(run, contents, compensated)
    return new_event(ARTIFACT_ASSEMBLED, data, source=deps.source, cause=cause, event_id=art.assembled_id(run.run_id))


# --------------------------------------------------------------------------- completions seen in the stream


async def on_announced(event: CloudEvent, delivery: Delivery, deps: Deps) -> list[CloudEvent]:
    """A completion is in the stream: mark its record finished, so nobody announces it again."""
    data = event.data
    if isinstance(data, BatchCompleted):
        if event.id != bat.completed_id(data.batch_id):
            return []  # not one of ours
        committer, key = deps.batch(data.batch_id), batch_key(data.batch_id)
        finish: Any = bat.FINISH
    else:
        if event.id != art.assembled_id(data.request_id):
            return []
        committer, key = deps.run(data.request_id), artifact_key(data.request_id)
        finish = art.FINISH
    record = await committer.read()
    if record is None:
        deps.committers.forget(key)
        return []
    if not record.finished:
        try:
            await committer.submit(finish)
        except KeyError:  # expired meanwhile
            pass
    deps.committers.forget(key)
    if isinstance(data, BatchCompleted):
        await keep_batch_results(data.batch_id, deps)
    return []


OUTCOME_HANDLERS: dict[tuple[str, str], Handler[Deps]] = {
    (CONTENT_GENERATED, "batch"): on_item_outcome,
    (CONTENT_GENERATED, "artifact"): on_part_generated,
    (CONTENT_VALIDATED, "artifact"): on_part_validated,
}

EVENT_HANDLERS: EventHandlers[Deps] = {
    ARTIFACT_REQUESTED: on_artifact_requested,
    BATCH_REQUESTED: on_batch_requested,
    CONTENT_GENERATED: on_outcome,
    CONTENT_VALIDATED: on_outcome,
    BATCH_COMPLETED: on_announced,
    ARTIFACT_ASSEMBLED: on_announced,
}
