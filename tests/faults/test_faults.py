"""Faults across the services: processes and servers die mid-batch (the batch is checked
to be still running at the fault), and afterwards the JSONL and the webhook receiver must
hold, for every item, its generation request, its content_generated and its
content_validated (valid) exactly once, that validation delivered to the webhook (exactly
once by Idempotency-Key, correctly signed), exactly one batch_completed (delivered too), and
an empty dead-letter stream.

Each test records a row: the fault, items, lost, duplicated, the webhook POSTs and how
many repeated a key already delivered (a redelivery: the receiver dedupes by the key), and
two figures: seconds from the fault to batch_completed, and from the fault to every
consumer drained (the validator's and the webhook deliveries included), restart included.
The row is printed; with CHORA_RELIABILITY_REPORT=path it is also appended there as a
JSON line (the reliability table in docs/reliability.md is made from such a run).
"""

from __future__ import annotations

import json
import os
import time

import nats
import pytest

from bus.publisher import Publisher
from contracts.catalogue import BATCH_REQUESTED, CONTENT_GENERATED
from contracts.envelope import new_event
from contracts.events import BatchItem, BatchRequested
from standardwebhooks import WebhookVerificationError
from tests.conftest import acked, wait_for
from tests.faults.harness import (
    BATCH_WAIT_S,
    DRAIN_WAIT_S,
    HOOK_SECRET,
    SERVICES,
    TEST_TIMEOUT_S,
    ProcStack,
    batch_report,
    batch_state,
    dead_letters,
    instance_metrics,
    wait_drained,
)

ITEMS = int(os.environ.get("CHORA_FAULT_ITEMS", "5000"))

pytestmark = pytest.mark.timeout(TEST_TIMEOUT_S)


