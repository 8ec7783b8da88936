"""Trace context: chora's trace id and the W3C ``traceparent``.

A chora trace id is the 32-hex W3C trace-id, so both always agree. An id
given from outside (``--trace-id``, ``CHORA_TRACE_ID``) that is not 32 hex is
kept as the chora trace id and hashed into the W3C trace-id.
"""

from __future__ import annotations

import hashlib
import re
import random
import secrets

# span ids: random, not secret (the module's generator, reseeded after a fork); about 20 times
# cheaper than secrets.token_hex, which reads the OS's entropy once per outcome
_span_bits = random.getrandbits

_HEX32 = re.compile(r"^[0-9a-f]{32}$")
_TRACE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


def new_trace_id() -> str:
    return secrets.token_hex(16)


def valid_trace_id(value: str) -> bool:
    return bool(_TRACE_ID.match(value))


def w3c_trace_id(trace_id: str) -> str:
    if _HEX32.match(trace_id) and trace_id != "0" * 32:
        return trace_id
    return hashlib.sha256(trace_id.encode()).hexdigest()[:32]


def child_traceparent(trace_id: str, parent: str | None = None) -> str:
    """A traceparent for a new span: same trace as ``parent`` if that parses, else ``trace_id``."""
    span = f"{_span_bits(64) or 1:016x}"  # random, never all zeros (W3C); not a secret
    if parent:
        m = _TRACEPARENT.match(parent)
        if m:
            return f"00-{m.group(1)}-{span}-{m.group(3)}"
    return f"00-{w3c_trace_id(trace_id)}-{span}-01"


def parse_traceparent(value: str) -> tuple[str, str, str] | None:
    m = _TRACEPARENT.match(value)
    return (m.group(1), m.group(2), m.group(3)) if m else None
