"""The line format of the JSONL mirror: one JSON object per event.

Line format (one JSON object per line, keys in this order)::

    schema_version  1: the version of this line format (bumped on an incompatible change)
    timestamp    when the line was produced (RFC3339 UTC)
    event_time   the CloudEvent ``time``
    event_id     the CloudEvent ``id``
    trace_id     chora's trace id (``traceid`` extension)
    traceparent  W3C traceparent
    event_type   the CloudEvent ``type``
    source       the CloudEvent ``source``
    subject      the CloudEvent ``subject`` (only when set)
    status       ``data.status`` when the payload has one, else "ok"
    ...          the payload's own fields, flattened (``msgspec.to_builtins``):
                 ``error: {code, message}`` becomes ``error_code``/``error_message``,
                 a request's ``context`` becomes ``context_sha256``/``context_keys``
                 unless its config opts in to keeping the values
                 (:mod:`services.telemetry.privacy`), ``content`` is dropped (it can be large; ``content_hash`` and
                 ``content_length`` stay, and are filled in when missing), and a
                 payload field whose name clashes with one above is kept as
                 ``data_<name>``.
"""

from __future__ import annotations

import hashlib
from typing import Any

import msgspec

from contracts.envelope import CloudEvent, now_rfc3339
from services.telemetry.privacy import KeepContext, keep_none, private_data

# Envelope keys of a line; a payload field with one of these names becomes data_<name>.
SCHEMA_VERSION = 1

_HEAD_KEYS = frozenset(
    (
        "schema_version",
        "timestamp",
        "event_time",
        "event_id",
        "trace_id",
        "traceparent",
        "event_type",
        "source",
        "subject",
        "status",
    )
)

_encoder = msgspec.json.Encoder()


REDACTED = "[REDACTED]"
DEFAULT_REDACT_KEYS = frozenset(
    {"password", "passwd", "secret", "token", "api_key", "apikey", "authorization", "access_token", "private_key"}
)


def redact(value: Any, keys: frozenset[str]) -> Any:
    """A copy of ``value`` with the value of every mapping key in ``keys`` (case-insensitive,
    at any depth) replaced by ``[REDACTED]``."""
    if isinstance(value, dict):
        return {k: REDACTED if isinstance(k, str) and k.lower() in keys else redact(v, keys) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, keys) for v in value]
    return value


def to_record(
    event: CloudEvent,
    timestamp: str | None = None,
    redact_keys: frozenset[str] = DEFAULT_REDACT_KEYS,
    keep_context: KeepContext = keep_none,
) -> dict[str, Any]:
    """The JSON object mirrored for ``event`` (see the module docstring); ``keep_context``
    says which configs opt in to keeping context values (default: none)."""
    data = msgspec.to_builtins(event.data) if event.data is not None else {}
    if isinstance(data, dict):
        data = private_data(data, keep_context)
    status = "ok"
    if isinstance(data, dict):
        s = data.get("status")
        if s is not None:
            status = s
    rec: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "timestamp": timestamp or now_rfc3339(),
        "event_time": event.time,
        "event_id": event.id,
        "trace_id": event.traceid,
        "traceparent": event.traceparent,
        "event_type": event.type,
        "source": event.source,
    }
    if event.subject is not None:
        rec["subject"] = event.subject
    rec["status"] = status
    if not isinstance(data, dict):  # a payload that is not an object: keep it whole
        rec["data"] = data
        return rec
    for k, v in data.items():
        if redact_keys and isinstance(v, (dict, list)):  # (one pass: redacted as it is copied)
            v = redact(v, redact_keys)
        if k == "status":
            continue
        if k == "content":
            if isinstance(v, str):
                if "content_length" not in data:
                    rec["content_length"] = len(v)
                if "content_hash" not in data:
                    rec["content_hash"] = "sha256:" + hashlib.sha256(v.encode("utf-8", "surrogatepass")).hexdigest()
            continue
        if k == "error" and isinstance(v, dict):
            rec["error_code"] = v.get("code")
            rec["error_message"] = v.get("message")
            continue
        rec["data_" + k if k in _HEAD_KEYS else k] = v
    return rec


def encode_line(
    event: CloudEvent,
    timestamp: str | None = None,
    redact_keys: frozenset[str] = DEFAULT_REDACT_KEYS,
    keep_context: KeepContext = keep_none,
) -> bytes:
    return _encoder.encode(to_record(event, timestamp, redact_keys, keep_context)) + b"\n"


# --------------------------------------------------------------------------- mirrored lines
# The sink's lines also carry ``seq``, the stream sequence of the message (its position in
# the stream: see services.telemetry.sink), as the last key.


def encode_seq_line(
    seq: int,
    event: CloudEvent,
    timestamp: str | None = None,
    redact_keys: frozenset[str] = DEFAULT_REDACT_KEYS,
    keep_context: KeepContext = keep_none,
) -> bytes:
    """The line of ``event``, stored in the stream at sequence ``seq``."""
    rec = to_record(event, timestamp, redact_keys, keep_context)
    rec["seq"] = seq
    return _encoder.encode(rec) + b"\n"


MALFORMED = "malformed"


def encode_malformed_line(
    seq: int, timestamp: str, attrs: dict[str, str | None], code: str, message: str, subject: str
) -> bytes:
    """The line of a message that is not a valid CloudEvent: what could be read of it,
    ``status: "malformed"`` and why (never its body)."""
    rec: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "timestamp": timestamp,
        "event_id": attrs.get("id"),
        "event_type": attrs.get("type"),
        "source": attrs.get("source"),
        "nats_subject": subject,
        "status": MALFORMED,
        "error_code": code,
        "error_message": message[:1000],
        "seq": seq,
    }
    return _encoder.encode(rec) + b"\n"
