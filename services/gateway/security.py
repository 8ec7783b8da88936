"""API keys with scopes, and a rate limit per key.

Keys are kept hashed: a file (``CHORA_GATEWAY_KEYS_FILE``, YAML or JSON) lists
``{name, key_sha256, scopes}``; a presented key (``Authorization: Bearer <key>`` or
``X-API-Key``) is hashed with SHA-256 and compared with every stored hash in constant time.
Scopes: ``generate`` (POST /v1/generate, /v1/artifacts), ``batch`` (POST /v1/batches),
``read`` (every GET), ``admin`` (all of them).

The rate limit is a token bucket per key, in this process (each gateway instance counts
its own: behind a load balancer of N instances a key gets up to N times the rate).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from services.gateway.model import GatewayError

SCOPES = ("generate", "batch", "read", "admin")


@dataclass(frozen=True)
class ApiKey:
    name: str
    key_sha256: str
    scopes: frozenset[str]


@dataclass(frozen=True)
class Principal:
    """Who is calling: a key's name and scopes (``anonymous`` with every scope when auth is off)."""

    name: str
    scopes: frozenset[str]

    def allows(self, scope: str) -> bool:
        return "admin" in self.scopes or scope in self.scopes


ANONYMOUS = Principal("anonymous", frozenset(SCOPES))


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> str:
    return "chora_" + secrets.token_urlsafe(32)


class KeysError(ValueError):
    """The keys file cannot be used; the message says why."""


def load_keys(path: Path) -> list[ApiKey]:
    try:
        text = path.read_text(encoding="utf-8")
        doc = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as e:
        raise KeysError(f"cannot read the gateway keys file {path}: {e}") from None
    return parse_keys(doc, str(path))


def parse_keys(doc: Any, where: str) -> list[ApiKey]:
    """``[{name, key_sha256, scopes}]`` (or ``{keys: [...]}``) from a keys file or setting."""
    if isinstance(doc, dict):
        doc = doc.get("keys")
    if not isinstance(doc, list):
        raise KeysError(f"{where}: expected a list of {{name, key_sha256, scopes}} (or {{keys: [...]}})")
    keys = []
    for i, entry in enumerate(doc):
        if not isinstance(entry, dict):
            raise KeysError(f"{where}: entry {i} is not a mapping")
        name, digest, scopes = entry.get("name"), str(entry.get("key_sha256", "")).lower(), entry.get("scopes")
        if not isinstance(name, str) or not name:
            raise KeysError(f"{where}: entry {i} has no name")
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise KeysError(f"{where}: key {name!r}: key_sha256 must be 64 hex digits (sha256 of the key)")
        if not isinstance(scopes, list) or not scopes or any(s not in SCOPES for s in scopes):
            raise KeysError(f"{where}: key {name!r}: scopes must be a non-empty list of {', '.join(SCOPES)}")
        keys.append(ApiKey(name, digest, frozenset(scopes)))
    return keys


def write_keys(path: Path, keys: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(keys, indent=2) + "\n")


@dataclass
class KeyRing:
    keys: list[ApiKey]
    enabled: bool = True

    def identify(self, presented: str | None) -> Principal:
        """The key's principal; 401 UNAUTHORIZED when no key or an unknown one is presented."""
        if not self.enabled:
            return ANONYMOUS
        if not presented:
            raise GatewayError(
                401,
                "UNAUTHORIZED",
                "an API key is required: Authorization: Bearer <key>",
                headers={"WWW-Authenticate": 'Bearer realm="chora"'},
            )
        digest = hash_key(presented)
        found = None
        for k in self.keys:  # every one compared, in constant time each: no early exit
            if hmac.compare_digest(k.key_sha256, digest):
                found = k
        if found is None:
            raise GatewayError(
                401,
                "UNAUTHORIZED",
                "the API key is not valid",
                headers={"WWW-Authenticate": 'Bearer realm="chora", error="invalid_token"'},
            )
        return Principal(found.name, found.scopes)


@dataclass
class _Bucket:
    tokens: float
    at: float


@dataclass
class RateLimiter:
    """A token bucket per principal: ``burst`` requests at once, refilled at ``rate`` per second."""

    rate: float
    burst: int
    _buckets: dict[str, _Bucket] = field(default_factory=dict)

    def take(self, who: str) -> None:
        """Spend one token; 429 RATE_LIMITED with Retry-After when none is left."""
        if self.rate <= 0:
            return
        now = time.monotonic()
        b = self._buckets.get(who)
        if b is None:
            if len(self._buckets) > 10_000:
                self._buckets.clear()  # a bound on memory: keys are few, and a reset only forgives
            b = self._buckets[who] = _Bucket(float(self.burst), now)
        b.tokens = min(float(self.burst), b.tokens + (now - b.at) * self.rate)
        b.at = now
        if b.tokens >= 1.0:
            b.tokens -= 1.0
            return
        wait = math.ceil((1.0 - b.tokens) / self.rate)
        raise GatewayError(
            429,
            "RATE_LIMITED",
            f"too many requests for key {who!r}; try again in {wait} s",
            headers={"Retry-After": str(max(1, wait))},
        )
