"""KV key tokens for request ids: shared by the services that keep state per request (the
assembler's runs and batches, the notifier's callbacks). Moved here from the assembler so
that two services can share it without importing each other."""

from __future__ import annotations

import hashlib
import re

_SAFE = re.compile(r"[A-Za-z0-9_-]{1,100}")


def key_id(request_id: str) -> str:
    """The key token for a request id: itself when safe, else ``h`` + 32 hex of its sha256.

    KV keys allow ``[-/_=.A-Za-z0-9]`` and a dot starts a new token; a foreign producer
    may use any CloudEvent id."""
    if _SAFE.fullmatch(request_id):
        return request_id
    return "h" + hashlib.sha256(request_id.encode("utf-8", "surrogatepass")).hexdigest()[:32]
