"""The bus's own settings, read from the environment (and nothing else).

NATS connection variables keep the names people already use with NATS
(``NATS_URL``, ``NATS_CREDS``, ...); the topology's are ``CHORA_*`` like every
other setting of chora's own. The services' settings
(:class:`services.settings.Settings`) include these.

The TLS files are read from the nats CLI's names ``NATS_CA``, ``NATS_CERT`` and
``NATS_KEY`` as well as from this project's ``NATS_TLS_CA``, ``NATS_TLS_CERT`` and
``NATS_TLS_KEY`` (which keep working); when both are set, the ``NATS_TLS_*`` one wins.
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from contracts.catalogue import events_stream, stream_base

_PREFIX_RE = re.compile(r"^[a-z][a-z0-9_-]*$")


class NatsSettings(BaseSettings):
    """How to reach NATS. ``url`` unset means: use the embedded server."""

    # populate_by_name: NatsSettings(tls_ca=...) by field name as well as from the aliases' variables
    model_config = SettingsConfigDict(env_prefix="NATS_", extra="ignore", populate_by_name=True)

    url: str | None = None
    creds: Path | None = Field(default=None, description="a .creds file (JWT + nkey)")
    user: str | None = None
    password: SecretStr | None = None  # SecretStr: never shown in a repr, a log or an error
    token: SecretStr | None = None
    tls_ca: Path | None = Field(default=None, validation_alias=AliasChoices("NATS_TLS_CA", "NATS_CA"))
    tls_cert: Path | None = Field(default=None, validation_alias=AliasChoices("NATS_TLS_CERT", "NATS_CERT"))
    tls_key: Path | None = Field(default=None, validation_alias=AliasChoices("NATS_TLS_KEY", "NATS_KEY"))
    # Reply subjects of this connection; with least-privilege users, e.g. _INBOX.client.
    inbox_prefix: str = "_INBOX"
    connect_timeout: float = 5.0
    max_reconnect_attempts: int = -1  # forever: a service waits for its server


class BusSettings(BaseSettings):
    """Streams, consumers and limits: what :class:`bus.topology.Topology` and the consumer loop read."""

    model_config = SettingsConfigDict(env_prefix="CHORA_", extra="ignore")

    # Subject prefix and stream name prefix: tests give each run its own.
    prefix: str = "chora"
    # Stream and bucket replicas: 3 on a 3-node cluster.
    replicas: int = 1
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
        return events_stream(self.prefix)

    @property
    def dlq_stream_name(self) -> str:
        return stream_base(self.prefix) + "_DLQ"
