"""Markers of stopped runs, shared by the assembler (writes them) and the generator (reads them).

When a run (an artifact or a batch) is cancelled or times out, the assembler puts
``cancelled.<kind>.<key id of the run>`` in the state bucket *before* it closes the run's
record; the generator keeps the set of marked runs in memory (a follow of
``cancelled.*.*``) and answers the generation requests of a marked run with an
error outcome RUN_CANCELLED instead of rendering them. A cancel that arrives
before its run's request is handled leaves the marker too, and the request's
handler honours it (see docs/saga.md). Here one layer down, so that both
services share the key without importing each other.
"""

from __future__ import annotations

import uuid
from typing import Literal

import msgspec

from composition.keys import key_id

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
