"""A batch's progress, read from its KV record (for `chora batch status` and tests)."""

from __future__ import annotations

import time
from typing import Any

from bus.settings import BusSettings
from bus.state import StateStore
from bus.topology import Topology
from services.assembler.state import BatchRecord, batch_key, decode_batch


class BatchLookupError(Exception):
    """No batch has that id or id prefix, or more than one does."""


def _state(nc: Any, settings: BusSettings) -> StateStore:
    return StateStore(nc.jetstream(), Topology.from_settings(settings).state_bucket)


def batch_progress(batch_id: str, r: BatchRecord) -> dict[str, Any]:
    """What `batch status` shows of a batch record."""
    return {
        "batch_id": batch_id,
        "total": r.total,
        "done": r.successful + r.failed,
        "successful": r.successful,
        "failed": r.failed,
        "skipped": r.skipped,
        "closed": r.closed,
        "finished": r.finished,
        "continue_on_error": r.continue_on_error,
        "started_at": r.started_at,
        "elapsed_s": round((r.closed_at or time.time()) - r.started_at, 3),
    }


async def read_batch_status(nc: Any, settings: BusSettings, batch_id: str) -> dict[str, Any] | None:
    """The progress of the batch with exactly this id, from its KV record, or None if there is none."""
    got = await _state(nc, settings).get(batch_key(batch_id))
    return None if got is None else batch_progress(batch_id, decode_batch(got[0]))


async def find_batch(nc: Any, settings: BusSettings, batch_id: str) -> tuple[str, bytes]:
    """(full batch id, its KV record) for ``batch_id`` or an unambiguous prefix of it (the
    8 characters the progress bar shows); :class:`BatchLookupError` says why not."""
    state = _state(nc, settings)
    got = await state.get(batch_key(batch_id))
    if got is not None:
        return batch_id, got[0]
    if not batch_id or "." in batch_id or "*" in batch_id or ">" in batch_id:
        raise BatchLookupError(f"no batch {batch_id} (unknown, or expired)")
    records = await state.matching("batch.*")
    hits = sorted((k.split(".", 1)[1], v) for k, v in records.items() if k.split(".", 1)[1].startswith(batch_id))
    if not hits:
        raise BatchLookupError(f"no batch {batch_id} (no batch id starts with it; unknown, or expired)")
    if len(hits) > 1:
        shown = ", ".join(h[0] for h in hits[:10]) + (f" and {len(hits) - 10} more" if len(hits) > 10 else "")
        raise BatchLookupError(
            f"{batch_id} is ambiguous: {len(hits)} batches start with it ({shown}); give more characters"
        )
    return hits[0]
