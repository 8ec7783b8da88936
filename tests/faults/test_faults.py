"""Faults across the services: processes and servers die mid-batch, and the
JSONL must still hold every item's outcome exactly once and one batch_completed.

Each test records a row (fault, items, lost, duplicated, and recovery: seconds from
the fault to batch_completed, restart included); with
CHORA_RELIABILITY_REPORT=path the rows are appended there as JSON lines (the
README's reliability table is made from such a run).
"""

from __future__ import annotations

import json
import os
import time

import nats
import pytest

from bus.publisher import Publisher
from contracts.catalogue import BATCH_REQUESTED
from contracts.envelope import new_event
from contracts.events import BatchItem, BatchRequested
from tests.conftest import wait_for
from tests.faults.harness import SERVICES, ProcStack, batch_report

ITEMS = int(os.environ.get("CHORA_FAULT_ITEMS", "5000"))


def record(fault: str, items: int, rep: dict, recovery_s: float | None) -> None:
    row = {
        "fault": fault,
        "items": items,
        "lost": items - rep["distinct_items"],
        "duplicated": rep["items_twice"] + rep["duplicate_lines"] + max(0, len(rep["completed"]) - 1),
        "recovery_s": None if recovery_s is None else round(recovery_s, 2),
    }
    print("reliability:", json.dumps(row))
    path = os.environ.get("CHORA_RELIABILITY_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


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


async def quiescent(stack: ProcStack) -> bool:
    """Every durable consumer has nothing pending and nothing unacknowledged."""
    nc = await nats.connect(stack.url.split(","))
    try:
        js = nc.jetstream()
        infos = await js.consumers_info(f"{stack.prefix.upper()}_EVENTS")
        return all(c.num_pending == 0 and c.num_ack_pending == 0 for c in infos)
    except Exception:
        return False
    finally:
        await nc.close()


async def finish_and_check(stack: ProcStack, batch_id: str, fault: str, fault_at: float | None) -> dict:
    """Wait for the batch, check exactly-once, record the time from the fault to batch_completed."""
    await wait_for(lambda: stack.count("chora.batch_completed", batch_id) >= 1, timeout=240, what="batch_completed")
    recovery_s = None if fault_at is None else time.monotonic() - fault_at
    await wait_for(lambda: quiescent(stack), timeout=120, what="all consumers drained")
    rep = batch_report(stack.lines(), batch_id)
    record(fault, ITEMS, rep, recovery_s)
    rep["recovery_s"] = recovery_s
    assert rep["duplicate_lines"] == 0, "an event id stands twice in the JSONL"
    assert rep["requests"] == ITEMS
    assert rep["outcomes"] == ITEMS and rep["distinct_items"] == ITEMS and rep["items_twice"] == 0
    assert len(rep["completed"]) == 1
    done = rep["completed"][0]
    assert (done["total"], done["successful"], done["failed"]) == (ITEMS, ITEMS, 0)
    return rep


@pytest.fixture
def stack(tmp_path, nats_server):
    s = ProcStack(tmp_path, nats_server)
    yield s
    s.stop_all()


async def progress(stack: ProcStack, batch_id: str, at: int) -> None:
    await wait_for(lambda: stack.count("chora.content_generated", batch_id) >= at, timeout=120, what=f"{at} outcomes")


@pytest.mark.parametrize("victim", SERVICES)
async def test_kill9_a_service_mid_batch_then_restart(stack, victim):
    for name in SERVICES:
        stack.spawn(name)
    batch_id = await publish_batch(stack, ITEMS)
    await progress(stack, batch_id, ITEMS // 3)
    t0 = time.monotonic()
    stack.kill9(victim)
    stack.spawn(victim)
    await finish_and_check(stack, batch_id, f"kill -9 {victim} mid-batch, restart", t0)


async def test_kill9_nats_server_mid_batch_then_restart(stack, nats_server):
    for name in SERVICES:
        stack.spawn(name)
    batch_id = await publish_batch(stack, ITEMS)
    await progress(stack, batch_id, ITEMS // 3)
    t0 = time.monotonic()
    nats_server.kill()
    nats_server.restart()
    await finish_and_check(stack, batch_id, "kill -9 nats-server (file store) mid-batch, restart", t0)


async def test_sigterm_during_load_finishes_in_flight_work(tmp_path, nats_server):
    """SIGTERM under load: each service exits 0 after finishing and acking its in-flight work
    and returning (nak) what it had not started. Nothing may be stranded until ack_wait: with
    ack_wait at 30 s here, the batch must complete after the restart well before that."""
    ack_wait = 30.0
    stack = ProcStack(tmp_path, nats_server, extra_env={"CHORA_ACK_WAIT_S": str(ack_wait)})
    try:
        for name in SERVICES:
            stack.spawn(name)
        batch_id = await publish_batch(stack, ITEMS)
        await progress(stack, batch_id, ITEMS // 4)
        rcs = {name: stack.terminate(name) for name in ("generator", "assembler", "telemetry")}
        assert rcs == {"generator": 0, "assembler": 0, "telemetry": 0}, "a service did not drain cleanly"
        t0 = time.monotonic()
        for name in ("generator", "assembler", "telemetry"):
            stack.spawn(name)
        rep = await finish_and_check(stack, batch_id, "SIGTERM generator, assembler, telemetry under load, restart", t0)
        assert rep["recovery_s"] < ack_wait * 0.8, "work was stranded until ack_wait instead of handed back"
    finally:
        stack.stop_all()


async def test_two_instances_of_every_service(stack):
    for name in SERVICES:
        stack.spawn(name)
        stack.spawn(name)
    batch_id = await publish_batch(stack, ITEMS)
    await finish_and_check(stack, batch_id, "two instances of every service", None)
