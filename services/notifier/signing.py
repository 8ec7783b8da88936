"""Webhook signatures to the Standard Webhooks specification (https://www.standardwebhooks.com).

Every POST carries three headers:

- ``webhook-id``: the delivery's id, ``<event id>:<subscription>``; the same on every
  attempt, and equal to the ``Idempotency-Key`` header a receiver deduplicates on;
- ``webhook-timestamp``: unix seconds when the attempt was signed;
- ``webhook-signature``: ``v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<body>">``, one per
  secret, separated by spaces (several during a secret rotation).

The body is the whole CloudEvent in structured mode (``application/cloudevents+json``), so
the signature covers every attribute (id, type, source, time, traceparent, ...) as well as
the data: nothing a receiver acts on travels outside the signed content.

Secrets: an environment variable holds one secret, or several separated by whitespace
during a rotation: every secret signs, and a receiver that knows any one of them accepts.
A secret written ``whsec_<base64>`` (the spec's form, what receivers' libraries take) is
the base64-decoded key; any other secret is its UTF-8 bytes as they are, so secrets that
predate this format keep working: a receiver uses them as raw bytes
(``standardwebhooks.Webhook(secret.encode())``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Sequence

ID_HEADER = "webhook-id"
TIMESTAMP_HEADER = "webhook-timestamp"
SIGNATURE_HEADER = "webhook-signature"
SECRET_PREFIX = "whsec_"
VERSION = "v1"


class SecretError(ValueError):
    """A secret that cannot be used (the message never contains the secret)."""


def parse_secrets(value: str) -> tuple[bytes, ...]:
    """The signing keys in an environment variable's value: whitespace-separated secrets,
    each ``whsec_<base64>`` (decoded) or raw (its UTF-8 bytes)."""
    keys = []
    for n, secret in enumerate(value.split(), 1):
        if secret.startswith(SECRET_PREFIX):
            encoded = secret[len(SECRET_PREFIX) :]
            try:
                key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
            except (binascii.Error, ValueError):
                raise SecretError(f"secret {n} starts with {SECRET_PREFIX} but the rest is not base64") from None
            if not key:
                raise SecretError(f"secret {n} is {SECRET_PREFIX} with an empty key")
        else:
            key = secret.encode("utf-8")
        keys.append(key)
    if not keys:
        raise SecretError("no secret (the value is empty or only whitespace)")
    return tuple(keys)


def _keys(secrets: bytes | Sequence[bytes]) -> Sequence[bytes]:
    return (secrets,) if isinstance(secrets, bytes) else secrets


def signature(secret: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """``v1,<base64>`` for ``body`` sent as ``msg_id`` at ``timestamp``."""
    content = f"{msg_id}.{int(timestamp)}.".encode() + body
    return f"{VERSION}," + base64.b64encode(hmac.new(secret, content, hashlib.sha256).digest()).decode("ascii")


def signature_headers(
    secrets: bytes | Sequence[bytes], msg_id: str, body: bytes, now: float | None = None
) -> dict[str, str]:
    """The three Standard Webhooks headers, one signature per secret."""
    ts = int(time.time() if now is None else now)
    sigs = " ".join(signature(key, msg_id, ts, body) for key in _keys(secrets))
    return {ID_HEADER: msg_id, TIMESTAMP_HEADER: str(ts), SIGNATURE_HEADER: sigs}


def verify(
    secret: bytes,
    headers: dict[str, str],
    body: bytes,
    *,
    tolerance_s: float | None = 300.0,
    now: float | None = None,
) -> bool:
    """Whether ``headers`` carry a valid signature of ``body`` by ``secret`` (constant-time),
    with a timestamp within ``tolerance_s`` of ``now`` (None: any age). Receivers in Python
    use the ``standardwebhooks`` package instead; this is for the project's own checks."""
    h = {k.lower(): v for k, v in headers.items()}
    msg_id, timestamp, sigs = h.get(ID_HEADER), h.get(TIMESTAMP_HEADER), h.get(SIGNATURE_HEADER)
    if not (msg_id and timestamp and sigs):
        return False
    try:
        ts = int(timestamp)
    except ValueError:
        return False
    if tolerance_s is not None and abs((time.time() if now is None else now) - ts) > tolerance_s:
        return False
    expected = signature(secret, msg_id, ts, body)
    return any(hmac.compare_digest(expected, s) for s in sigs.split(" "))
