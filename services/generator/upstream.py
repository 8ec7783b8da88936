"""Calling a model API without hurting anyone: bounded concurrency, a circuit breaker
per upstream, and a rate limit shared by every generator instance.

- **Concurrency.** At most ``max_concurrency`` calls in flight per process
  (a semaphore); the calls are async I/O, so the event loop keeps serving other
  requests. More than ``max_waiting`` requests already waiting: the request is
  retried later (UPSTREAM_BUSY, a redelivery after ``busy_retry_s``), so waiting
  requests do not take every slot of the consumer.
- **Circuit breaker** (:mod:`services.circuit`), one per upstream: connection
  errors, timeouts, 5xx and 529 count as failures; while it is open no call is
  made and the request is retried after the time left.
- **Rate limit**, requests and tokens per minute per model: one counter per
  model per minute window in a JetStream KV bucket, changed by compare-and-set
  (:class:`Counters`: the bus's :class:`bus.state.StateStore` fits, the generator
  never touches NATS), so every instance counts against the same budget. A call
  reserves one request and its estimated tokens (prompt characters / 4 +
  ``max_tokens``) before it is made and corrects the tokens to the reported usage
  afterwards. Over the limit: retried at the start of the next window. A request
  that alone needs more tokens than a window holds may use an empty window.
  Counters that cannot be used (bucket missing, NATS down) are
  RATE_LIMIT_UNAVAILABLE, retried: no call is made without counting it.

Settings (environment, ``CHORA_ANTHROPIC_*``): see :class:`UpstreamSettings`.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from dataclasses import dataclass
from typing import Callable, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge
from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.circuit import CLOSED, HALF_OPEN, OPEN, CircuitBreaker, CircuitOpen, Permit, Policy
from services.generator.generators.base import RetriableGenerationError
from services.metrics import Bounded, label

WINDOW_S = 60.0
CAS_ATTEMPTS = 20


class ModelLimit(BaseModel):
    requests_per_minute: int = Field(50, ge=1)
    tokens_per_minute: int = Field(40_000, ge=1)


class UpstreamSettings(BaseSettings):
    """``CHORA_ANTHROPIC_*``. Per-model limits override the defaults:
    ``CHORA_ANTHROPIC_MODEL_LIMITS='{"claude-sonnet-4-5": {"requests_per_minute": 1000, "tokens_per_minute": 400000}}'``."""

    model_config = SettingsConfigDict(env_prefix="CHORA_ANTHROPIC_", extra="ignore")

    max_concurrency: int = Field(8, ge=1)
    max_waiting: int = Field(64, ge=0)
    busy_retry_s: float = Field(2.0, gt=0)
    requests_per_minute: int = Field(50, ge=1)
    tokens_per_minute: int = Field(40_000, ge=1)
    model_limits: dict[str, ModelLimit] = {}
    failure_threshold: int = Field(5, ge=1)
    reset_timeout_s: float = Field(30.0, ge=0)
    # The longest retry-after honoured; a longer one is cut to this.
    max_retry_delay_s: float = Field(300.0, gt=0)

    def limit(self, model: str) -> ModelLimit:
        return self.model_limits.get(model) or ModelLimit(
            requests_per_minute=self.requests_per_minute, tokens_per_minute=self.tokens_per_minute
        )


# --------------------------------------------------------------------------- the shared counters


class Counters(Protocol):
    """A key-value store with compare-and-set (values bytes, revisions ints)."""

    async def get(self, key: str) -> tuple[bytes, int] | None: ...

    async def create(self, key: str, value: bytes) -> int | None: ...

    async def update(self, key: str, value: bytes, revision: int) -> int | None: ...


class MemoryCounters:
    """:class:`Counters` in this process only (a generator without a bus: tools, unit tests)."""

    def __init__(self) -> None:
        self._data: dict[str, tuple[bytes, int]] = {}
        self._rev = 0

    async def get(self, key: str) -> tuple[bytes, int] | None:
        return self._data.get(key)

    async def create(self, key: str, value: bytes) -> int | None:
        if key in self._data:
            return None
        self._rev += 1
        self._data[key] = (value, self._rev)
        return self._rev

    async def update(self, key: str, value: bytes, revision: int) -> int | None:
        cur = self._data.get(key)
        if cur is None or cur[1] != revision:
            return None
        self._rev += 1
        self._data[key] = (value, self._rev)
        return self._rev


class RateLimited(Exception):
    def __init__(self, model: str, what: str, retry_in: float):
        super().__init__(f"rate limit of model {model!r}: {what}; next window in {retry_in:.1f}s")
        self.retry_in = retry_in


@dataclass(frozen=True)
class Reservation:
    key: str
    tokens: int


_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


class RateLimiter:
    """Requests and tokens per model per minute window, counted in :class:`Counters`."""

    def __init__(self, counters: Counters, settings: UpstreamSettings, clock: Callable[[], float] = time.time):
        self.counters, self.settings, self.clock = counters, settings, clock

    def _window(self, model: str) -> tuple[str, float]:
        now = self.clock()
        window = int(now // WINDOW_S)
        return f"ratelimit.{_KEY_UNSAFE.sub('_', model)}.{window}", (window + 1) * WINDOW_S - now

    async def _change(self, key: str, change: Callable[[dict[str, int]], dict[str, int]]) -> None:
        try:
            for _ in range(CAS_ATTEMPTS):
                cur = await self.counters.get(key)
                if cur is None:
                    if await self.counters.create(key, json.dumps(change({"r": 0, "t": 0})).encode()) is not None:
                        return
                    continue
                value, rev = cur
                if await self.counters.update(key, json.dumps(change(json.loads(value))).encode(), rev) is not None:
                    return
        except (RateLimited, RetriableGenerationError):
            raise
        except Exception as e:  # the KV bucket is not there, NATS does not answer, ...: try again later
            raise RetriableGenerationError(
                "RATE_LIMIT_UNAVAILABLE", f"the shared rate-limit counters cannot be used: {type(e).__name__}: {e}"
            ) from None
        raise RetriableGenerationError("UPSTREAM_RATE_LIMITED", f"the rate limit counter {key} is contended", 1.0)

    async def reserve(self, model: str, tokens: int) -> Reservation:
        """One request and ``tokens`` of the current window, or :class:`RateLimited`."""
        limit = self.settings.limit(model)
        key, retry_in = self._window(model)

        def take(c: dict[str, int]) -> dict[str, int]:
            if c["r"] >= limit.requests_per_minute:
                raise RateLimited(model, f"{limit.requests_per_minute} requests per minute", retry_in)
            if c["t"] and c["t"] + tokens > limit.tokens_per_minute:
                raise RateLimited(model, f"{limit.tokens_per_minute} tokens per minute", retry_in)
            return {"r": c["r"] + 1, "t": c["t"] + tokens}

        await self._change(key, take)
        return Reservation(key, tokens)

    async def settle(self, reservation: Reservation, used_tokens: int) -> None:
        """Correct the reserved tokens to what the call used."""
        delta = used_tokens - reservation.tokens
        if delta:
            await self._change(reservation.key, lambda c: {"r": c["r"], "t": max(0, c["t"] + delta)})


# --------------------------------------------------------------------------- metrics


class UpstreamMetrics:
    """The generator's model-API figures (tokens by model are what the calls cost)."""

    def __init__(self, registry: CollectorRegistry):
        self.tokens = Counter(
            "chora_generator_tokens",
            "Tokens used by model API calls, by model and kind (input, output).",
            ["model", "kind"],
            registry=registry,
        )
        self.calls = Counter(
            "chora_generator_upstream_calls",
            "Model API calls by upstream, model and outcome (ok or an error code).",
            ["upstream", "model", "outcome"],
            registry=registry,
        )
        self.circuit = Gauge(
            "chora_generator_circuit_state",
            "1 for the state the upstream's circuit is in, 0 for the others.",
            ["upstream", "state"],
            registry=registry,
        )
        self._model = Bounded()

    def used(self, model: str, input_tokens: int, output_tokens: int) -> None:
        m = self._model(model)
        self.tokens.labels(m, "input").inc(input_tokens)
        self.tokens.labels(m, "output").inc(output_tokens)

    def call(self, upstream: str, model: str, outcome: str) -> None:
        self.calls.labels(label(upstream), self._model(model), label(outcome)).inc()

    def watch(self, upstream: str, breaker: CircuitBreaker) -> None:
        def state_is(state: str) -> Callable[[], float]:
            return lambda: 1.0 if breaker.peek() == state else 0.0

        for state in (CLOSED, OPEN, HALF_OPEN):
            self.circuit.labels(upstream, state).set_function(state_is(state))


