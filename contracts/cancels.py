"""Asking for a cancel: the ``chora.cancel.requested`` event every surface publishes.

The CLI (`chora batch cancel`, `chora artifact cancel`), the gateway (``DELETE
/v1/batches/{id}``, ``DELETE /v1/artifacts/{id}``, the MCP tool ``cancel_run``) and
``chora_client`` all build it here, so that they agree on its id.

The id is derived from (kind, run id): asking twice to cancel the same run is the same
request, so a retried ``DELETE`` or a second `chora batch cancel` within the stream's
duplicate window is dropped by JetStream (``Nats-Msg-Id``) instead of being handled twice,
and a later one carries the same id (the assembler treats a cancel as idempotent anyway).
The reason of a repeated request within the window is therefore the first one's.
"""

from __future__ import annotations

import uuid

import msgspec

from contracts.catalogue import CANCEL_REQUESTED
from contracts.envelope import CloudEvent, new_event
from contracts.events import CancelRequested

_NAMESPACE = uuid.UUID("0b7e51c4-1f8a-4d5e-a3c2-9e6d7f8a1b20")


def cancel_event_id(kind: str, run_id: str) -> str:
    """The id of the cancel request for run ``run_id`` of ``kind`` (artifact | batch)."""
    return str(uuid.uuid5(_NAMESPACE, f"{CANCEL_REQUESTED}/{kind}/{run_id}"))


def cancel_request(
    kind: str, run_id: str, reason: str | None = None, *, source: str, trace_id: str | None = None
) -> CloudEvent:
    """The ``chora.cancel.requested`` for run ``run_id``; ``msgspec.ValidationError`` (a
    ValueError) when ``kind``, ``run_id`` or ``reason`` break :class:`CancelRequested`'s bounds."""
    doc = {"kind": kind, "id": run_id, **({"reason": reason} if reason is not None else {})}
    data = msgspec.convert(doc, CancelRequested)
    return new_event(CANCEL_REQUESTED, data, source=source, trace_id=trace_id, event_id=cancel_event_id(kind, run_id))
