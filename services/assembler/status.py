"""A batch's progress, read from its KV record (kept for tests; the readers live in
:mod:`composition.batch_records`, shared by the CLI and the gateway)."""

from __future__ import annotations

from typing import Any

from bus.settings import BusSettings
from bus.state import StateStore
from bus.topology import Topology
from composition.batch_records import BatchLookupError, batch_progress
from composition.batch_records import find_batch as _find
from composition.batch_records import read_batch_status as _read

__all__ = ["BatchLookupError", "batch_progress", "find_batch", "read_batch_status"]


def _state(nc: Any, settings: BusSettings) -> StateStore:
    return StateStore(nc.jetstream(), Topology.from_settings(settings).state_bucket)


async def read_batch_status(nc: Any, settings: BusSettings, batch_id: str) -> dict[str, Any] | None:
    return await _read(_state(nc, settings), batch_id)


async def find_batch(nc: Any, settings: BusSettings, batch_id: str) -> tuple[str, bytes]:
    return await _find(_state(nc, settings), batch_id)
