"""Wiring of the generator: ``build(settings)`` -> :class:`GeneratorApp`.

Nothing happens at import or build time. :meth:`GeneratorApp.start` loads the
``chora.generators`` entry points, starts the render pool (jinja2 renders run in
worker processes, see :mod:`.isolation`) and checks every config in the configs
directory once, logging (not failing on) the broken ones: they still answer
their requests with an error outcome, and a fixed file is picked up on the
next request. ``template_fill`` and ``demonstration`` stay on the event loop:
their cost is linear in the template and the context, which the message size bounds.

With a result cache store in the runtime's context (``ctx.cache``), the
handler gets a :class:`~services.generator.cache.ResultCache` over it; its
figures are in :attr:`GeneratorApp.metrics_registry`.

Settings read: ``configs_dir``, ``max_event_bytes``, ``cache_ttl_s``, ``cache_wait_s``,
``cache_claims``, ``cache_min_render_ms``, ``render_*``; the model API's
``CHORA_ANTHROPIC_*`` (:class:`services.generator.upstream.UpstreamSettings`).
On start, generators with an ``upstream`` count their rate limits in the bus's
shared KV bucket (every instance against one budget) and report their calls and
tokens on this process's ``/metrics``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from typing import Any

from prometheus_client import CollectorRegistry

from composition.capabilities import GENERATORS_KEY, GeneratorInfo, GeneratorsRecord, encode_generators
from composition.configs import ConfigError, ConfigStore
from contracts.handling import route
from services.generator.cache import CacheMetrics, ResultCache
from services.generator.compensation import BusUndo, StoppedRuns
from services.generator.generators import GeneratorRegistry
from services.generator.generators.base import readiness_of, requirements_of
from services.generator.generators.jinja import Jinja2Generator
from services.generator.handlers import EVENT_HANDLERS, MAX_OUTPUT_BYTES, SOURCE, Deps
from services.generator.upstream import Upstream, UpstreamMetrics, UpstreamSettings
from services.generator.isolation import IsolatedJinja2, RenderLimits, RenderPool
from services.settings import Settings

log = logging.getLogger("chora.generator")


class GeneratorApp:
    """The generator service app (see :class:`services.runtime.ServiceApp`).

    ``limits`` given (the default): jinja2 renders go through a :class:`RenderPool`;
    ``None``: they run on the event loop (benchmarks, trusted templates).
    """

    name = "generator"

    def __init__(
        self,
        store: ConfigStore,
        registry: GeneratorRegistry | None = None,
        *,
        source: str = SOURCE,
        max_output_bytes: int = MAX_OUTPUT_BYTES,
        max_event_bytes: int | None = None,
        cache_ttl_s: float = 3600,
        cache_wait_s: float = 10.0,
        cache_claims: str = "auto",
        cache_min_render_ms: float = 1.0,
        upstream_settings: UpstreamSettings | None = None,
        limits: RenderLimits | None = RenderLimits(),
    ):
        self.upstream_settings = upstream_settings
        self.deps = Deps(store, registry or GeneratorRegistry(), source, max_output_bytes, max_event_bytes)
        self.cache_ttl_s, self.cache_wait_s, self.cache_claims = cache_ttl_s, cache_wait_s, cache_claims
        self.cache_min_render_s = cache_min_render_ms / 1000
        self.metrics_registry = CollectorRegistry(auto_describe=True)
        self.upstream_metrics = UpstreamMetrics(self.metrics_registry)
        self.cache_metrics = CacheMetrics(self.metrics_registry)
        self.store, self.registry = self.deps.store, self.deps.registry
        self.pool = RenderPool(limits) if limits is not None else None
        if self.pool is not None:
            self.registry.register("jinja2", IsolatedJinja2(self.pool))
        self.config_errors: dict[str, str] = {}
        self._preparing: list[asyncio.Task] = []
        self.handle = route(EVENT_HANDLERS, self.deps, self.name)
        self.stopped = StoppedRuns(self.deps.cancelled)

    def consumers(self, topology: Any) -> list[tuple[Any, Any]]:
        """Its requests, and the compensations of stopped runs (docs/saga.md) on a durable of their own."""
        return [
            (topology.consumers["generator"], self.handle),
            (topology.consumers["generator-compensations"], self.handle),
        ]

    async def start(self, ctx: Any = None) -> None:
        self.registry.load()
        backend = getattr(ctx, "cache", None)
        if backend is not None:
            self.deps.cache = ResultCache(
                backend,
                self.cache_metrics,
                default_ttl_s=self.cache_ttl_s,
                wait_s=self.cache_wait_s,
                claims=self.cache_claims,
                min_render_s=self.cache_min_render_s,
            )
        self.deps.undo = BusUndo(backend, getattr(ctx, "content", None))
        self.stopped.start(getattr(ctx, "state", None))
        limits = getattr(ctx, "limits", None)
        self.config_errors = {}
        used: set[str] = set()  # the generators that a loaded config names
        for config_id in self.store.list():
            try:
                used.add(self.store.get(config_id).generator)
            except ConfigError as e:
                self.config_errors[config_id] = str(e)
                log.warning("content config %r is broken: %s", config_id, e)
        for name in self.registry.names():
            gen = self.registry.get_generator(name)
            prepare = getattr(gen, "prepare", None)
            readiness = getattr(gen, "readiness", None)
            if callable(prepare) and name in used and (not callable(readiness) or readiness().ready):
                # slow set-up (the Anthropic SDK's import: seconds of CPU) in the background,
                # requests are served meanwhile; a generator that no config names, or that lacks
                # its credentials, is set up on its first call instead
                self._preparing.append(asyncio.create_task(asyncio.to_thread(prepare)))
            if isinstance(getattr(gen, "upstream", None), Upstream):
                gen.upstream = Upstream(gen.upstream.name, self.upstream_settings, limits, self.upstream_metrics)
            if self.pool is not None and isinstance(getattr(gen, "prompts", None), Jinja2Generator):
                # a prompt is a template over the requester's context: it renders in the pool too
                gen.prompts = IsolatedJinja2(self.pool)
        if self.pool is not None:
            await asyncio.to_thread(self.pool.start)
        await self._report_generators(getattr(ctx, "state", None))

    def generators_record(self) -> GeneratorsRecord:
        """Every loaded generator with its requirements and pre-flight readiness."""
        infos = []
        for name in self.registry.names():
            gen = self.registry.get_generator(name)
            req, ready = requirements_of(gen), readiness_of(gen)
            infos.append(
                GeneratorInfo(
                    name=name,
                    ready=ready.ready,
                    missing=list(ready.missing),
                    credentials=list(req.credentials),
                    endpoints=list(req.endpoints),
                    deterministic=bool(getattr(gen, "deterministic", False)),
                )
            )
        instance = f"{socket.gethostname()}:{os.getpid()}"
        return GeneratorsRecord(
            instance=instance, updated_at=time.time(), generators=infos, broken=self.registry.errors
        )

    async def _report_generators(self, state: Any) -> None:
        """Write :meth:`generators_record` for capability discovery (the gateway reads it)."""
        if state is None:
            return
        try:
            await state.put(GENERATORS_KEY, encode_generators(self.generators_record()))
        except Exception as e:  # discovery is a courtesy: the generator serves requests without it
            log.warning("cannot record the generators' readiness: %s", e)

    async def drain(self) -> None:
        """Stopping: requests still waiting for a render worker are handed back (nak)."""
        if self.pool is not None:
            self.pool.drain()

    async def close(self) -> None:
        await self.stopped.close()
        results = await asyncio.gather(*self._preparing, return_exceptions=True)
        for r in results:
            if isinstance(r, Exception):
                log.warning("a generator's set-up failed: %s", r)
        if self.pool is not None:
            self.pool.detach()  # on the loop; the workers' exits are waited for in a thread
            await asyncio.to_thread(self.pool.close)

    def info(self) -> dict[str, Any]:
        return {
            "configs_dir": str(self.store.root),
            "configs": self.store.list(),
            "generators": self.registry.names(),
            "broken_configs": sorted(self.config_errors),
            "render_workers": self.pool.size if self.pool is not None else 0,
        }


def build(settings: Settings) -> GeneratorApp:
    limits = None
    if settings.render_isolation:
        limits = RenderLimits(
            workers=settings.render_workers,
            timeout_s=settings.render_timeout_s,
            memory_mb=settings.render_memory_mb,
        )
    return GeneratorApp(
        ConfigStore(settings.configs_dir),
        GeneratorRegistry(),
        source=SOURCE,
        max_event_bytes=settings.max_event_bytes,
        cache_ttl_s=settings.cache_ttl_s,
        cache_wait_s=settings.cache_wait_s,
        cache_claims=settings.cache_claims,
        cache_min_render_ms=settings.cache_min_render_ms,
        upstream_settings=UpstreamSettings(),
        limits=limits,
    )
