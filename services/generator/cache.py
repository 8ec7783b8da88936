"""The generator's result cache: the key, the policy, single flight, the figures.

The key of a result is a sha256 over the canonical JSON (sorted keys, no
whitespace) of ``[generator name, generator version, config hash, template
hash, context]``, the context being the config's defaults merged with the
request's. It is stored as ``<config id>.<hex>``, so that one config's
entries can be purged by key prefix. A changed config file or template file
changes its hash, so it can never be served a stale entry.

Policy (:meth:`ResultCache.ttl_for`): a config's ``cache:`` says a TTL,
``on`` (the default TTL) or ``off``. Unset, the cache is off for a generator
that is not deterministic, and for one that declares ``deterministic = True``
it is on (default TTL) once that config's renders are measured to cost at least
``min_render_s`` (``CHORA_CACHE_MIN_RENDER_MS``, default 1 ms; 0: always on):
a lookup is a KV round trip and a miss one more write, which a local template
render of tens of microseconds does not pay back (measured: bench.e2e with
hello-world requests, docs/performance.md). The cost is the render's own time,
in the render worker (``render_seconds(config)`` of the generator), else timed
around the render here; a config version not measured yet is rendered, not
looked up. A request with ``no_cache: true`` renders afresh and refreshes the
entry.

Only successful renders are stored: an error (a :class:`GenerationError`, a
retry, any exception) reaches every request that waited for it and is stored
nowhere. Identical requests in flight in one instance share one render
(single flight). Across instances, the first claims the key (a pending marker
written with KV ``create``, for at most ``wait_s`` and the entry's TTL); the
others watch for its entry, and render themselves when the claim ends without
one (the render failed, or the claim expired) or after ``wait_s``. Best
effort: it saves renders, correctness never depends on it.

A claim is one more KV write per miss. ``claims="auto"`` (the default) claims
only for generators that are not deterministic (an upstream call such as a
model, slow and paid for: a duplicate costs more than the write), not for the
local template renders, where instances may each render a key once (measured:
the claim costs more than the render; see bench/cache.py). ``always`` and
``never`` (``CHORA_CACHE_CLAIMS``) override.

The store is a :class:`CacheBackend` (:class:`bus.cache.ResultCacheStore` in
the service); trouble with it is logged and counted, and the request is
rendered as if there were no cache.

``cached: true`` on an outcome means the content was not rendered for this
request: it came from the cache or from an identical render in flight.

Series (the app's own registry):

    chora_generator_cache_requests_total{result}   hit, miss, bypass (no_cache requests)
    chora_generator_cache_errors_total{operation}  get, put, claim, release, wait
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from typing import Any, Awaitable, Callable, Protocol

import msgspec
from prometheus_client import CollectorRegistry, Counter

from composition.configs import LoadedConfig
from services.generator.costs import RenderCosts

log = logging.getLogger("chora.generator")

_canonical = msgspec.json.Encoder(order="sorted").encode


class CacheBackend(Protocol):
    """Where entries live (bytes by key, with a TTL): JetStream KV in the service."""

    async def get(self, key: str) -> bytes | None: ...

    async def put(self, key: str, value: bytes, ttl_s: float) -> None: ...

    async def claim(self, key: str, ttl_s: float) -> bool:
        """Mark ``key`` as being rendered here, for ``ttl_s`` at most: False when it already is."""

    async def release(self, key: str) -> None: ...

    async def wait(self, key: str, timeout: float) -> bytes | None:
        """The value once stored; None when the claim on ``key`` ends without one, or on timeout."""

    async def remove(self, key: str) -> None:
        """Remove the entry under ``key`` (nothing if there is none)."""


def canonical_json(value: Any) -> bytes:
    """JSON with sorted keys and no whitespace: equal values give equal bytes."""
    return _canonical(value)


def cache_key(
    config_id: str,
    generator: str,
    version: str,
    config_hash: str | None,
    template_hash: str | None,
    context: dict[str, Any],
) -> str:
    """``<config id>.<sha256 hex>`` of the canonical JSON of everything that decides the output."""
    digest = hashlib.sha256(canonical_json([generator, version, config_hash, template_hash, context]))
    return f"{config_id}.{digest.hexdigest()}"


def generator_version(generator: Any) -> str:
    return str(getattr(generator, "version", None) or "0")


class CacheMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.requests = Counter(
            "chora_generator_cache_requests",
            "Generation requests seen by the result cache, by result.",
            ["result"],
            registry=registry,
        )
        self.errors = Counter(
            "chora_generator_cache_errors",
            "Result cache operations that failed (the request was rendered).",
            ["operation"],
            registry=registry,
        )
        self.hit, self.miss, self.bypass = (self.requests.labels(r) for r in ("hit", "miss", "bypass"))
        for op in ("get", "put", "claim", "release", "wait"):
            self.errors.labels(op)


class ResultCache:
    """Results by key in a :class:`CacheBackend`, with single flight; see the module doc."""

    def __init__(
        self,
        backend: CacheBackend,
        metrics: CacheMetrics,
        *,
        default_ttl_s: float = 3600,
        wait_s: float = 10.0,
        claims: str = "auto",
        min_render_s: float = 0.001,
    ):
        self.backend = backend
        self.metrics = metrics
        self.default_ttl_s = default_ttl_s
        self.wait_s = wait_s
        self.claims = claims
        self.min_render_s = min_render_s
        self._inflight: dict[str, asyncio.Future[str]] = {}
        self._costs = RenderCosts()  # of generators that do not report their own

    def render_cost(self, config: LoadedConfig, generator: Any) -> float | None:
        """What a render of this config version costs (seconds, a moving average), None if unknown."""
        own = getattr(generator, "render_seconds", None)
        return own(config) if own is not None else self._costs.get(config)

    def _worth_it(self, config: LoadedConfig, generator: Any) -> bool:
        if self.min_render_s <= 0:
            return True
        cost = self.render_cost(config, generator)
        return cost is not None and cost >= self.min_render_s

    def ttl_for(self, config: LoadedConfig, generator: Any) -> float | None:
        """The TTL of this config's entries, or None when its results are not cached."""
        setting = config.spec.cache
        if setting == "off":
            return None
        if isinstance(setting, int):
            return float(setting)
        if setting == "on":
            return float(self.default_ttl_s)
        if getattr(generator, "deterministic", False) is True and self._worth_it(config, generator):
            return float(self.default_ttl_s)
        return None

    async def fetch(
        self,
        config: LoadedConfig,
        generator: Any,
        context: dict[str, Any],
        render: Callable[[], Awaitable[str]],
        *,
        bypass: bool = False,
        written: list[str] | None = None,
    ) -> tuple[str, bool]:
        """(content, cached): from the cache, from an identical render in flight, or ``render()``.
        When this call stores an entry, its key is appended to ``written`` (an effect a
        compensation may undo: :meth:`CacheBackend.remove`)."""
        ttl = self.ttl_for(config, generator)
        if ttl is None:
            if config.spec.cache is None and getattr(generator, "render_seconds", None) is None:
                t0 = time.perf_counter()
                content = await render()
                self._costs.observe(config, time.perf_counter() - t0)
                return content, False
            return await render(), False
        try:
            key = cache_key(
                config.id,
                config.spec.generator,
                generator_version(generator),
                config.config_hash,
                config.template_hash,
                context,
            )
        except (TypeError, ValueError):  # a default no JSON can say (a YAML oddity): not cacheable
            return await render(), False
        if bypass:
            self.metrics.bypass.inc()
            content = await render()
            await self._put(key, content, ttl)
            if written is not None:
                written.append(key)
            return content, False
        while True:
            shared = self._inflight.get(key)
            if shared is None:
                break
            try:
                content = await asyncio.shield(shared)
            except asyncio.CancelledError:
                if shared.cancelled() and not _cancelling():
                    continue  # the render we waited for was cancelled, not us: go again
                raise
            self.metrics.hit.inc()
            return content, True
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            content, cached = await self._lookup_or_render(key, ttl, render, self.claims_for(generator))
        except Exception as e:
            future.set_exception(e)
            future.exception()  # retrieved: no "never retrieved" warning when nobody waited
            raise
        except BaseException:
            future.cancel()
            raise
        finally:
            del self._inflight[key]
        future.set_result(content)
        (self.metrics.hit if cached else self.metrics.miss).inc()
        if not cached and written is not None:
            written.append(key)
        return content, cached

    def claims_for(self, generator: Any) -> bool:
        """Whether a miss claims its key across instances (see the module doc)."""
        if self.claims == "auto":
            return getattr(generator, "deterministic", False) is not True
        return self.claims == "always"

    async def _lookup_or_render(
        self, key: str, ttl: float, render: Callable[[], Awaitable[str]], claim: bool
    ) -> tuple[str, bool]:
        raw = await self._call("get", self.backend.get(key))
        if raw is not None:
            return raw.decode("utf-8"), True
        # Across instances: one claims the key and renders; the others wait for its entry. (An
        # entry stored between our get and our claim is rendered again: harmless, and rare.)
        # A claim lasts no longer than the entry would, and is released only when the render
        # fails: after a success, the entry is what the others wait for.
        claimed = None
        if claim:
            claimed = await self._call("claim", self.backend.claim(key, min(self.wait_s, ttl)))
        if claimed is False:
            raw = await self._call("wait", self.backend.wait(key, self.wait_s))
            if raw is not None:
                return raw.decode("utf-8"), True
        try:
            content = await render()
        except BaseException:
            if claimed:
                await self._call("release", self.backend.release(key))
            raise
        await self._put(key, content, ttl)
        return content, False

    async def _put(self, key: str, content: str, ttl: float) -> None:
        await self._call("put", self.backend.put(key, content.encode("utf-8"), ttl))

    async def _call(self, operation: str, work: Awaitable[Any]) -> Any:
        """``await work``; a failure is logged and counted, and gives None."""
        try:
            return await work
        except Exception as e:
            self.metrics.errors.labels(operation).inc()
            log.warning("result cache %s failed: %s: %s", operation, type(e).__name__, e)
            return None


def _cancelling() -> bool:
    task = asyncio.current_task()
    return bool(task is not None and task.cancelling())
