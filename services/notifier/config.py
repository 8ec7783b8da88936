"""The notifier's subscriptions: a YAML or JSON file, checked once at start.

```yaml
subscriptions:
  - name: release-hook                 # ^[a-z][a-z0-9-]*$, unique; durable consumer notify-<name>
    events: ["chora.batch_completed", "chora.content_*"]   # shell-style patterns over the catalogue
    filters: {status: [error]}         # optional, or a list (any of); see services.notifier.filters
    url: https://hooks.example.com/chora
    secret_env: RELEASE_HOOK_SECRET    # the NAME of the variable holding the secret(s): whsec_<base64>, space-separated when rotating
    timeout_s: 5
    max_attempts: 6
    max_in_flight: 64                  # unacked events (sending or waiting to retry) and HTTP connections
    backoff: {initial_s: 0.5, max_s: 60, multiplier: 2, jitter: 0.2}
    circuit: {failure_threshold: 5, reset_timeout_s: 30, half_open_max_calls: 1, max_deferrals: 120}
    start: new                         # new (default) | all | 2026-01-01T00:00:00Z: where a new consumer starts
```

The secret itself is never in the file: only the name of the environment
variable that holds it. :func:`load_secrets` reads those variables; the
secrets it returns are bytes kept by the sender and used only as HMAC keys
(they are never logged, published or put in an error message).

Every problem is a :class:`NotifierConfigError` whose message names the file
and, when it is about one subscription, that subscription.
"""

from __future__ import annotations

import fnmatch
import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from contracts.catalogue import CATALOGUE, NOTIFICATION_DELIVERED, NOTIFICATION_FAILED
from services.notifier.filters import Filter, check, matches
from services.notifier.signing import SecretError, parse_secrets

NAME_PATTERN = r"^[a-z][a-z0-9-]*$"
NAME_MAX_LENGTH = 64
MAX_FILE_BYTES = 1 << 20
#: Only matched by a pattern that names them exactly (never by a wildcard): see Subscription.event_types.
NOTIFICATION_TYPES = frozenset({NOTIFICATION_DELIVERED, NOTIFICATION_FAILED})

_YamlLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class NotifierConfigError(ValueError):
    """The notifier's config cannot be used. The message says where and why."""