def record(fault: str, rep: dict, at_fault: dict | None) -> dict:
    row = {
        "fault": fault,
        "items": ITEMS,
        "lost": rep["items_lost"],
        "duplicated": rep["items_twice"]
        + rep["duplicate_lines"]
        + max(0, len(rep["completed"]) - 1)
        + rep["hook_unexpected"],
        "webhook_posts": rep["hook_posts"],
        "webhook_repeated": rep["hook_repeated"],
        "dead_letters": rep["dead_letters"],
        "done_at_fault": None if at_fault is None else at_fault["done"],
        "webhook_posts_at_fault": None if at_fault is None else at_fault["webhook_posts"],
        "completed_s": rep["completed_s"],
        "drained_s": rep["drained_s"],
    }
    print("reliability:", json.dumps(row))
    path = os.environ.get("CHORA_RELIABILITY_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
    return row


def signed(r) -> bool:
    """Whether a received POST verifies as a receiver checks it (the raw secret as raw bytes)."""
    try:
        r.verify(HOOK_SECRET.encode())
    except WebhookVerificationError:
        return False
    return True


async def publish_batch(stack: ProcStack, n: int) -> str:
    nc = await nats.connect(stack.url.split(","), max_reconnect_attempts=-1)
    try:
        ev = new_event(
            BATCH_REQUESTED,
            BatchRequested(
                items=[BatchItem(content_config_id="hello-world", context={"name": f"n{i}"}) for i in range(n)]
            ),
            source="faults",
        )
        await Publisher(nc.jetstream(), stack.prefix, max_bytes=8 << 20).publish(ev)
        return ev.id
    finally:
        await nc.close()


async def start_and_publish(stack: ProcStack, instances: int = 1) -> str:
    """Every service (the notifier's subscription consumer made before the batch exists), then the batch."""
    stack.spawn(*SERVICES * instances)
    return await publish_batch(stack, ITEMS)


async def running_at_fault(stack: ProcStack, batch_id: str) -> dict:
    """The assembler's record says the batch is not done: the fault hits a running batch."""
    st = await batch_state(stack, batch_id)
    assert st is not None and not st["closed"] and st["done"] < ITEMS, f"the batch was not running at the fault: {st}"
    return {**st, "webhook_posts": len(stack.hook.received)}


async def finish_and_check(
    stack: ProcStack, batch_id: str, fault: str, fault_at: float | None, at_fault: dict | None
) -> dict:
    """Wait for the batch and for every consumer to drain, check every item at every stage
    exactly once, record the row."""
    await wait_for(
        lambda: stack.count("chora.batch_completed", batch_id) >= 1,
        timeout=BATCH_WAIT_S,
        what=f"batch_completed after: {fault}",
        interval=0.05,
    )
    completed_at = time.monotonic()
    await wait_drained(stack, DRAIN_WAIT_S, "every consumer drained (validator and webhook subscription included)")
    drained_at = time.monotonic()
    rep = batch_report(stack.lines(), batch_id, ITEMS, stack.hook.keys())
    rep["dead_letters"] = await dead_letters(stack)
    rep["bad_signatures"] = sum(1 for r in stack.hook.received if not signed(r))
    rep["completed_s"] = None if fault_at is None else round(completed_at - fault_at, 2)
    rep["drained_s"] = None if fault_at is None else round(drained_at - fault_at, 2)
    record(fault, rep, at_fault)

    assert rep["duplicate_lines"] == 0, "an event id stands twice in the JSONL"
    assert rep["lost"] == dict.fromkeys(rep["lost"], 0), f"items missing, by stage: {rep['lost']}"
    assert rep["twice"] == dict.fromkeys(rep["twice"], 0), f"items seen twice, by stage: {rep['twice']}"
    assert rep["invalid"] == 0, "the validator found the hello-world outcomes invalid"
    assert len(rep["completed"]) == 1
    done = rep["completed"][0]
    assert (done["total"], done["successful"], done["failed"]) == (ITEMS, ITEMS, 0)
    # the webhook: every subscribed fact of the batch (each item's validation, the completion) exactly once by key
    assert rep["hook_expected"] == ITEMS + 1
    assert (rep["hook_missing"], rep["hook_unexpected"]) == (0, 0), "webhook deliveries missing or unexpected"
    assert rep["notifications"] == {"chora.notification_delivered": ITEMS + 1}, rep["notifications"]
    assert rep["bad_signatures"] == 0, "a webhook POST is not signed with the subscription's secret"
    assert rep["dead_letters"] == 0, "the dead-letter stream is not empty"
    return rep


@pytest.fixture
def stack(tmp_path, nats_server, hook):
    s = ProcStack(tmp_path, nats_server, hook=hook)
    yield s
    s.stop_all()


async def progress(stack: ProcStack, batch_id: str, at: int) -> None:
    await wait_for(
        lambda: stack.count(CONTENT_GENERATED, batch_id) >= at, timeout=120, what=f"{at} outcomes", interval=0.05
    )


@pytest.mark.parametrize("victim", SERVICES)
async def test_kill9_a_service_mid_batch_then_restart(stack, victim):
    batch_id = await start_and_publish(stack)
    await progress(stack, batch_id, ITEMS // 3)
    if victim == "notifier":  # kill it in the middle of its own work too
        await wait_for(lambda: stack.hook.received, timeout=120, what="the notifier delivering")
    t0 = time.monotonic()
    stack.kill9(victim)
    at_fault = await running_at_fault(stack, batch_id)  # read after the kill: still running when it hit
    stack.spawn(victim)
    await finish_and_check(stack, batch_id, f"kill -9 {victim} mid-batch, restart", t0, at_fault)


async def test_kill9_nats_server_mid_batch_then_restart(stack, nats_server):
    batch_id = await start_and_publish(stack)
    await progress(stack, batch_id, ITEMS // 3)
    at_fault = await running_at_fault(stack, batch_id)  # the last read before the server dies
    t0 = time.monotonic()
    nats_server.kill()
    nats_server.restart()
    await finish_and_check(stack, batch_id, "kill -9 nats-server (file store) mid-batch, restart", t0, at_fault)


async def test_sigterm_during_load_finishes_in_flight_work(tmp_path, nats_server, hook):
    """SIGTERM under load: each service exits 0 after finishing and acking its in-flight work
    and returning (nak) what it had not started. Nothing may be stranded until ack_wait: it is
    set far beyond the test's own waits, so stranded work fails the wait for batch_completed
    (or for the consumers to drain) instead of coming back late."""
    ack_wait = 2 * (BATCH_WAIT_S + DRAIN_WAIT_S)
    stack = ProcStack(tmp_path, nats_server, hook=hook, extra_env={"CHORA_ACK_WAIT_S": str(ack_wait)})
    try:
        batch_id = await start_and_publish(stack)
        await progress(stack, batch_id, ITEMS // 4)
        rcs = {name: stack.terminate(name) for name in ("generator", "assembler", "telemetry")}
        assert rcs == {"generator": 0, "assembler": 0, "telemetry": 0}, "a service did not drain cleanly"
        at_fault = await running_at_fault(stack, batch_id)
        t0 = time.monotonic()
        stack.spawn("generator", "assembler", "telemetry")
        await finish_and_check(
            stack, batch_id, "SIGTERM generator, assembler, telemetry under load, restart", t0, at_fault
        )
    finally:
        stack.stop_all()


async def test_two_instances_of_every_service(stack):
    batch_id = await start_and_publish(stack, instances=2)
    await finish_and_check(stack, batch_id, "two instances of every service", None, None)
    for name in SERVICES:  # each instance did its share, by its own /metrics
        if name == "telemetry":
            continue  # no share: every instance mirrors the whole stream (below)
        per_instance = [acked(url) for url in instance_metrics(stack, name)]
        print(f"{name}: messages acked per instance {per_instance}")
        assert len(per_instance) == 2 and all(n > 0 for n in per_instance), (name, per_instance)
    # the two telemetry instances: two complete files, the same stream sequences in each
    other = stack.home / "telemetry-2" / "events.jsonl"
    first = stack.jsonl.read_bytes().count(b"\n")
    await wait_for(
        lambda: other.exists() and other.read_bytes().count(b"\n") >= first,
        DRAIN_WAIT_S,
        "the second telemetry instance's file to catch up",
    )
    seqs = [[json.loads(x)["seq"] for x in f.read_bytes().splitlines()] for f in (stack.jsonl, other)]
    n = min(map(len, seqs))  # the files may still grow (notifications): compare what both hold
    assert n >= first and seqs[0][:n] == seqs[1][:n]
    assert all(s == sorted(set(s)) for s in seqs), "every stream sequence once, in order"
