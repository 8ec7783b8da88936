"""Webhook signatures: HMAC-SHA256 over the timestamp and the body.

The notifier sends ``X-Chora-Timestamp: <unix seconds>`` and
``X-Chora-Signature: sha256=<hex>`` where the hex is
``HMAC-SHA256(secret, f"{timestamp}.".encode() + body)``. A receiver
recomputes it with the shared secret (:func:`verify`) and refuses stale
timestamps to defeat replays of a captured request.
"""

from __future__ import annotations

import hashlib
import hmac
import time

TIMESTAMP_HEADER = "X-Chora-Timestamp"
SIGNATURE_HEADER = "X-Chora-Signature"
SCHEME = "sha256="


def signature(secret: bytes, timestamp: int, body: bytes) -> str:
    """``sha256=<hex>`` for ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret, f"{int(timestamp)}.".encode("ascii") + body, hashlib.sha256)
    return SCHEME + mac.hexdigest()


def signature_headers(secret: bytes, body: bytes, now: float | None = None) -> dict[str, str]:
    ts = int(time.time() if now is None else now)
    return {TIMESTAMP_HEADER: str(ts), SIGNATURE_HEADER: signature(secret, ts, body)}


def verify(
    secret: bytes,
    timestamp: str | int,
    body: bytes,
    sig: str,
    *,
    tolerance_s: float | None = 300.0,
    now: float | None = None,
) -> bool:
    """Whether ``sig`` is the signature of ``body`` at ``timestamp`` (constant-time), and
    the timestamp is within ``tolerance_s`` of ``now`` (None: any age)."""
    try:
        ts = int(timestamp)
    except (TypeError, ValueError):
        return False
    if tolerance_s is not None:
        now = time.time() if now is None else now
        if abs(now - ts) > tolerance_s:
            return False
    if not isinstance(sig, str) or not sig.startswith(SCHEME):
        return False
    return hmac.compare_digest(signature(secret, ts, body), sig)