class Backoff(BaseModel):
    """Delay before retry n (1-based): ``min(max_s, initial_s * multiplier**(n-1))``,
    then multiplied by a random factor in ``[1 - jitter, 1 + jitter]`` and capped at ``max_s``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    initial_s: float = Field(0.5, ge=0)
    max_s: float = Field(60.0, ge=0)
    multiplier: float = Field(2.0, ge=1)
    jitter: float = Field(0.2, ge=0, le=1)

    @model_validator(mode="after")
    def _order(self) -> "Backoff":
        if self.max_s < self.initial_s:
            raise ValueError("backoff.max_s must be >= backoff.initial_s")
        return self


class CircuitConfig(BaseModel):
    """The per-subscription circuit breaker (see services.circuit).

    ``max_deferrals``: deliveries of one event that may be put off because the
    circuit is open, on top of ``max_attempts`` real attempts (they do not count
    as attempts; the consumer's max_deliver is ``max_attempts + max_deferrals``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    failure_threshold: int = Field(5, ge=1)
    reset_timeout_s: float = Field(30.0, ge=0)
    half_open_max_calls: int = Field(1, ge=1)
    max_deferrals: int = Field(120, ge=0)


class Subscription(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, StringConstraints(pattern=NAME_PATTERN, max_length=NAME_MAX_LENGTH)]
    events: Annotated[list[Annotated[str, StringConstraints(min_length=1)]], Field(min_length=1)]
    filters: list[Filter] = []  # any of them; see services.notifier.filters
    url: str
    secret_env: Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
    timeout_s: float = Field(5.0, gt=0, le=300)
    max_attempts: int = Field(6, ge=1, le=1000)
    # Unacknowledged events (in flight or waiting for a retry) and HTTP connections, at most.
    max_in_flight: int = Field(64, ge=1, le=1024)
    backoff: Backoff = Backoff()
    circuit: CircuitConfig = CircuitConfig()
    # Where the subscription's consumer starts when it is created: "new" (events from now on),
    # "all" (the stream's history, up to its max age) or a time with its zone (events since
    # then). Not set: "new", and an existing consumer goes on from where it is. An existing
    # consumer cannot move: a `start` other than the one it was created with stops the start.
    start: Literal["new", "all"] | AwareDatetime | None = None

    @field_validator("url")
    @classmethod
    def _check_url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("url must be an absolute http:// or https:// URL")
        return v

    @field_validator("events")
    @classmethod
    def _check_events(cls, v: list[str]) -> list[str]:
        for pattern in v:
            if not _types_for(pattern):
                raise ValueError(
                    f"event pattern {pattern!r} matches no event type of the catalogue ({', '.join(sorted(CATALOGUE))})"
                )
        return v

    @field_validator("filters", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, Mapping) else v

    @field_validator("filters")
    @classmethod
    def _check_filters(cls, v: list[Filter], info: ValidationInfo) -> list[Filter]:
        patterns = info.data.get("events")
        if patterns:  # absent when the events were invalid (reported already)
            check(v, tuple(t for t in CATALOGUE if any(t in _types_for(p) for p in patterns)))
        return v

    @property
    def safe_url(self) -> str:
        """The URL without any user:password part, for logs."""
        parts = urlsplit(self.url)
        if parts.username is None and parts.password is None:
            return self.url
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
        return parts._replace(netloc=f"***@{host}").geturl()

    @property
    def durable(self) -> str:
        return f"notify-{self.name}"

    @property
    def event_types(self) -> tuple[str, ...]:
        """Catalogue types matched by the patterns, in catalogue order."""
        wanted: set[str] = set()
        for pattern in self.events:
            wanted.update(_types_for(pattern))
        return tuple(t for t in CATALOGUE if t in wanted)

    def matches(self, event_type: str, data: Any) -> bool:
        """Whether an event of ``event_type`` with ``data`` is to be delivered."""
        return event_type in self.event_types and matches(self.filters, data)


def _types_for(pattern: str) -> list[str]:
    """Catalogue types matched by ``pattern``. A wildcard never matches the notifier's own
    notification_* events (that would notify about notifications); naming them does."""
    if pattern in CATALOGUE:
        return [pattern]
    return [t for t in CATALOGUE if t not in NOTIFICATION_TYPES and fnmatch.fnmatchcase(t, pattern)]


class NotifierConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    subscriptions: list[Subscription] = []

    @model_validator(mode="after")
    def _unique(self) -> "NotifierConfig":
        seen: set[str] = set()
        for s in self.subscriptions:
            if s.name in seen:
                raise ValueError(f"subscription name {s.name!r} is used twice")
            seen.add(s.name)
        return self


# --------------------------------------------------------------------------- loading


def _describe(e: ValidationError, doc: Any) -> str:
    """Validation errors, each prefixed with the subscription it is about."""
    subs = doc.get("subscriptions") if isinstance(doc, dict) else None
    lines = []
    for err in e.errors():
        loc = list(err.get("loc", ()))
        where = ".".join(str(p) for p in loc) or "(top level)"
        if len(loc) >= 2 and loc[0] == "subscriptions" and isinstance(loc[1], int):
            name = None
            if isinstance(subs, list) and loc[1] < len(subs) and isinstance(subs[loc[1]], dict):
                name = subs[loc[1]].get("name")
            rest = ".".join(str(p) for p in loc[2:]) or "(entry)"
            label = f"subscription {name!r}" if isinstance(name, str) else f"subscription #{loc[1] + 1}"
            where = f"{label}: {rest}"
        msg = err.get("msg", "invalid")
        lines.append(f"  {where}: {msg}")
    return "\n".join(lines)


def parse_config(text: str, source: str = "<config>") -> NotifierConfig:
    try:
        doc = json.loads(text) if source.endswith(".json") else yaml.load(text, Loader=_YamlLoader)
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        raise NotifierConfigError(f"notifier config {source}: not valid YAML/JSON: {e}") from None
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise NotifierConfigError(f"notifier config {source}: expected a mapping with a 'subscriptions' list")
    try:
        return NotifierConfig.model_validate(doc)
    except ValidationError as e:
        raise NotifierConfigError(f"notifier config {source} is invalid:\n{_describe(e, doc)}") from None


def load_config(path: Path | str | None) -> NotifierConfig:
    """The config in ``path``; no path means no subscriptions."""
    if path is None:
        return NotifierConfig()
    path = Path(path)
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise NotifierConfigError(f"notifier config {path}: larger than {MAX_FILE_BYTES} bytes")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise NotifierConfigError(f"notifier config {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise NotifierConfigError(f"notifier config {path}: cannot read it: {e}") from None
    return parse_config(text, str(path))


def load_secrets(config: NotifierConfig, environ: Mapping[str, str] | None = None) -> dict[str, tuple[bytes, ...]]:
    """subscription name -> its HMAC keys, from the environment variables named by ``secret_env``:
    one secret, or several separated by whitespace during a rotation; ``whsec_<base64>`` or
    raw (see :func:`services.notifier.signing.parse_secrets`).

    A missing or empty variable, or an unusable secret, is an error naming the
    subscription and the variable (never a value).
    """
    environ = os.environ if environ is None else environ
    secrets: dict[str, tuple[bytes, ...]] = {}
    missing = []
    for s in config.subscriptions:
        value = environ.get(s.secret_env)
        if not value:
            missing.append(
                f"  subscription {s.name!r}: environment variable {s.secret_env} (secret_env) is "
                + ("empty" if value == "" else "not set")
            )
            continue
        try:
            secrets[s.name] = parse_secrets(value)
        except SecretError as e:
            missing.append(f"  subscription {s.name!r}: environment variable {s.secret_env} (secret_env): {e}")
    if missing:
        raise NotifierConfigError("notifier: missing webhook secrets:\n" + "\n".join(missing))
    return secrets
