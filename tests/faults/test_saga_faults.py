"""The saga under faults (docs/saga.md): a cancel during a 5,000-item batch with kill -9 of the
generator, and with kill -9 of the assembler while the run's compensation is under way.
Real processes and a real nats-server (tests/faults/harness.py); the JSONL and the batch
record must show every item's request and outcome (success, or RUN_CANCELLED for those the
generator skipped) exactly once, exactly one batch_completed with status cancelled whose
counts add up, the compensation reported, consumers drained and no dead letters."""

from __future__ import annotations

import time
from collections import Counter

import nats
import pytest

from bus.publisher import Publisher
from contracts.catalogue import (
    BATCH_COMPLETED,
    CANCEL_REQUESTED,
    COMPENSATION_REQUESTED,
    CONTENT_GENERATED,
    EFFECTS_COMPENSATED,
    GENERATION_REQUESTED,
)
from contracts.envelope import new_event
from contracts.events import CancelRequested
from tests.conftest import wait_for
from tests.faults.harness import (
    BATCH_WAIT_S,
    DRAIN_WAIT_S,
    TEST_TIMEOUT_S,
    ProcStack,
    batch_state,
    dead_letters,
    wait_drained,
)
from tests.faults.test_faults import ITEMS, progress, record, running_at_fault, start_and_publish

pytestmark = pytest.mark.timeout(TEST_TIMEOUT_S)


@pytest.fixture
def stack(tmp_path, nats_server, hook):
    # every successful render writes its cache entry (whatever it costs): the effects the saga undoes
    s = ProcStack(tmp_path, nats_server, hook=hook, extra_env={"CHORA_CACHE_MIN_RENDER_MS": "0"})
    yield s
    s.stop_all()


async def publish_cancel(stack: ProcStack, batch_id: str) -> None:
    nc = await nats.connect(stack.url.split(","))
    try:
        ev = new_event(CANCEL_REQUESTED, CancelRequested(kind="batch", id=batch_id, reason="faults"), source="faults")
        await Publisher(nc.jetstream(), stack.prefix).publish(ev)
    finally:
        await nc.close()


async def cancelled_and_checked(stack: ProcStack, batch_id: str, fault: str, t0: float, at_fault: dict) -> dict:
    await wait_for(
        lambda: stack.count(BATCH_COMPLETED, batch_id) >= 1, BATCH_WAIT_S, f"batch_completed after: {fault}", 0.05
    )
    completed_s = round(time.monotonic() - t0, 2)
    await wait_drained(stack, DRAIN_WAIT_S)
    lines = stack.lines()
    mine = [r for r in lines if (r.get("origin") or {}).get("id") == batch_id]
    requests = Counter(r["origin"]["key"] for r in mine if r["event_type"] == GENERATION_REQUESTED)
    outcomes = Counter(r["origin"]["key"] for r in mine if r["event_type"] == CONTENT_GENERATED)
    wanted = {str(i) for i in range(ITEMS)}
    done = [r for r in lines if r["event_type"] == BATCH_COMPLETED and r.get("batch_id") == batch_id]
    facts = [r for r in lines if r["event_type"] == EFFECTS_COMPENSATED and r.get("id") == batch_id]
    asked = [r for r in lines if r["event_type"] == COMPENSATION_REQUESTED and r.get("id") == batch_id]
    skipped = [r for r in mine if r["event_type"] == CONTENT_GENERATED and r.get("error_code") == "RUN_CANCELLED"]
    rep = {
        "duplicate_lines": sum(c - 1 for c in Counter(r["event_id"] for r in lines).values() if c > 1),
        "lost": len(wanted - set(requests)) + len(wanted - set(outcomes)),
        "twice": sum(1 for c in (*requests.values(), *outcomes.values()) if c > 1),
        "dead_letters": await dead_letters(stack),
    }
    record(
        fault,
        {
            "items_lost": rep["lost"],
            "items_twice": rep["twice"],
            "duplicate_lines": rep["duplicate_lines"],
            "completed": done,
            "hook_unexpected": 0,
            "hook_posts": len(stack.hook.received),
            "hook_repeated": 0,
            "dead_letters": rep["dead_letters"],
            "completed_s": completed_s,
            "drained_s": round(time.monotonic() - t0, 2),
        },
        at_fault,
    )
    assert rep["duplicate_lines"] == 0, "an event id stands twice in the JSONL"
    assert rep["lost"] == 0, "an item has no generation request or no outcome"
    assert rep["twice"] == 0, "an item has two requests or two outcomes"
    assert len(done) == 1, f"{len(done)} batch_completed"
    d = done[0]
    assert d["status"] == "cancelled" and d["error_code"] == "RUN_CANCELLED"
    assert d["successful"] + d["failed"] + d["skipped"] == ITEMS and d["skipped"] > 0
    assert d["successful"] >= at_fault["done"] - at_fault.get("failed", 0)
    assert skipped, "the generator skipped nothing of the cancelled batch"
    # the compensation: one fact per request (the same id however often it was redone), and
    # every counted success (each wrote its cache entry) undone, the last item first
    assert asked and len(facts) == asked[0].get(
        "chunks", 1
    )  # the JSONL mirrors the data as published: defaults omitted
    assert len(d["compensated_parts"]) == d["successful"]
    assert [int(k) for k in d["compensated_parts"]] == sorted((int(k) for k in d["compensated_parts"]), reverse=True)
    assert rep["dead_letters"] == 0, "the dead-letter stream is not empty"
    return d


async def test_cancel_mid_batch_kill9_generator_then_restart(stack):
    batch_id = await start_and_publish(stack)
    await progress(stack, batch_id, ITEMS // 10)
    at_fault = await running_at_fault(stack, batch_id)
    await publish_cancel(stack, batch_id)
    # the generator dies while it skips the cancelled batch's requests
    await wait_for(lambda: _skips(stack) > 0, 60, "the generator skipping (RUN_CANCELLED)", 0.05)
    t0 = time.monotonic()
    stack.kill9("generator")
    stack.spawn("generator")
    await cancelled_and_checked(
        stack, batch_id, "cancel mid-batch, kill -9 generator while skipping, restart", t0, at_fault
    )


async def test_cancel_mid_batch_kill9_assembler_during_compensation(stack):
    batch_id = await start_and_publish(stack)
    await progress(stack, batch_id, ITEMS // 10)
    # the generator goes first, so that the compensation requests wait for it
    stack.kill9("generator")
    at_fault = await running_at_fault(stack, batch_id)
    await publish_cancel(stack, batch_id)
    await wait_for(lambda: stack.count(COMPENSATION_REQUESTED) >= 1, 60, "the compensation requested", 0.05)
    st = await batch_state(stack, batch_id)
    assert st is not None and st["closed"] and st["outcome"] == "cancelled" and not st["finished"], st
    t0 = time.monotonic()
    stack.kill9("assembler")  # during the compensation: requested, not answered
    assert stack.count(BATCH_COMPLETED, batch_id) == 0
    stack.spawn("assembler", "generator")
    d = await cancelled_and_checked(
        stack, batch_id, "cancel mid-batch, kill -9 generator then assembler during compensation, restart", t0, at_fault
    )
    assert d["successful"] >= at_fault["done"]


def _skips(stack: ProcStack) -> int:
    """RUN_CANCELLED outcomes among the last lines of the JSONL (its tail only: polled often)."""
    if not stack.jsonl.exists():
        return 0
    with open(stack.jsonl, "rb") as f:
        f.seek(max(0, stack.jsonl.stat().st_size - (256 << 10)))
        return f.read().count(b'"error_code":"RUN_CANCELLED"')
