"""``Idempotency-Key`` on the POSTs: a repeated key answers the first response.

The first request with a key claims it with a KV *create* (so two concurrent duplicates
never both publish: the loser of the create gets 409 IDEMPOTENCY_IN_PROGRESS until the
first one has answered), then stores its response under the key. Records live in the
gateway bucket for its max age (24 h), keyed by the caller's API key name and the
Idempotency-Key (hashed). The same key with another body (or another endpoint) is
422 IDEMPOTENCY_KEY_REUSED. A response the client should retry (5xx) releases the claim.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Awaitable, Callable

import msgspec
from starlette.responses import Response

from bus.state import StateStore
from services.gateway.model import GatewayError

log = logging.getLogger("chora.gateway")

MAX_KEY_LENGTH = 255
REPLAYED = "Idempotent-Replayed"
_KEEP_HEADERS = ("location", "content-type", "preference-applied", "retry-after")


class Stored(msgspec.Struct, kw_only=True, omit_defaults=True):
    fingerprint: str
    state: str = "pending"  # pending | done
    status: int = 0
    headers: dict[str, str] = {}
    body: bytes = b""


def record_key(principal: str, key: str) -> str:
    return "idem." + hashlib.sha256(f"{principal}\n{key}".encode()).hexdigest()[:48]


def fingerprint(method: str, path: str, body: bytes) -> str:
    return hashlib.sha256(method.encode() + b" " + path.encode() + b"\n" + body).hexdigest()


def check_key(key: str) -> None:
    if not key or len(key) > MAX_KEY_LENGTH or any(ord(c) < 0x20 or ord(c) > 0x7E for c in key):
        raise GatewayError(
            400, "BAD_IDEMPOTENCY_KEY", f"Idempotency-Key must be 1-{MAX_KEY_LENGTH} printable ASCII characters"
        )


async def idempotent(
    records: StateStore,
    principal: str,
    key: str,
    print_: str,
    compute: Callable[[], Awaitable[Response]],
) -> Response:
    """The response of ``compute()``, or the stored response of the first request with ``key``."""
    check_key(key)
    rkey = record_key(principal, key)
    claim = msgspec.msgpack.encode(Stored(fingerprint=print_))
    if await records.create(rkey, claim) is None:
        got = await records.get(rkey)
        if got is not None:
            first = msgspec.msgpack.decode(got[0], type=Stored)
            if first.fingerprint != print_:
                raise GatewayError(
                    422,
                    "IDEMPOTENCY_KEY_REUSED",
                    "this Idempotency-Key was used with another request body (or endpoint)",
                )
            if first.state != "done":
                raise GatewayError(
                    409,
                    "IDEMPOTENCY_IN_PROGRESS",
                    "a request with this Idempotency-Key is still being answered; try again",
                    headers={"Retry-After": "1"},
                )
            return Response(first.body, status_code=first.status, headers={**first.headers, REPLAYED: "true"})
        # the claim expired between our create and get: take it
        await records.put(rkey, claim)
    try:
        response = await compute()
    except BaseException:
        await _release(records, rkey)
        raise
    if response.status_code >= 500:
        await _release(records, rkey)
        return response
    headers = {k: v for k, v in response.headers.items() if k.lower() in _KEEP_HEADERS}
    done = Stored(
        fingerprint=print_, state="done", status=response.status_code, headers=headers, body=bytes(response.body)
    )
    try:
        await records.put(rkey, msgspec.msgpack.encode(done))
    except Exception as e:  # too large to keep (or the bus is gone): the key can be used again
        log.warning("cannot store the response for an Idempotency-Key: %s", e)
        await _release(records, rkey)
    return response


async def _release(records: StateStore, rkey: str) -> None:
    try:
        kv = await records.kv()
        await kv.delete(rkey)
    except Exception as e:
        log.warning("cannot release an Idempotency-Key claim: %s", e)
