"""Settings for every chora process, read from the environment (and nothing else).

NATS connection variables keep the names people already use with NATS
(``NATS_URL``, ``NATS_CREDS``, ...); everything of chora's own is ``CHORA_*``.
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

_PREFIX_RE = re.compile(r"^[a-z][a-z0-9_-]*$")


class NatsSettings(BaseSettings):
    """How to reach NATS. ``url`` unset means: use the embedded server."""

    model_config = SettingsConfigDict(env_prefix="NATS_", extra="ignore")

    url: str | None = None
    creds: Path | None = Field(default=None, description="a .creds file (JWT + nkey)")
    user: str | None = None
    password: SecretStr | None = None  # SecretStr: never shown in a repr, a log or an error
    token: SecretStr | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # Reply subjects of this connection; with least-privilege users, e.g. _INBOX.client.
    inbox_prefix: str = "_INBOX"
    connect_timeout: float = 5.0
    max_reconnect_attempts: int = -1  # forever: a service waits for its server


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CHORA_", extra="ignore")

    # Where the embedded server, telemetry and other local state live.
    home: Path = Field(default=Path("var"))
    # Subject prefix and stream name prefix: tests give each run its own.
    prefix: str = "chora"
    configs_dir: Path = Field(default=Path("examples/configs"))
    telemetry_path: Path | None = None  # default: <home>/telemetry/events.jsonl
    # fsync every JSONL batch (survives a machine crash, not only a process kill); off by default.
    telemetry_fsync: bool = False
    # Event ids the sink remembers to keep one line per id across redeliveries (~106 B each).
    telemetry_max_ids: int = 1_000_000
    # Keys whose values the JSONL never shows (any depth of an event's data, case-insensitive);
    # CHORA_TELEMETRY_REDACT_KEYS='["password","api_key","my_key"]'.
    telemetry_redact_keys: list[str] = [
        "password", "passwd", "secret", "token", "api_key", "apikey", "authorization", "access_token", "private_key",
    ]
    # Rotate events.jsonl when a batch would take it past this many bytes (0: never), and at UTC midnight.
    telemetry_rotate_bytes: int = 64 << 20
    telemetry_rotate_daily: bool = True
    # Rotated (gzipped) files kept next to events.jsonl; the oldest beyond this are deleted.
    telemetry_retention_files: int = 30
    # How often the telemetry sink reads JetStream figures (consumer lag, stream sizes).
    monitor_interval_s: float = 5.0
    # nats-server monitoring URLs (comma-separated, one per node, e.g. http://nats-1:8222): the
    # telemetry sink reads each one's /varz for the NATS server figures. `chora up` sets it.
    nats_monitor_url: str | None = None
    # Every service process serves its own /metrics here; 0 picks a free port, -1 serves none.
    # `chora up` gives telemetry this port and the other services the four after it.
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9464
    trace_id: str | None = None
    # Services create/update their own consumers on start. Off where an operator provisions
    # with `chora nats provision` and services run with least-privilege users.
    provision: bool = True
    # Stream and bucket replicas: 3 on a 3-node cluster.
    replicas: int = 1
    # The embedded nats-server of `chora up` (unused when NATS_URL is set); 0 = a free port.
    nats_port: int = 4222
    nats_http_port: int = 8222
    # Stream limits and delivery policy.
    stream_max_age_s: float = 7 * 24 * 3600
    stream_max_bytes: int = 1 << 30
    duplicate_window_s: float = 120.0
    # Short, because the consumer loop sends +WPI for work that takes longer: what a crashed
    # process held is redelivered after this long.
    ack_wait_s: float = 10.0
    max_deliver: int = 5
    max_concurrency: int = 256
    pull_batch: int = 256
    # The notifier's webhook subscriptions (YAML or JSON); none: no webhooks.
    notifier_config: Path | None = None
    # Content above this many UTF-8 bytes travels by reference in the Object Store.
    content_threshold_bytes: int = 256 * 1024
    # Largest accepted event body.
    max_event_bytes: int = 1 << 20
    nats: NatsSettings = Field(default_factory=NatsSettings, validation_alias=AliasChoices("nats"))

    @field_validator("prefix")
    @classmethod
    def _check_prefix(cls, v: str) -> str:
        if not _PREFIX_RE.match(v):
            raise ValueError("prefix must match ^[a-z][a-z0-9_-]*$ (it becomes a subject token)")
        return v

    @property
    def stream_name(self) -> str:
        return re.sub(r"[^A-Za-z0-9_]", "_", self.prefix).upper() + "_EVENTS"

    @property
    def dlq_stream_name(self) -> str:
        return re.sub(r"[^A-Za-z0-9_]", "_", self.prefix).upper() + "_DLQ"

    @property
    def stack_file(self) -> Path:
        """Written by `chora up`: where the running stack is (NATS URL, metrics URL, ...)."""
        return self.home / "run" / "stack.json"

    @property
    def jsonl_path(self) -> Path:
        return self.telemetry_path or self.home / "telemetry" / "events.jsonl"
