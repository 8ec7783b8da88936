"""The assembler's records: keys, bitmaps, codecs, batch folding and the group committer."""

from __future__ import annotations

import asyncio

import pytest

from contracts.events import BatchItemOutcome, ErrorInfo
from services.assembler import batches as bat
from services.assembler.state import (
    ArtifactRun,
    BatchRecord,
    CommitConflict,
    Committer,
    Committers,
    PartContent,
    PartPlan,
    PartState,
    artifact_key,
    batch_item_key,
    batch_key,
    bit_is_set,
    decode_batch,
    decode_item,
    decode_part,
    decode_run,
    decode_spec,
    encode,
    encode_spec,
    key_id,
    new_bitmap,
    popcount,
    set_bit,
    unset_bits,
)


class MemoryState:
    """KV with revisions and compare-and-set, in memory (what bus.state.StateStore does on NATS)."""

    def __init__(self):
        self.data: dict[str, tuple[bytes, int]] = {}
        self.seq = 0
        self.updates = 0

    async def get(self, key):
        await asyncio.sleep(0)
        return self.data.get(key)

    async def create(self, key, value):
        await asyncio.sleep(0)
        if key in self.data:
            return None
        self.seq += 1
        self.data[key] = (value, self.seq)
        return self.seq

    async def update(self, key, value, revision):
        await asyncio.sleep(0)
        cur = self.data.get(key)
        if cur is None or cur[1] != revision:
            return None
        self.seq += 1
        self.updates += 1
        self.data[key] = (value, self.seq)
        return self.seq

    async def put(self, key, value):
        await asyncio.sleep(0)
        self.seq += 1
        self.data[key] = (value, self.seq)
        return self.seq

    async def items(self, prefix):
        await asyncio.sleep(0)
        return {k: v for k, (v, _) in self.data.items() if k.startswith(prefix + ".")}


# --------------------------------------------------------------------------- keys and bitmaps


def test_key_id_keeps_safe_ids_and_hashes_the_others():
    assert key_id("6f1c2a8e-5d0b-4f2e-9a57-0c1d3b4e5f60") == "6f1c2a8e-5d0b-4f2e-9a57-0c1d3b4e5f60"
    odd = key_id("urn:team b/batch#1")
    assert odd.startswith("h") and len(odd) == 33 and odd == key_id("urn:team b/batch#1")
    assert key_id("a.b") != "a.b"  # a dot would add a key token
    assert batch_key("x") == "batch.x" and batch_item_key("x", 7) == "batch.x.item.7"
    assert artifact_key("r1") == "artifact.r1"


def test_bitmap_operations():
    bm = bytearray(new_bitmap(13))
    assert len(bm) == 2 and popcount(bm) == 0
    assert set_bit(bm, 0) and set_bit(bm, 12) and not set_bit(bm, 12)
    assert bit_is_set(bm, 12) and not bit_is_set(bm, 11)
    assert popcount(bm) == 2
    assert unset_bits(bytes(bm), 13) == [i for i in range(1, 12)]
    full = bytes([0xFF, 0x1F])
    assert unset_bits(full, 13) == []


# --------------------------------------------------------------------------- codecs


def test_batch_record_round_trip_and_size():
    r = bat.new_record(5000, True, 1000.0)
    for i in range(0, 5000, 3):
        set_bit_b = bytearray(r.bitmap)
        set_bit(set_bit_b, i)
        r.bitmap = bytes(set_bit_b)
    raw = encode(r)
    assert len(raw) < 800  # 625 bytes of bitmap + a few fields
    back = decode_batch(raw)
    assert back == r and back.total == 5000 and bit_is_set(back.bitmap, 2997) and not bit_is_set(back.bitmap, 2998)


def test_artifact_run_round_trip():
    run = ArtifactRun(
        run_id="r",
        artifact_id="a",
        started_at=1.0,
        context={"x": [1, {"y": None}]},
        parts=[
            PartPlan(id="p", content_config_id="c", depends_on=["q"]),
            PartPlan(id="q", content_config_id="c", required=False),
        ],
        state={"p": PartState(), "q": PartState(status="omitted", error=ErrorInfo(code="E", message="m"))},
        layout="{{ parts.p }}",
    )
    back = decode_run(encode(run))
    assert back == run and back.omitted() == ["q"] and back.plan("q").required is False


