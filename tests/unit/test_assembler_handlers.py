"""The assembler's handlers without a server: KV in memory, crashes simulated by
exceptions and redeliveries by calling a handler again with the same event."""

from __future__ import annotations

import asyncio
import json

import msgspec
import pytest

from contracts.handling import Delivery, Reject, Retry
from composition.artifacts import ArtifactStore
from composition.configs import ConfigStore
from contracts.catalogue import (
    ARTIFACT_ASSEMBLED,
    ARTIFACT_REQUESTED,
    BATCH_COMPLETED,
    BATCH_REQUESTED,
    CANCEL_REQUESTED,
    CONTENT_GENERATED,
    CONTENT_VALIDATED,
    GENERATION_REQUESTED,
    NOTIFICATION_FAILED,
)
from contracts.envelope import CloudEvent, new_event
from contracts.events import (
    ArtifactRequested,
    BatchItem,
    BatchItemOutcome,
    BatchRequested,
    CancelRequested,
    ContentGenerated,
    ContentValidated,
    ErrorInfo,
    NotificationFailed,
    Origin,
    ValidationIssue,
)
from composition.runs import cancelled_key, early_cancel_key
from services.assembler import batches as bat
from services.assembler import saga
from services.assembler import handlers
from services.assembler.handlers import Deps
from services.assembler.state import batch_item_key, batch_key, decode_batch, decode_run
from tests.fakes import Clock, MemoryState


FIRST = Delivery.first("assembler")


async def handle(event: CloudEvent, deps: Deps, delivery: Delivery = FIRST) -> list[CloudEvent]:
    """The assembler's handlers as the consumer loop calls them (a first delivery unless told)."""
    return list(await handlers.handle(event, delivery, deps))


class MemoryContent:
    def __init__(self):
        self.objects: dict[str, bytes] = {}

    async def put(self, name, data):
        self.objects[name] = data
        return f"obj://mem/{name}"

    async def get(self, ref, max_bytes=None):
        return self.objects[ref.removeprefix("obj://mem/")]


@pytest.fixture
def cdir(tmp_path):
    d = tmp_path / "configs"
    (d / "artifacts").mkdir(parents=True)
    (d / "one.yaml").write_text("id: one\ngenerator: template_fill\ntemplate: 'one'\n")
    (d / "artifacts" / "doc.yaml").write_text(
        """
id: doc
context: {who: artifact}
parts:
  - {id: overview, content_config_id: one}
  - {id: extra, content_config_id: one, required: false}
  - {id: summary, content_config_id: one, depends_on: [overview], context: {level: 2}}
compose: {strategy: layout, layout: "{{ parts.overview }}|{{ parts.summary }}|{{ omitted | join(',') }}"}
"""
    )
    (d / "artifacts" / "badlayout.yaml").write_text(
        "id: badlayout\nparts: [{id: p, content_config_id: one}]\ncompose: {strategy: layout, layout: '{% if %}'}\n"
    )
    (d / "artifacts" / "loop.yaml").write_text(
        "id: loop\nparts:\n  - {id: a, content_config_id: one, depends_on: [b]}\n  - {id: b, content_config_id: one, depends_on: [a]}\n"
    )
    return d


@pytest.fixture
def deps(cdir):
    return Deps(
        state=MemoryState(),
        content=MemoryContent(),
        configs=ConfigStore(cdir),
        artifacts=ArtifactStore(cdir),
        clock=Clock(),
    )


def fresh(deps: Deps) -> Deps:
    """Another instance (or the same one after a restart): same KV, nothing cached."""
    return Deps(
        state=deps.state, content=deps.content, configs=deps.configs, artifacts=deps.artifacts, clock=deps.clock
    )


def batch_event(n, *, coe=True, bad=()):
    items = [BatchItem(content_config_id="no-such" if i in bad else "one", context={"i": i}) for i in range(n)]
    return new_event(
        BATCH_REQUESTED, BatchRequested(items=items, context={"shared": 1, "i": -1}, continue_on_error=coe), source="t"
    )


def outcome_for(req: CloudEvent, ok: bool = True, content: str | None = None) -> CloudEvent:
    d = req.data
    data = ContentGenerated(
        request_id=req.id,
        content_config_id=d.content_config_id,
        status="success" if ok else "error",
        content=(content if content is not None else f"content of {d.origin.key}") if ok else None,
        content_hash="sha256:x" if ok else None,
        error=None if ok else ErrorInfo(code="CONFIG_NOT_FOUND", message="nope"),
        origin=d.origin,
    )
    return new_event(CONTENT_GENERATED, data, source="gen", cause=req)