# --------------------------------------------------------------------------- one upstream


class Upstream:
    """Everything a call to one upstream goes through. Use::

    async with upstream.slot():
        permit = upstream.permit()
        reservation = await upstream.reserve(model, tokens)
        ... call, then upstream.breaker.success(permit) / failure(permit) / release(permit)
    """

    def __init__(
        self,
        name: str,
        settings: UpstreamSettings | None = None,
        counters: Counters | None = None,
        metrics: UpstreamMetrics | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.name = name
        self.settings = settings or UpstreamSettings()
        s = self.settings
        self.breaker = CircuitBreaker(Policy(s.failure_threshold, s.reset_timeout_s, 1))
        self.limiter = RateLimiter(counters or MemoryCounters(), s, clock)
        self.metrics = metrics or UpstreamMetrics(CollectorRegistry())
        self.metrics.watch(name, self.breaker)
        self._slots = asyncio.Semaphore(s.max_concurrency)
        self._waiting = 0

    def use_counters(self, counters: Counters) -> None:
        """Count against ``counters`` (the bus's KV bucket, shared by every instance)."""
        self.limiter.counters = counters

    def slot(self) -> "_Slot":
        """One of the ``max_concurrency`` call slots; RetriableGenerationError when too many already wait."""
        return _Slot(self)

    def permit(self) -> Permit:
        try:
            return self.breaker.acquire()
        except CircuitOpen as e:
            raise RetriableGenerationError(
                "UPSTREAM_UNAVAILABLE", f"{self.name}: the circuit is {e.state} after repeated failures", e.retry_in
            ) from None

    async def reserve(self, model: str, tokens: int) -> Reservation:
        try:
            return await self.limiter.reserve(model, tokens)
        except RateLimited as e:
            raise RetriableGenerationError("UPSTREAM_RATE_LIMITED", f"{self.name}: {e}", e.retry_in) from None


class _Slot:
    def __init__(self, upstream: Upstream):
        self.upstream = upstream

    async def __aenter__(self) -> None:
        u = self.upstream
        if u._slots.locked() and u._waiting >= u.settings.max_waiting:
            raise RetriableGenerationError(
                "UPSTREAM_BUSY",
                f"{u.name}: {u._waiting} requests already wait for a call slot",
                u.settings.busy_retry_s,
            )
        u._waiting += 1
        try:
            await u._slots.acquire()
        finally:
            u._waiting -= 1

    async def __aexit__(self, *exc: object) -> None:
        self.upstream._slots.release()