def test_item_part_and_spec_codecs():
    o = BatchItemOutcome(index=3, content_config_id="c", status="error", error=ErrorInfo(code="X", message="y"))
    assert decode_item(encode(o)) == o
    pc = PartContent(content_ref="obj://b/n", content_hash="sha256:00")
    assert decode_part(encode(pc)) == pc
    ids = ["hello-world"] * 5000 + ["release-notes"]
    raw = encode_spec(ids)
    assert len(raw) < 2000 and decode_spec(raw) == ids


# --------------------------------------------------------------------------- batch folding


def ops(*triples):
    return [bat.ItemOp(i, ok, eid) for i, ok, eid in triples]


def test_fold_counts_each_item_once_and_closes_on_the_last():
    r = bat.new_record(3, True, 10.0)
    r, res = bat.fold(r, ops((0, True, "e0"), (1, False, "e1"), (0, True, "e0-again")), 11.0)
    assert res == [bat.Result.COUNTED, bat.Result.COUNTED, bat.Result.DUPLICATE]
    assert (r.successful, r.failed, r.closed) == (1, 1, False)
    again, res = bat.fold(decode_batch(encode(r)), ops((1, False, "e1")), 12.0)
    assert again is None and res == [bat.Result.DUPLICATE]  # nothing to write
    r, res = bat.fold(r, ops((2, True, "e2"), (1, True, "late")), 13.0)
    assert res == [bat.Result.COUNTED, bat.Result.DUPLICATE]
    assert r.closed and r.closed_by == "e2" and r.closed_at == 13.0 and r.stopped_by_index is None
    assert r.skipped == 0 and r.done == 3


def test_fold_stops_on_the_first_failure_without_continue_on_error():
    r = bat.new_record(5, False, 0.0)
    r, res = bat.fold(r, ops((0, True, "a"), (3, False, "b"), (1, True, "c")), 1.0)
    assert res == [bat.Result.COUNTED, bat.Result.COUNTED, bat.Result.IGNORED]
    assert r.closed and r.closed_by == "b" and r.stopped_by_index == 3
    assert (r.successful, r.failed, r.skipped) == (1, 1, 3)
    assert not bit_is_set(r.bitmap, 1)
    _, res = bat.fold(r, ops((3, False, "b"), (4, True, "d")), 2.0)
    assert res == [bat.Result.DUPLICATE, bat.Result.IGNORED]


def test_fold_finish_is_idempotent():
    r = bat.new_record(1, True, 0.0)
    r, res = bat.fold(r, [bat.FINISH], 1.0)
    assert r.finished and res == [bat.Result.FINISHED]
    r2, res = bat.fold(r, [bat.FINISH], 1.0)
    assert r2 is None and res == [bat.Result.ALREADY]


def test_build_completed_lists_items_from_the_bitmap():
    r = bat.new_record(4, False, 100.0)
    r, _ = bat.fold(r, ops((0, True, "a"), (2, False, "b")), 100.25)
    outcomes = {
        0: BatchItemOutcome(index=0, content_config_id="x", status="success"),
        1: BatchItemOutcome(index=1, content_config_id="y", status="success"),  # stored, never counted
        2: BatchItemOutcome(
            index=2, content_config_id="z", status="error", error=ErrorInfo(code="CONFIG_NOT_FOUND", message="m")
        ),
    }
    c, items = bat.build_completed("B", r, outcomes, ["x", "y", "z", "w"])
    assert (c.status, c.total, c.successful, c.failed, c.skipped) == ("error", 4, 1, 1, 2)
    assert c.duration_ms == 250.0
    assert [i.status for i in items] == ["success", "skipped", "error", "skipped"]
    assert items[3].content_config_id == "w" and items[3].request_id == bat.item_request_id("B", 3)
    assert c.error.code == "BATCH_STOPPED" and "item 2 (z) failed with CONFIG_NOT_FOUND" in c.error.message


# --------------------------------------------------------------------------- the group committer