def validated_for(gen: CloudEvent, valid: bool = True) -> CloudEvent:
    d = gen.data
    data = ContentValidated(
        request_id=d.request_id,
        content_config_id=d.content_config_id,
        valid=valid,
        issues=[] if valid else [ValidationIssue(rule="length", severity="error", message="too short")],
        content=d.content,
        content_hash=d.content_hash,
        origin=d.origin,
    )
    return new_event(CONTENT_VALIDATED, data, source="val", cause=gen)


def of_type(events, t):
    return [e for e in events if e.type == t]


# --------------------------------------------------------------------------- batches


async def test_batch_fans_out_with_deterministic_ids_and_merged_context(deps):
    req = batch_event(5)
    out = await handle(req, deps)
    assert [e.type for e in out] == [GENERATION_REQUESTED] * 5
    assert [e.id for e in out] == [bat.item_request_id(req.id, i) for i in range(5)]
    assert out[3].data.context == {"shared": 1, "i": 3}
    assert out[3].data.origin == Origin(kind="batch", id=req.id, key="3")
    assert all(e.traceid == req.traceid for e in out)
    again = await handle(req, fresh(deps))  # redelivery: same ids, nothing new
    assert [e.id for e in again] == [e.id for e in out]


async def test_batch_redelivery_requests_only_items_without_an_outcome(deps):
    req = batch_event(4)
    reqs = await handle(req, deps)
    for r in reqs[:3]:
        assert await handle(outcome_for(r), deps) == []
    again = await handle(req, fresh(deps))
    assert [e.data.origin.key for e in again] == ["3"]


async def test_batch_completes_exactly_once_with_exact_counts(deps):
    req = batch_event(300, bad={7, 100, 299})
    reqs = await handle(req, deps)
    outs = [outcome_for(r, ok=r.data.content_config_id == "one") for r in reqs]
    results = await asyncio.gather(*(handle(o, deps) for o in outs))
    done = [e for r in results for e in r]
    assert len(done) == 1 and done[0].type == BATCH_COMPLETED
    c = done[0].data
    assert done[0].id == bat.completed_id(req.id)
    assert (c.status, c.total, c.successful, c.failed, c.skipped) == ("error", 300, 297, 3, 0)
    assert [i.index for i in c.items] == list(range(300))
    assert [i.index for i in c.items if i.status == "error"] == [7, 100, 299]
    assert c.items[7].error.code == "CONFIG_NOT_FOUND" and c.items[8].request_id == reqs[8].id
    # group commit: far fewer writes than outcomes
    assert deps.state.updates < 60
    # every outcome redelivered, to another instance: only the closer announces again, same id
    closer = decode_batch(deps.state.data[f"batch.{req.id}"][0]).closed_by
    other = fresh(deps)
    again = [e for o in outs for e in await handle(o, other)]
    assert [e.id for e in again] == [done[0].id]
    assert [o.id for o in outs if o.id == closer]
    # once the completion was read back from the stream, nobody announces any more
    assert await handle(done[0], other) == []
    assert decode_batch(deps.state.data[f"batch.{req.id}"][0]).finished
    assert [e for o in outs for e in await handle(o, fresh(deps))] == []


async def test_crash_between_item_put_and_compare_and_set(deps):
    req = batch_event(2)
    r0, r1 = await handle(req, deps)
    await handle(outcome_for(r0), deps)

    class Crash(Exception):
        pass

    real_update = deps.state.update

    async def crashing_update(key, value, revision):
        raise Crash("kill -9")

    deps.state.update = crashing_update
    last = outcome_for(r1)
    with pytest.raises(Crash):
        await handle(last, deps)
    assert batch_item_key(req.id, 1) in deps.state.data  # put happened, bit not set
    assert decode_batch(deps.state.data[f"batch.{req.id}"][0]).done == 1
    deps.state.update = real_update
    out = await handle(last, fresh(deps))  # the redelivery
    assert [e.type for e in out] == [BATCH_COMPLETED] and out[0].data.successful == 2


