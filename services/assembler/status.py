"""A batch's progress, read from its KV record (for `chora batch status` and tests)."""

from __future__ import annotations

import time
from typing import Any

from bus.settings import BusSettings
from bus.state import StateStore
from bus.topology import Topology
from services.assembler.state import batch_key, decode_batch


async def read_batch_status(nc: Any, settings: BusSettings, batch_id: str) -> dict[str, Any] | None:
    """The batch's progress from its KV record, or None if there is none."""
    got = await StateStore(nc.jetstream(), Topology.from_settings(settings).state_bucket).get(batch_key(batch_id))
    if got is None:
        return None
    r = decode_batch(got[0])
    done = r.successful + r.failed
    return {
        "batch_id": batch_id,
        "total": r.total,
        "done": done,
        "successful": r.successful,
        "failed": r.failed,
        "skipped": r.skipped,
        "closed": r.closed,
        "finished": r.finished,
        "continue_on_error": r.continue_on_error,
        "started_at": r.started_at,
        "elapsed_s": round((r.closed_at or time.time()) - r.started_at, 3),
    }
