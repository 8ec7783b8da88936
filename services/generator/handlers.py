"""The generator's one handler: a generation request in, exactly one outcome out.

Registered in :data:`EVENT_HANDLERS` and called with the generator's one
dependencies object, :class:`Deps` (see :mod:`contracts.handling`).

Every expected failure (a bad id, a missing or invalid config, a template
error, a missing variable, an unknown generator, a context that is not an
object, an output over the limit) is an outcome with ``status="error"`` and a
stable code: an error is an event, not a crash and not a retry. Only a message
that is not a generation request at all is rejected (dead letter).

This is the hot path. For a cached config it costs one ``stat`` (two with a
``template_file``), a merge of the default context, the render, a sha256 and
the event; no file reads, no pydantic validation, no logging on success.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec

from contracts.catalogue import COMPENSATION_REQUESTED, CONTENT_GENERATED, GENERATION_REQUESTED
from contracts.envelope import CloudEvent, new_event
from contracts.events import ContentGenerated, ErrorInfo, GenerationRequested, TokenUsage
from contracts.handling import Delivery, EventHandlers, Reject, Retry, expect
from composition.configs import ConfigStore, GenerationError
from composition.runs import run_of
from services.generator.cache import ResultCache
from services.generator.compensation import on_compensation_requested
from services.generator.generators import GeneratorRegistry
from services.generator.generators.base import Generated, RetriableGenerationError, ensure_ready

log = logging.getLogger("chora.generator")

MAX_OUTPUT_BYTES = 1 << 20  # rendered content larger than this (UTF-8) -> OUTPUT_TOO_LARGE
MAX_MESSAGE_CHARS = 2000  # error messages are cut to this length

_perf = time.perf_counter
_sha256 = hashlib.sha256
_encode_data = msgspec.json.Encoder().encode

SOURCE = "chora://generator"


@dataclass
class Deps:
    """What the generator's handler needs."""

    store: ConfigStore
    registry: GeneratorRegistry
    source: str = SOURCE
    # rendered content larger than this (UTF-8) -> OUTPUT_TOO_LARGE
    max_output_bytes: int = MAX_OUTPUT_BYTES
    # the largest event body the bus will publish (None: no check here)
    max_event_bytes: int | None = None
    # the result cache (None: every request is rendered)
    cache: ResultCache | None = None
    # the runs that were cancelled or timed out (``<kind>.<key token>``, composition/runs.py), kept
    # current by a watch on their markers: their requests are answered RUN_CANCELLED, unrendered
    cancelled: set[str] = field(default_factory=set)
    # undoes a stopped run's effects (services/generator/compensation.py; None: nothing to undo with)
    undo: Any = None


def _error(
    event: CloudEvent,
    config_id: str,
    generator_type: str | None,
    t0: float,
    code: str,
    message: str,
    source: str,
) -> list[CloudEvent]:
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[: MAX_MESSAGE_CHARS - 1] + "…"
    data = ContentGenerated(
        request_id=event.id,
        content_config_id=config_id,
        status="error",
        generator_type=generator_type,
        duration_ms=(_perf() - t0) * 1000.0,
        error=ErrorInfo(code=code, message=message),
        origin=getattr(event.data, "origin", None),
    )
    return [new_event(CONTENT_GENERATED, data, source=source, cause=event)]