async def test_crash_after_closing_compare_and_set_reannounces_on_redelivery(deps):
    req = batch_event(1)
    (r0,) = await handle(req, deps)
    o = outcome_for(r0)
    first = await handle(o, deps)  # "published nothing": the process died before the publish
    again = await handle(o, fresh(deps))
    assert [e.id for e in again] == [e.id for e in first] and again[0].data == first[0].data


async def test_stale_completion_waits_for_the_finished_mark_then_announces_on_the_last_delivery(deps):
    req = batch_event(1)
    (r0,) = await handle(req, deps)
    o = outcome_for(r0)
    await handle(o, deps)
    deps.clock.t += 600  # redelivered ten minutes later (everything was down)
    with pytest.raises(Retry):
        await handle(o, fresh(deps), Delivery(attempt=2, max_attempts=5, consumer="assembler", stream_seq=9))
    out = await handle(o, fresh(deps), Delivery(attempt=5, max_attempts=5, consumer="assembler", stream_seq=9))
    assert [e.type for e in out] == [BATCH_COMPLETED]


async def test_continue_on_error_false_stops_and_skips(deps):
    req = batch_event(6, coe=False, bad={2})
    reqs = await handle(req, deps)
    assert f"batch.{req.id}.spec" in deps.state.data
    out = []
    for r in reqs[:3]:  # 0, 1 succeed, 2 fails: the batch stops
        out += await handle(outcome_for(r, ok=r.data.content_config_id == "one"), deps)
    (done,) = out
    c = done.data
    assert (c.status, c.successful, c.failed, c.skipped) == ("error", 2, 1, 3)
    assert [i.status for i in c.items] == ["success", "success", "error", "skipped", "skipped", "skipped"]
    assert c.items[4].content_config_id == "one" and c.error.code == "BATCH_STOPPED"
    for r in reqs[3:]:  # later outcomes are ignored
        assert await handle(outcome_for(r), deps) == []
    rec = decode_batch(deps.state.data[f"batch.{req.id}"][0])
    assert (rec.successful, rec.failed) == (2, 1)


async def test_large_batch_items_go_by_reference(deps):
    deps.inline_items = 10
    req = batch_event(12)
    reqs = await handle(req, deps)
    out = [e for r in reqs for e in await handle(outcome_for(r), deps)]
    (done,) = out
    assert done.data.items is None and done.data.items_ref
    items = msgspec.json.decode(await deps.content.get(done.data.items_ref), type=list[BatchItemOutcome])
    assert [i.index for i in items] == list(range(12)) and all(i.status == "success" for i in items)


async def test_batch_items_by_reference_are_read_back_from_the_object_store(deps):
    req = batch_event(5)
    ref = await deps.content.put(f"{req.id}-items.json", msgspec.json.encode(req.data.items))
    by_ref = msgspec.structs.replace(req, data=msgspec.structs.replace(req.data, items=[], items_ref=ref, item_count=5))
    out = await handle(by_ref, deps)
    assert [e.id for e in out] == [bat.item_request_id(req.id, i) for i in range(5)]
    assert out[3].data.context == {"shared": 1, "i": 3}


@pytest.mark.parametrize(
    "body, count",
    [
        (b"not json", None),
        (b'[{"content_config_id": ""}]', None),
        (b"[]", None),
        (b'[{"content_config_id": "one"}]', 2),
    ],
)
async def test_batch_items_by_reference_that_are_not_items_are_rejected(deps, body, count):
    req = batch_event(1)
    ref = await deps.content.put("bad-items.json", body)
    by_ref = msgspec.structs.replace(
        req, data=msgspec.structs.replace(req.data, items=[], items_ref=ref, item_count=count)
    )
    with pytest.raises(Reject) as e:
        await handle(by_ref, deps)
    assert e.value.code == "INVALID_DATA"
    assert f"batch.{req.id}" not in deps.state.data  # nothing started


async def test_outcomes_without_or_with_unknown_origin_are_ignored(deps):
    plain = new_event(
        CONTENT_GENERATED, ContentGenerated(request_id="r", content_config_id="one", status="success"), source="g"
    )
    assert await handle(plain, deps) == []
    ghost = ContentGenerated(
        request_id="r", content_config_id="one", status="success", origin=Origin(kind="batch", id="nope", key="0")
    )
    assert await handle(new_event(CONTENT_GENERATED, ghost, source="g"), deps) == []
    ghost_part = ContentValidated(
        request_id="r", content_config_id="one", valid=True, origin=Origin(kind="artifact", id="nope", key="p")
    )
    assert await handle(new_event(CONTENT_VALIDATED, ghost_part, source="v"), deps) == []
    req = batch_event(2)
    await handle(req, deps)
    bad_key = ContentGenerated(
        request_id="r", content_config_id="one", status="success", origin=Origin(kind="batch", id=req.id, key="9")
    )
    assert await handle(new_event(CONTENT_GENERATED, bad_key, source="g"), deps) == []
    assert decode_batch(deps.state.data[f"batch.{req.id}"][0]).done == 0


