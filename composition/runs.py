"""What readers need to know of a run (an artifact or a batch) before they ask for a cancel:
does the assembler know it, and has it completed.

The records are the assembler's (``services/assembler/state.py``); this reads only the few
fields every run record has (``closed``, ``finished``, and ``status`` where the record keeps
one), so it does not depend on the rest of their shape.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from composition.batch_records import Readable, batch_key
from composition.keys import key_id

RunKind = Literal["artifact", "batch"]


def artifact_key(run_id: str) -> str:
    """The key of an artifact run's record (moved here from the assembler's state module,
    which re-exports it, so that the gateway and the CLI find the record too)."""
    return f"artifact.{key_id(run_id)}"


def run_key(kind: RunKind, run_id: str) -> str:
    return artifact_key(run_id) if kind == "artifact" else batch_key(run_id)


class RunView(msgspec.Struct, kw_only=True):
    """The fields of an artifact or batch record a reader needs (the rest is ignored)."""

    closed: bool = False  # the outcome is decided
    finished: bool = False  # its completion is in the stream
    status: str | None = None  # artifact runs (and batches, if their record keeps one)
    failed: int = 0  # batches: items that failed


_dec_view = msgspec.msgpack.Decoder(RunView)


def run_status(view: RunView) -> str | None:
    """The run's status once decided: the record's, else (batches) success or error by its failed items."""
    if not view.closed:
        return None
    return view.status or ("success" if view.failed == 0 else "error")


async def read_run(state: Readable, kind: RunKind, run_id: str) -> dict[str, Any] | None:
    """``{kind, id, state: running | closing | finished, status}`` of the run, or None when the
    assembler has no record of it (unknown, not accepted yet, or expired)."""
    got = await state.get(run_key(kind, run_id))
    if got is None:
        return None
    v = _dec_view.decode(got[0])
    phase = "finished" if v.finished else ("closing" if v.closed else "running")
    return {"kind": kind, "id": run_id, "state": phase, "status": run_status(v)}
