"""Runs (artifacts and batches) as other services see them, one layer down so that they
share these without importing the assembler.

**Reading a run** (the CLI and the gateway, before they ask for a cancel): does the
assembler know it, and has it completed. The records are the assembler's
(``services/assembler/state.py``); this reads only the few fields every run record has
(``closed``, ``finished``, ``outcome``, and ``status`` where the record keeps one), so it
does not depend on the rest of their shape.

**Markers of stopped runs, shared by the assembler (writes them) and the generator (reads them).

When a run (an artifact or a batch) is cancelled or times out, the assembler puts
``cancelled.<kind>.<key id of the run>`` in the state bucket *before* it closes the run's
record; the generator keeps the set of marked runs in memory (a follow of
``cancelled.*.*``) and answers the generation requests of a marked run with an
error outcome RUN_CANCELLED instead of rendering them. A cancel that arrives
before its run's request is handled leaves an *early* marker,
``cancelled.early.<kind>.<key id>``, which the generator does not follow (four tokens:
``cancelled.*.*`` does not match it): the request's handler honours it and closes the
run before any of its generations is asked for (see docs/saga.md), so the generator
never needs it, and cancels of runs that never come (any client may send them) cost
the generator nothing. Here one layer down, so that both services share the keys
without importing each other.
"""

from __future__ import annotations

import uuid
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
    outcome: str | None = None  # cancelled | timed_out: the run was stopped (docs/saga.md)
    failed: int = 0  # batches: items that failed


_dec_view = msgspec.msgpack.Decoder(RunView)


def run_status(view: RunView) -> str | None:
    """The run's status once decided: the record's, else (batches) success or error by its failed items."""
    if not view.closed:
        return None
    return view.outcome or view.status or ("success" if view.failed == 0 else "error")


async def read_run(state: Readable, kind: RunKind, run_id: str) -> dict[str, Any] | None:
    """``{kind, id, state: running | closing | finished, status}`` of the run, or None when the
    assembler has no record of it (unknown, not accepted yet, or expired)."""
    got = await state.get(run_key(kind, run_id))
    if got is None:
        return None
    v = _dec_view.decode(got[0])
    phase = "finished" if v.finished else ("closing" if v.closed else "running")
    return {"kind": kind, "id": run_id, "state": phase, "status": run_status(v)}


CANCELLED_PREFIX = "cancelled"
_UNDONE = uuid.UUID("3f0b6c2e-91d4-5a7e-b8c3-7e2d4a1f6b09")


def undone_id(request_id: str) -> str:
    """The id of the ``effects_compensated`` that answers compensation request ``request_id``:
    the generator publishes it, the assembler checks it (a redone compensation is a duplicate)."""
    return str(uuid.uuid5(_UNDONE, f"undone/{request_id}"))


MARKERS = f"{CANCELLED_PREFIX}.*.*"  # the subject pattern of every marker key


def cancelled_key(kind: str, run_id: str) -> str:
    """The marker key of run ``run_id`` of ``kind`` (``artifact`` / ``batch``): a cancel that
    names the wrong kind marks a run that does not exist, never another one."""
    return f"{CANCELLED_PREFIX}.{kind}.{key_id(run_id)}"


def early_cancel_key(kind: str, run_id: str) -> str:
    """The marker a cancel leaves for run ``run_id`` of ``kind`` when the assembler does not know
    the run yet: its request's handler reads it; the generator does not follow it."""
    return f"{CANCELLED_PREFIX}.early.{kind}.{key_id(run_id)}"


def run_token(key: str) -> str | None:
    """``<kind>.<run key token>`` of a marker key (``cancelled.<kind>.<token>``), else None."""
    parts = key.split(".")
    if len(parts) != 3 or parts[0] != CANCELLED_PREFIX or parts[1] not in ("artifact", "batch") or not parts[2]:
        return None
    return f"{parts[1]}.{parts[2]}"


def run_of(kind: str, run_id: str) -> str:
    """What :func:`run_token` gives for the marker of run ``run_id`` of ``kind``."""
    return f"{kind}.{key_id(run_id)}"


class RunMarker(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Why a run was stopped, and by which event."""

    kind: Literal["artifact", "batch"]
    outcome: Literal["cancelled", "timed_out"]
    by: str  # id of the cancel request (or of the deadline timer)
    at: float
    reason: str | None = None


_dec = msgspec.msgpack.Decoder(RunMarker)
_enc = msgspec.msgpack.Encoder()


def encode_marker(marker: RunMarker) -> bytes:
    return _enc.encode(marker)


def decode_marker(raw: bytes) -> RunMarker | None:
    try:
        return _dec.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
