"""The results TTL without a server: what the assembler writes when a batch is marked finished
(services/assembler/retention.py, through on_announced), and how readers answer past it
(composition.batch_records). The expiry itself, by the server, is in
tests/integration/test_run_surfaces.py."""

from __future__ import annotations

import msgspec
import pytest

from composition.artifacts import ArtifactStore
from composition.batch_records import (
    BatchRecord,
    ResultsExpired,
    batch_item_key,
    batch_key,
    decode_batch,
    read_batch_page,
    results_expired,
)
from composition.configs import ConfigStore
from contracts.catalogue import BATCH_COMPLETED
from contracts.envelope import new_event
from contracts.events import BatchCompleted, BatchItemOutcome
from contracts.handling import Delivery
from services.assembler import batches as bat
from services.assembler.handlers import Deps, on_announced
from services.assembler.retention import keep_batch_results
from tests.fakes import Clock, MemoryState

DELIVERY = Delivery(attempt=1, max_attempts=5, consumer="assembler-completions", stream_seq=1)


WEEK = 7 * 24 * 3600.0


def make_deps(tmp_path, ttl: float | None = 60.0, state=None, max_age: float | None = WEEK) -> Deps:
    return Deps(
        state=state or MemoryState(),
        content=None,  # type: ignore[arg-type]
        configs=ConfigStore(tmp_path),
        artifacts=ArtifactStore(tmp_path),
        clock=Clock(1000.0),
        results_ttl_s=ttl,
        state_max_age_s=max_age,
    )


async def finished_batch(state, batch_id: str = "b1", n: int = 3) -> None:
    for i in range(n):
        o = BatchItemOutcome(index=i, content_config_id="one", status="success")
        await state.put(batch_item_key(batch_id, i), msgspec.msgpack.encode(o))
    record = BatchRecord(total=n, started_at=900.0, successful=n, closed=True, closed_at=990.0, finished=True)
    await state.put(batch_key(batch_id), msgspec.msgpack.encode(record))


def completion(batch_id: str = "b1", n: int = 3):
    data = BatchCompleted(batch_id=batch_id, status="success", total=n, successful=n, failed=0)
    return new_event(BATCH_COMPLETED, data, source="chora://assembler", event_id=bat.completed_id(batch_id))


async def test_on_announced_gives_the_items_the_ttl_and_the_record_its_expiry(tmp_path):
    deps = make_deps(tmp_path)
    await finished_batch(deps.state)
    assert await on_announced(completion(), DELIVERY, deps) == []
    state = deps.state
    assert state.ttls == {batch_item_key("b1", i): 60.0 for i in range(3)}  # type: ignore[attr-defined]
    record = decode_batch((await state.get(batch_key("b1")))[0])
    assert record.results_expire_at == 1060.0 and record.finished
    assert batch_key("b1") not in state.ttls  # type: ignore[attr-defined]  # the record keeps the bucket's max age


async def test_a_ttl_as_long_as_the_max_age_writes_only_the_record(tmp_path):
    """The bucket's max age takes the items from started_at + max_age on: the results expire
    then, and no item is written again."""
    deps = make_deps(tmp_path, ttl=WEEK)
    await finished_batch(deps.state)
    seq = deps.state.seq  # type: ignore[attr-defined]
    assert await keep_batch_results("b1", deps) is True
    assert deps.state.ttls == {} and deps.state.seq == seq + 1  # type: ignore[attr-defined]
    assert decode_batch((await deps.state.get(batch_key("b1")))[0]).results_expire_at == 900.0 + WEEK


async def test_a_redelivered_completion_writes_nothing_again(tmp_path):
    deps = make_deps(tmp_path)
    await finished_batch(deps.state)
    assert await keep_batch_results("b1", deps) is True
    seq = deps.state.seq  # type: ignore[attr-defined]
    assert await keep_batch_results("b1", deps) is False
    assert deps.state.seq == seq  # type: ignore[attr-defined]


async def test_without_a_ttl_nothing_changes(tmp_path):
    deps = make_deps(tmp_path, ttl=None)
    await finished_batch(deps.state)
    assert await keep_batch_results("b1", deps) is False
    assert decode_batch((await deps.state.get(batch_key("b1")))[0]).results_expire_at is None


async def test_a_bucket_that_refuses_ttls_keeps_the_results_and_the_completion_is_not_retried(tmp_path, caplog):
    class NoTtl(MemoryState):
        async def put_many(self, entries, ttl_s):
            raise RuntimeError("per-message TTL is disabled")

    deps = make_deps(tmp_path, state=NoTtl())
    await finished_batch(deps.state)
    assert await on_announced(completion(), DELIVERY, deps) == []
    assert decode_batch((await deps.state.get(batch_key("b1")))[0]).results_expire_at is None
    assert "keep no TTL" in caplog.text


def test_results_expire_at_their_time_and_not_before():
    r = BatchRecord(total=1, started_at=0.0, results_expire_at=100.0)
    assert not results_expired(r, now=99.9) and results_expired(r, now=100.0)
    assert not results_expired(BatchRecord(total=1, started_at=0.0), now=1e12)


async def test_reading_a_page_past_the_expiry_raises_results_expired():
    state = MemoryState()
    await finished_batch(state)
    record = decode_batch((await state.get(batch_key("b1")))[0])
    assert len((await read_batch_page(state, "b1", record))["items"]) == 3  # type: ignore[arg-type]
    record.results_expire_at = 1.0
    with pytest.raises(ResultsExpired):
        await read_batch_page(state, "b1", record)  # type: ignore[arg-type]
