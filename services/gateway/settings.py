"""The gateway's settings: ``CHORA_GATEWAY_*`` (see docs/gateway.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CHORA_GATEWAY_", extra="ignore")

    # Where it listens: loopback by default (the embedded `chora up`); 0 picks a free port.
    host: str = "127.0.0.1"
    port: int = 8480
    # API keys: a YAML or JSON list of {name, key_sha256, scopes} (scopes: generate, batch, read, admin).
    keys_file: Path | None = None
    # ... or the same list inline (JSON), e.g. from a secret in the environment (compose).
    keys: list[dict[str, Any]] = []
    # auth false: no key asked for (a trusted network only); `chora up` keeps it on.
    auth: bool = True
    # How long POST /v1/generate and /v1/artifacts wait for the outcome by default, and at most.
    default_timeout_s: float = 30.0
    max_timeout_s: float = 300.0
    # Request bodies larger than this are refused with 413 (counted while reading).
    max_body_bytes: int = 1 << 20
    # The JSON of one request's context, at most.
    max_context_bytes: int = 256 * 1024
    max_batch_items: int = 10_000
    # Concurrent GET /v1/events streams (server-sent events), per gateway process.
    max_event_streams: int = 64
    # Without a recorded start, GET /v1/events replays the trace from this long ago.
    events_replay_s: float = 3600.0
    # Per API key: a token bucket of `rate_burst` requests, refilled at `rate_per_s` (in-process).
    rate_per_s: float = 50.0
    rate_burst: int = 100
    # Item outcomes per page of GET /v1/batches/{id}/results, by default and at most.
    page_size: int = 100
    max_page_size: int = 1000
    # Content larger than this is not put inline in a response (its content_ref stays).
    max_inline_content_bytes: int = 4 << 20
    # Late outcomes this process still records for requests that got 202 (the oldest are dropped;
    # GET /v1/requests/{id} then finds them in the stream).
    max_late: int = 100_000
    # The outcome follower stops when no request has waited this long (it starts again with the
    # next one): the outcomes of requests that came over NATS then cost the gateway nothing.
    follow_idle_s: float = Field(default=60.0, gt=0)
    # How many events GET /v1/requests/{id} reads at most when it looks for an outcome in the stream.
    max_scan_events: int = 200_000
    source: str = Field(default="chora://gateway", description="the CloudEvents source of the requests it publishes")