async def test_group_commit_folds_concurrent_outcomes_into_few_writes():
    state = MemoryState()
    await state.create("batch.b", encode(bat.new_record(256, True, 0.0)))
    c = Committer(state, "batch.b", decode_batch, lambda r, o: bat.fold(r, o, 1.0))
    results = await asyncio.gather(*(c.submit(bat.ItemOp(i, i % 10 != 0, f"e{i}")) for i in range(256)))
    assert all(r.result is bat.Result.COUNTED for r in results)
    assert state.updates == c.writes <= 3  # 256 outcomes, a handful of compare-and-sets
    final = decode_batch(state.data["batch.b"][0])
    assert final.closed and (final.successful, final.failed) == (230, 26)
    closers = [r for r in results if r.record.closed and r.record.closed_by is not None]
    assert {r.record.closed_by for r in closers} == {final.closed_by}


async def test_lost_compare_and_set_is_folded_again_on_a_fresh_read():
    state = MemoryState()
    await state.create("batch.b", encode(bat.new_record(4, True, 0.0)))
    mine = Committer(state, "batch.b", decode_batch, lambda r, o: bat.fold(r, o, 1.0))
    other = Committer(state, "batch.b", decode_batch, lambda r, o: bat.fold(r, o, 1.0))  # "another instance"
    await mine.read()  # cache revision 1
    await other.submit(bat.ItemOp(0, True, "x0"))
    await other.submit(bat.ItemOp(1, True, "x1"))
    got = await mine.submit(bat.ItemOp(1, True, "x1-redelivered"))
    assert got.result is bat.Result.DUPLICATE and mine.conflicts == 1  # lost the CAS, re-read: a duplicate
    got = await mine.submit(bat.ItemOp(2, True, "y2"))
    assert got.result is bat.Result.COUNTED
    got3 = await other.submit(bat.ItemOp(3, False, "x3"))  # other's cache is stale now: conflict, re-read
    assert other.conflicts >= 1 and got3.result is bat.Result.COUNTED
    final = decode_batch(state.data["batch.b"][0])
    assert (final.successful, final.failed, final.closed, final.closed_by) == (3, 1, True, "x3")


async def test_two_committers_racing_count_every_item_once():
    state = MemoryState()
    await state.create("batch.b", encode(bat.new_record(400, True, 0.0)))
    a = Committer(state, "batch.b", decode_batch, lambda r, o: bat.fold(r, o, 1.0))
    b = Committer(state, "batch.b", decode_batch, lambda r, o: bat.fold(r, o, 1.0))
    # every item delivered to both "instances" (the worst case of redeliveries)
    res = await asyncio.gather(*[c.submit(bat.ItemOp(i, True, f"e{i}")) for i in range(400) for c in (a, b)])
    counted = [r for r in res if r.result is bat.Result.COUNTED]
    assert len(counted) == 400
    final = decode_batch(state.data["batch.b"][0])
    assert final.closed and final.successful == 400 and popcount(final.bitmap) == 400
    assert a.conflicts + b.conflicts > 0


async def test_commit_conflict_when_always_losing():
    class Hostile(MemoryState):
        async def update(self, key, value, revision):
            return None

    state = Hostile()
    await state.create("batch.b", encode(bat.new_record(2, True, 0.0)))
    c = Committer(state, "batch.b", decode_batch, lambda r, o: bat.fold(r, o, 1.0))
    c.MAX_ATTEMPTS = 3
    with pytest.raises(CommitConflict):
        await c.submit(bat.ItemOp(0, True, "e"))
    # the committer is usable again afterwards (its task ended cleanly)
    with pytest.raises(CommitConflict):
        await c.submit(bat.ItemOp(1, True, "f"))


def test_committers_evict_idle_ones():
    cs = Committers(MemoryState(), limit=8)
    for i in range(20):
        cs.get(f"k{i}", decode_batch, bat.fold)
    assert len(cs) <= 8
    c = cs.get("k19", decode_batch, bat.fold)
    assert cs.get("k19", decode_batch, bat.fold) is c
    cs.forget("k19")
    assert cs.get("k19", decode_batch, bat.fold) is not c


def test_batch_record_derived_counts():
    r = BatchRecord(total=10, started_at=0.0, successful=3, failed=2, bitmap=new_bitmap(10))
    assert r.done == 5 and r.skipped == 0
    r.closed = True
    assert r.skipped == 5