async def on_generation_requested(event: CloudEvent, delivery: Delivery, deps: Deps) -> list[CloudEvent]:
    """Render the requested config; return one ``chora.content_generated`` caused by ``event``.

    ``deps.max_event_bytes``, when given, is the largest event body the bus will
    publish: an outcome that would not fit is reported as OUTPUT_TOO_LARGE
    instead of failing at publish time. ``content_length`` counts characters
    (as the telemetry sink does); ``content_hash`` is over the UTF-8 bytes.
    """
    t0 = _perf()
    store, registry, source = deps.store, deps.registry, deps.source
    max_output_bytes, max_event_bytes = deps.max_output_bytes, deps.max_event_bytes
    data = expect(event, GENERATION_REQUESTED, GenerationRequested, "generator")
    origin = data.origin
    if origin is not None and deps.cancelled and run_of(origin.kind, origin.id) in deps.cancelled:
        return _error(
            event,
            data.content_config_id,
            None,
            t0,
            "RUN_CANCELLED",
            f"the {origin.kind} run {origin.id} was cancelled or timed out: not generated",
            source,
        )

    config_id = data.content_config_id
    if not isinstance(config_id, str):
        config_id = repr(config_id)[:140]
    generator_type: str | None = None
    try:
        config = store.get(data.content_config_id)
        generator_type = config.spec.generator
        generator = registry.get_generator(generator_type)
        ensure_ready(generator, generator_type)  # else CREDENTIALS_MISSING, at once
        context = data.context
        if not isinstance(context, dict):
            raise GenerationError("INVALID_CONTEXT", f"context must be a JSON object, not {type(context).__name__}")
        defaults = config.defaults
        if defaults:
            context = {**defaults, **context}
        meta: Generated | None = None  # what a model-calling generator adds (model, usage)

        async def render() -> str:
            nonlocal meta
            content = generator.render(config, context)
            if type(content) is not str:
                if inspect.isawaitable(content):
                    content = await content
                if isinstance(content, Generated):
                    meta, content = content, content.text
                if not isinstance(content, str):
                    raise GenerationError(
                        "GENERATOR_FAILED", f"generator {generator_type!r} returned {type(content).__name__}, not text"
                    )
            try:
                size = len(content.encode("utf-8"))
            except UnicodeEncodeError as e:
                raise GenerationError(
                    "INVALID_OUTPUT", f"output is not valid Unicode text at character {e.start}"
                ) from None
            if size > max_output_bytes:
                raise GenerationError(
                    "OUTPUT_TOO_LARGE", f"output has {size} bytes, over the limit of {max_output_bytes}"
                )
            return content

        written: list[str] = []  # the cache entry this request stores: its effect (docs/saga.md)
        if deps.cache is None:
            content, cached = await render(), False
        else:  # the result cache (services/generator/cache.py): errors are never stored
            content, cached = await deps.cache.fetch(
                config, generator, context, render, bypass=data.no_cache, written=written
            )
        raw = content.encode("utf-8")
        out = ContentGenerated(
            request_id=event.id,
            content_config_id=config_id,
            status="success",
            generator_type=generator_type,
            content=content,
            content_hash="sha256:" + _sha256(raw).hexdigest(),
            content_length=len(content),
            origin=data.origin,
            cached=cached,
            cache_key=written[0] if written and origin is not None else None,
        )
        if meta is not None:
            out.model, out.stop_reason = meta.model, meta.stop_reason
            if meta.input_tokens is not None and meta.output_tokens is not None:
                out.usage = TokenUsage(input_tokens=meta.input_tokens, output_tokens=meta.output_tokens)
        # JSON escaping can grow text up to 6x; only a large output can overflow the event.
        if max_event_bytes is not None and len(raw) * 8 > max_event_bytes:
            size = len(_encode_data(out)) + 24  # room for the duration filled in below
            if size > max_event_bytes:
                raise GenerationError(
                    "OUTPUT_TOO_LARGE",
                    f"the outcome event would have {size} bytes, over the event limit of {max_event_bytes}",
                )
    except RetriableGenerationError as e:  # transient (an upstream): a redelivery, or on the last one an outcome
        if not delivery.last:
            raise Retry(f"{e.code}: {e.message}", delay=e.delay) from None
        return _error(event, config_id, generator_type, t0, e.code, e.message, source)
    except GenerationError as e:
        return _error(event, config_id, generator_type, t0, e.code, e.message, source)
    except (Retry, Reject):
        raise
    except Exception as e:  # a bug in a (possibly third-party) generator: report it, do not loop on it
        log.exception("generator %r failed on config %r", generator_type, config_id)
        return _error(event, config_id, generator_type, t0, "GENERATOR_FAILED", f"{type(e).__name__}: {e}", source)
    out.duration_ms = (_perf() - t0) * 1000.0
    return [new_event(CONTENT_GENERATED, out, source=source, cause=event)]


EVENT_HANDLERS: EventHandlers[Deps] = {
    GENERATION_REQUESTED: on_generation_requested,
    COMPENSATION_REQUESTED: on_compensation_requested,
}
