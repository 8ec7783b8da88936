"""The settings the services share, read from the environment (and nothing else).

Everything of chora's own is ``CHORA_*``. The bus's settings (NATS connection,
streams, delivery policy) are :mod:`bus.settings`; a service process reads both
as one :class:`services.settings.Settings`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class CompositionSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CHORA_", extra="ignore")

    # Where the embedded server, telemetry and other local state live.
    home: Path = Field(default=Path("var"))
    configs_dir: Path = Field(default=Path("examples/configs"))
    telemetry_path: Path | None = None  # default: <home>/telemetry/events.jsonl
    # fsync every JSONL batch (survives a machine crash, not only a process kill); off by default.
    telemetry_fsync: bool = False
    # Keys whose values the JSONL never shows (any depth of an event's data, case-insensitive);
    # CHORA_TELEMETRY_REDACT_KEYS='["password","api_key","my_key"]'.
    telemetry_redact_keys: list[str] = [
        "password",
        "passwd",
        "secret",
        "token",
        "api_key",
        "apikey",
        "authorization",
        "access_token",
        "private_key",
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
    # The embedded nats-server of `chora up` (unused when NATS_URL is set); 0 = a free port.
    nats_port: int = 4222
    nats_http_port: int = 8222
    # The generator's result cache: the TTL of an entry whose config does not set one
    # (``cache:`` in the config), and how long a request waits for an identical render
    # another generator instance has under way before it renders itself.
    cache_ttl_s: int = 3600
    cache_wait_s: float = 10.0
    # Which misses claim their key across instances (one KV write each): "auto" (generators
    # that are not deterministic, e.g. model calls), "always" or "never".
    cache_claims: Literal["auto", "always", "never"] = "auto"
    # A config that does not set ``cache:`` and whose generator is deterministic (a local template)
    # is cached once its renders are measured to cost at least this long: a cheaper render costs
    # less than the lookup (services/generator/cache.py). 0: cached from the first request.
    cache_min_render_ms: float = Field(default=1.0, ge=0)
    # A batch's item outcomes stay readable (`chora batch results`, the gateway) this long after
    # the batch finished, then expire (per-message TTL on their KV records); at most the stream's
    # max age (NATS_STREAM_MAX_AGE_S / CHORA_STREAM_MAX_AGE_S), which bounds every record anyway.
    batch_results_ttl_s: float = Field(default=7 * 24 * 3600, ge=1)
    # Per-request callbacks (``callback_url`` on a request): the hosts or URL prefixes they may
    # go to (see composition/callbacks.py); empty: callbacks are refused. The notifier signs
    # them with the secret in the variable named by callback_secret_env.
    callback_allow: list[str] = []
    callback_secret_env: str = "CHORA_CALLBACK_SECRET"
    # A batch request without deadline_s must be complete this many seconds after the assembler
    # accepts it, else it ends as timed_out (docs/saga.md). None: no default deadline. Batches
    # have no config of their own (their items do), so the default is the operator's.
    batch_deadline_s: float | None = Field(default=None, gt=0, le=7 * 24 * 3600)
    # The notifier's webhook subscriptions (YAML or JSON); none: no webhooks.
    notifier_config: Path | None = None
    # jinja2 renders run in this many worker processes (0: one per core, at least 2), each
    # bounded by the OS: a wall-clock deadline (the worker is killed and replaced), an address
    # space of its size at start plus render_memory_mb, and a CPU limit. See
    # services/generator/isolation.py. render_isolation=false renders on the event loop with
    # no time or memory bound: for benchmarks and trusted templates only.
    render_isolation: bool = True
    render_workers: int = 0
    render_timeout_s: float = 1.0
    render_memory_mb: int = 512

    @property
    def stack_file(self) -> Path:
        """Written by `chora up`: where the running stack is (NATS URL, metrics URL, ...)."""
        return self.home / "run" / "stack.json"

    @property
    def jsonl_path(self) -> Path:
        return self.telemetry_path or self.home / "telemetry" / "events.jsonl"