async def test_unexpected_type_is_rejected(deps):
    ev = new_event(
        NOTIFICATION_FAILED,
        NotificationFailed(
            subscription="s", event_id="e", event_type="t", attempts=1, error=ErrorInfo(code="X", message="y")
        ),
        source="n",
    )
    with pytest.raises(Reject):
        await handle(ev, deps)


# --------------------------------------------------------------------------- artifacts


def artifact_event(aid="doc", ctx=None):
    return new_event(ARTIFACT_REQUESTED, ArtifactRequested(artifact_id=aid, context=ctx or {}), source="t")


async def test_artifact_flow_with_dependencies_and_an_omitted_part(deps):
    req = artifact_event(ctx={"who": "request"})
    first = await handle(req, deps)
    assert [e.data.origin.key for e in first] == ["overview", "extra"]
    assert first[0].data.context == {"who": "request"}
    by_part = {e.data.origin.key: e for e in first}
    # generated successes wait for their verdict
    g_over = outcome_for(by_part["overview"], content="THE OVERVIEW")
    assert await handle(g_over, deps) == []
    nxt = await handle(validated_for(g_over), deps)
    assert [e.data.origin.key for e in nxt] == ["summary"]
    assert nxt[0].data.context == {"who": "request", "level": 2, "deps": {"overview": "THE OVERVIEW"}}
    # redelivered verdict: the same request again (same id), nothing else
    again = await handle(validated_for(g_over), fresh(deps))
    assert [e.id for e in again] == [nxt[0].id]
    # the optional part fails validation: omitted
    g_extra = outcome_for(by_part["extra"])
    assert await handle(validated_for(g_extra, valid=False), deps) == []
    g_sum = outcome_for(nxt[0], content="SUM")
    (done,) = await handle(validated_for(g_sum), deps)
    assert done.type == ARTIFACT_ASSEMBLED
    d = done.data
    assert (d.status, d.request_id, d.artifact_id, d.parts_count) == ("success", req.id, "doc", 2)
    assert d.content == "THE OVERVIEW|SUM|extra" and d.omitted_parts == ["extra"]
    run = decode_run(deps.state.data[f"artifact.{req.id}"][0])
    assert run.state["extra"].error.code == "VALIDATION_FAILED" and "too short" in run.state["extra"].error.message
    # finished once read back; then redeliveries announce nothing
    assert await handle(done, deps) == []
    assert await handle(validated_for(g_sum), fresh(deps)) == []


async def test_artifact_required_part_failing_at_generation(deps):
    req = artifact_event()
    by_part = {e.data.origin.key: e for e in await handle(req, deps)}
    (done,) = await handle(outcome_for(by_part["overview"], ok=False), deps)
    d = done.data
    assert d.status == "error" and d.failed_part == "overview" and "CONFIG_NOT_FOUND" in d.error.message
    # the optional part's outcome after the end changes nothing
    assert await handle(validated_for(outcome_for(by_part["extra"])), deps) == []


@pytest.mark.parametrize(
    "aid, code",
    [("missing", "ARTIFACT_NOT_FOUND"), ("loop", "DEPENDENCY_CYCLE"), ("badlayout", "LAYOUT_INVALID")],
)
async def test_artifact_refused_before_any_work(deps, aid, code):
    req = artifact_event(aid)
    out = await handle(req, deps)
    assert [e.type for e in out] == [ARTIFACT_ASSEMBLED]
    assert out[0].data.status == "error" and out[0].data.error.code == code
    assert out[0].data.request_id == req.id
    if code == "DEPENDENCY_CYCLE":
        assert "a -> b -> a" in out[0].data.error.message
    again = await handle(req, fresh(deps))
    assert [e.id for e in again] == [out[0].id]
    await handle(out[0], deps)  # read back: finished
    assert await handle(req, fresh(deps)) == []


async def test_artifact_request_redelivered_rerequests_the_first_parts(deps):
    req = artifact_event()
    first = await handle(req, deps)
    again = await handle(req, fresh(deps))
    assert [e.id for e in again] == [e.id for e in first]


async def test_large_part_content_is_kept_by_reference(deps):
    req = artifact_event()
    by_part = {e.data.origin.key: e for e in await handle(req, deps)}
    big = "x" * 1000
    ref = await deps.content.put("big", big.encode())
    g = outcome_for(by_part["overview"], content=big)
    v = validated_for(g)
    v = msgspec.structs.replace(v, data=msgspec.structs.replace(v.data, content_ref=ref))  # as resolved by the loop
    (summary_req,) = await handle(v, deps)
    assert summary_req.data.context["deps"]["overview"] == big
    stored = deps.state.data[f"artifact.{req.id}.part.overview"][0]
    assert len(stored) < 200 and b"obj://mem/big" in stored


def test_items_json_shape():
    o = BatchItemOutcome(index=1, content_config_id="c", status="success")
    assert json.loads(msgspec.json.encode([o])) == [{"index": 1, "content_config_id": "c", "status": "success"}]


async def test_a_request_too_large_for_an_event_fails_its_part(deps):
    deps.max_event_bytes = 8000
    req = artifact_event()
    by_part = {e.data.origin.key: e for e in await handle(req, deps)}
    g = outcome_for(by_part["overview"], content="y" * 9000)  # summary's request would carry it
    out = await handle(validated_for(g), deps)
    # the required summary fails at once, which ends the run: no request, the completion
    assert [e.type for e in out] == [ARTIFACT_ASSEMBLED] and out[0].data.failed_part == "summary"
    assert "CONTEXT_TOO_LARGE" in out[0].data.error.message
    run = decode_run(deps.state.data[f"artifact.{req.id}"][0])
    assert run.closed and run.state["summary"].status == "failed"
    again = await handle(validated_for(g), fresh(deps))  # redelivered: the same completion, nothing else
    assert [e.id for e in again] == [out[0].id]


async def test_items_with_long_errors_go_by_reference_even_under_a_thousand(deps):
    deps.max_event_bytes = 4000
    req = batch_event(20, bad=set(range(20)))
    reqs = await handle(req, deps)
    out = [e for r in reqs for e in await handle(outcome_for(r, ok=False), deps)]
    (done,) = out
    assert done.data.items is None and done.data.items_ref and done.data.failed == 20


async def test_a_cancel_racing_its_batch_request_stops_it_and_leaves_a_marker_whenever_generations_were_asked(cdir):
    # The cancel and the request, handled at once (two instances), one started some turns of the
    # loop after the other (each KV call of the fake yields once, as on NATS): whichever wins, the
    # batch ends cancelled, and when the request asked for generations before it saw the cancel,
    # the marker the generator follows is there to skip them. A cancel of a run not known yet
    # leaves only the early marker, which the generator does not follow.
    seen = set()
    for lead in range(-20, 40):  # > 0: the request starts first, by that many turns
        deps = Deps(
            state=MemoryState(),
            content=MemoryContent(),
            configs=ConfigStore(cdir),
            artifacts=ArtifactStore(cdir),
            clock=Clock(),
        )
        req = batch_event(3)
        cancel = new_event(CANCEL_REQUESTED, CancelRequested(kind="batch", id=req.id, reason="t"), source="t")

        async def after(turns, coro):
            for _ in range(turns):
                await asyncio.sleep(0)
            return await coro

        out, _ = await asyncio.gather(
            after(max(0, -lead), handle(req, deps)), after(max(0, lead), saga.on_cancel_requested(cancel, FIRST, deps))
        )
        asked = any(e.type == GENERATION_REQUESTED for e in out)
        record = decode_batch(deps.state.data[batch_key(req.id)][0])
        assert record.closed and record.outcome == "cancelled", lead
        followed = deps.state.data.get(cancelled_key("batch", req.id)) is not None
        early = deps.state.data.get(early_cancel_key("batch", req.id)) is not None
        if asked:
            assert followed, lead
        seen.add((asked, followed, early))
    # every order happened: the cancel first (the early marker only, nothing asked), the request
    # first (generations asked, then the followed marker), and the ones in between
    assert (False, False, True) in seen and (True, True, False) in seen and len(seen) >= 3, seen
