"""The gateway's core, transport-neutral: what HTTP (:mod:`.app`) and MCP both call.

:class:`Operations` publishes requests as CloudEvents (the same as the CLI does) and
waits for their outcomes through one :class:`~.outcomes.OutcomeWaiter` per process;
past the caller's timeout it answers :class:`Pending` and records the outcome when it
comes (KV, the gateway bucket), where :meth:`Operations.request_status` finds it. Batch
progress and item outcomes are read from the assembler's state records
(:mod:`composition.batch_records`); configs from the configs directory; generators'
readiness from the record the generator service writes (:mod:`composition.capabilities`).

Every refusal is one exception, :class:`GatewayError`, with an HTTP status and a stable
code (the events' codes where there is one: CONFIG_NOT_FOUND, ...).
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec
from nats.aio.client import Client

from bus.content import ContentMissing, ContentStore
from bus.publisher import Publisher
from bus.state import StateStore
from bus.topology import GATEWAY_TTL_S, Topology
from composition.artifacts import ArtifactStore
from composition.batch_records import (
    ResultsExpired,
    batch_key,
    batch_progress,
    decode_batch,
    key_id,
    read_batch_page,
)
from composition.runs import RunKind, read_run
from composition.callbacks import CallbackRefused, check_callback_url
from composition.capabilities import GENERATORS_KEY, decode_generators
from composition.configs import GenerationError, ConfigStore, valid_config_id
from contracts.catalogue import (
    ARTIFACT_ASSEMBLED,
    ARTIFACT_REQUESTED,
    BATCH_REQUESTED,
    CATALOGUE,
    CONTENT_GENERATED,
    GENERATION_REQUESTED,
    STANDALONE,
    subject_for,
)
from contracts.cancels import cancel_request
from contracts.envelope import CloudEvent, new_event
from contracts.events import ArtifactRequested, BatchRequested, GenerationRequested
from contracts.tracing import child_traceparent, new_trace_id
from services.gateway.model import API_VERSION, Accepted, GatewayError, Outcome, Pending, RequestRecord, Trace
from services.gateway.outcomes import OutcomeWaiter, scan
from services.gateway.settings import GatewaySettings
from services.settings import Settings

__all__ = ["Accepted", "GatewayError", "Operations", "Outcome", "Pending", "Trace"]

OUTCOME_TYPE = {"generate": CONTENT_GENERATED, "assemble": ARTIFACT_ASSEMBLED}
FEATURES = [
    "generate",
    "artifacts",
    "batches",
    "requests",
    "events-sse",
    "idempotency-key",
    "callbacks",
    "api-keys",
    "rate-limit",
    "cancel",
]


def _standalone_subject(event_type: str, prefix: str) -> str:
    spec = CATALOGUE[event_type]
    return spec.subject_of(prefix, STANDALONE) if spec.by_origin else spec.subject(prefix)


def request_key(request_id: str) -> str:
    return f"req.{key_id(request_id)}"


def trace_key(trace_id: str) -> str:
    return f"trace.{key_id(trace_id)}"


@dataclass
class _Stores:
    state: StateStore  # the assembler's records, and the generators' readiness
    records: StateStore  # the gateway's own: request records, Idempotency-Key answers
    content: ContentStore


@dataclass
class Operations:
    """The gateway's operations over one NATS connection. ``await start()`` before use."""

    nc: Client
    settings: Settings
    gateway: GatewaySettings = field(default_factory=GatewaySettings)

    def __post_init__(self) -> None:
        s = self.settings
        js = self.nc.jetstream()
        self.topology = Topology.from_settings(s)
        content = ContentStore(js, self.topology.content_bucket, s.content_threshold_bytes)
        self.stores = _Stores(
            StateStore(js, self.topology.state_bucket), StateStore(js, self.topology.gateway_bucket), content
        )
        self.publisher = Publisher(js, s.prefix, max_bytes=s.max_event_bytes, content=content)
        self.configs = ConfigStore(s.configs_dir)
        self.artifacts = ArtifactStore(s.configs_dir)
        self.waiter = OutcomeWaiter(
            self.nc,
            s.stream_name,
            # a waiting request is a top-level one: its outcome's subject ends with "standalone"
            [_standalone_subject(t, s.prefix) for t in OUTCOME_TYPE.values()],
            self._record_late,
            max_late=self.gateway.max_late,
            idle_s=self.gateway.follow_idle_s,
            watch_interval_s=min(5.0, self.gateway.follow_idle_s),
            max_event_bytes=s.max_event_bytes,
        )
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        await self.waiter.start()

    async def close(self) -> None:
        await self.waiter.stop()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # ------------------------------------------------------------------ requests
    async def generate(
        self,
        content_config_id: str,
        context: dict[str, Any] | None = None,
        *,
        timeout_s: float | None = None,
        trace: Trace | None = None,
        callback_url: str | None = None,
        no_cache: bool = False,
    ) -> Outcome | Pending:
        """Render ``content_config_id``: its ``content_generated`` data, or :class:`Pending`."""
        self._check_config(content_config_id)
        doc = {
            "content_config_id": content_config_id,
            "context": self._context(context),
            "no_cache": no_cache,
            "callback_url": self._callback(callback_url),
        }
        data = self._convert(doc, GenerationRequested)
        return await self._request_and_wait("generate", self._event(GENERATION_REQUESTED, data, trace), timeout_s)

    async def assemble(
        self,
        artifact_id: str,
        context: dict[str, Any] | None = None,
        *,
        timeout_s: float | None = None,
        trace: Trace | None = None,
        callback_url: str | None = None,
    ) -> Outcome | Pending:
        """Assemble ``artifact_id``: its ``artifact_assembled`` data, or :class:`Pending`."""
        self._check_artifact(artifact_id)
        doc = {
            "artifact_id": artifact_id,
            "context": self._context(context),
            "callback_url": self._callback(callback_url),
        }
        data = self._convert(doc, ArtifactRequested)
        return await self._request_and_wait("assemble", self._event(ARTIFACT_REQUESTED, data, trace), timeout_s)

    async def batch(
        self,
        items: list[dict[str, Any]],
        context: dict[str, Any] | None = None,
        continue_on_error: bool = True,
        *,
        callback_url: str | None = None,
        trace: Trace | None = None,
    ) -> Accepted:
        """Publish a batch; its id (the event id) and where its progress is."""
        if not isinstance(items, list) or not items:
            raise GatewayError(422, "INVALID_REQUEST", "a batch needs at least one item")
        if len(items) > self.gateway.max_batch_items:
            raise GatewayError(
                413, "TOO_MANY_ITEMS", f"{len(items)} items; a batch takes at most {self.gateway.max_batch_items}"
            )
        for config_id in {i.get("content_config_id") for i in items if isinstance(i, dict)}:
            self._check_config(config_id)
        for item in items:
            if isinstance(item, dict) and "context" in item:
                self._context(item["context"])
        doc = {
            "items": items,
            "context": self._context(context),
            "continue_on_error": continue_on_error,
            "callback_url": self._callback(callback_url),
        }
        data = self._convert(doc, BatchRequested)
        ev = self._event(BATCH_REQUESTED, data, trace)
        ack = await self._publish(ev)
        self._note_trace(ev, ack.seq)
        record = RequestRecord(
            request_id=ev.id, kind="batch", trace_id=ev.traceid, seq=ack.seq, created_at=time.time(), total=len(items)
        )
        await self.stores.records.put(request_key(ev.id), msgspec.json.encode(record))
        return Accepted(ev.id, ev.traceid, len(items))

    async def cancel(
        self, kind: RunKind, run_id: str, reason: str | None = None, *, trace: Trace | None = None
    ) -> dict[str, Any]:
        """Ask the assembler to cancel run ``run_id`` (a ``chora.cancel.requested``): 404 when
        neither the assembler nor this gateway knows the run, 409 when it has completed."""
        what = "batch" if kind == "batch" else "artifact run"
        run = await read_run(self.stores.state, kind, run_id)
        status = run["status"] if run is not None else None
        if run is None:  # not accepted by the assembler yet: a request this gateway published?
            record = await self._record(run_id)
            if record is None or record.kind != ("batch" if kind == "batch" else "assemble"):
                code = "BATCH_NOT_FOUND" if kind == "batch" else "ARTIFACT_RUN_NOT_FOUND"
                raise GatewayError(404, code, f"no {what} {run_id} (unknown, or expired)")
            status = (record.outcome or {}).get("status") if record.state == "done" else None
        if status is not None:
            raise GatewayError(
                409, "RUN_COMPLETED", f"{what} {run_id} has already completed ({status})", extra={"run_status": status}
            )
        trace = trace or Trace(new_trace_id())
        try:
            ev = cancel_request(kind, run_id, reason, source=self.gateway.source, trace_id=trace.trace_id)
        except ValueError as e:
            raise GatewayError(422, "INVALID_REQUEST", str(e)) from None
        if trace.traceparent:
            ev.traceparent = child_traceparent(trace.trace_id, trace.traceparent)
        await self._publish(ev)
        location = f"/{API_VERSION}/batches/{run_id}" if kind == "batch" else f"/{API_VERSION}/requests/{run_id}"
        return {"kind": kind, "id": run_id, "state": "cancelling", "cancel_id": ev.id, "location": location}

    # ------------------------------------------------------------------ reading
    async def request_status(self, request_id: str) -> dict[str, Any]:
        """A request this gateway published: ``{request_id, kind, state, trace_id, outcome?}``."""
        record = await self._record(request_id)
        if record is None:
            raise GatewayError(404, "REQUEST_NOT_FOUND", f"no request {request_id} (unknown, or expired)")
        if record.kind == "batch":
            return {**self._record_view(record), "batch": f"/{API_VERSION}/batches/{request_id}"}
        if record.state != "done" and not self.waiter.is_late(request_id):
            # not this process's to record (it restarted, or another instance published it)
            found = await self._scan(OUTCOME_TYPE[record.kind], record.seq, lambda e: _request_id(e) == request_id)
            if found:
                outcome = await self._outcome(record.kind, found[0])
                record = await self._record_done(request_id, record.kind, outcome, record.seq)
        return self._record_view(record)

    async def batch_status(self, batch_id: str) -> dict[str, Any]:
        """A batch's progress from the assembler's record (``state``: queued, running, closing,
        finished; ``status`` once closed: success or error)."""
        got = await self.stores.state.get(batch_key(batch_id))
        if got is None:
            record = await self._record(batch_id)
            if record is None or record.kind != "batch":
                raise GatewayError(404, "BATCH_NOT_FOUND", f"no batch {batch_id} (unknown, or expired)")
            return {
                "batch_id": batch_id,
                "state": "queued",
                "total": record.total,
                "done": 0,
                "trace_id": record.trace_id,
            }
        r = decode_batch(got[0])
        out = batch_progress(batch_id, r)
        out["state"] = "finished" if r.finished else ("closing" if r.closed else "running")
        if r.closed:
            out["status"] = "success" if r.failed == 0 else "error"
        record = await self._record(batch_id)
        if record is not None:
            out["trace_id"] = record.trace_id
        return out

    async def batch_results(
        self, batch_id: str, *, cursor: int = 0, limit: int | None = None, content: bool = True
    ) -> dict[str, Any]:
        """Item outcomes ``cursor`` .. ``cursor + limit`` (``next_cursor`` None at the end); with
        ``content``, each successful item's content (read from the stream: only for batches
        this gateway published)."""
        limit = self.gateway.page_size if limit is None else limit
        if limit < 1 or limit > self.gateway.max_page_size:
            raise GatewayError(422, "BAD_PAGE", f"limit must be 1..{self.gateway.max_page_size}")
        if cursor < 0:
            raise GatewayError(422, "BAD_PAGE", "cursor must be 0 or more")
        got = await self.stores.state.get(batch_key(batch_id))
        if got is None:
            await self.batch_status(batch_id)  # 404, or queued
            return {"batch_id": batch_id, "total": None, "cursor": cursor, "next_cursor": cursor, "items": []}
        try:
            page = await read_batch_page(self.stores.state, batch_id, decode_batch(got[0]), cursor, limit)
        except ResultsExpired as e:
            raise GatewayError(404, "BATCH_RESULTS_EXPIRED", str(e)) from None
        if content:
            await self._attach_content(batch_id, page["items"])
        return page

    def list_configs(self) -> list[dict[str, Any]]:
        """Every content and artifact config: id, kind, description, declared context (its defaults)."""

        def content(c: Any) -> dict[str, Any]:
            return {"generator": c.generator, "output_format": c.output_format, "context": dict(c.defaults)}

        def artifact(a: Any) -> dict[str, Any]:
            return {"parts": [p.id for p in a.spec.parts], "context": dict(a.spec.context)}

        out: list[dict[str, Any]] = []
        for kind, store, describe in (("content", self.configs, content), ("artifact", self.artifacts, artifact)):
            for config_id in store.list():
                entry: dict[str, Any] = {"id": config_id, "kind": kind}
                try:
                    loaded = store.get(config_id)
                except GenerationError as e:
                    entry["error"] = {"code": e.code, "message": e.message}
                else:
                    entry.update(description=loaded.spec.description, **describe(loaded))
                out.append(entry)
        return out

    # ------------------------------------------------------------------ capabilities
    def server_info(self) -> dict[str, Any]:
        try:
            version = importlib.metadata.version("chora-compose")
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
        return {"name": "chora-compose", "version": version, "api_version": API_VERSION, "features": FEATURES}

    async def generators(self) -> dict[str, Any]:
        """The generators the generator service reported, with their pre-flight readiness."""
        got = await self.stores.state.get(GENERATORS_KEY)
        if got is None:
            return {"reported": False, "generators": [], "note": "no generator has reported yet (is one running?)"}
        rec = decode_generators(got[0])
        return {"reported": True, **msgspec.to_builtins(rec)}

    def limits(self) -> dict[str, Any]:
        g = self.gateway
        return {
            "max_body_bytes": g.max_body_bytes,
            "max_context_bytes": g.max_context_bytes,
            "max_batch_items": g.max_batch_items,
            "default_timeout_s": g.default_timeout_s,
            "max_timeout_s": g.max_timeout_s,
            "max_event_streams": g.max_event_streams,
            "rate_per_s": g.rate_per_s,
            "rate_burst": g.rate_burst,
            "page_size": g.page_size,
            "max_page_size": g.max_page_size,
            "idempotency_ttl_s": GATEWAY_TTL_S,
            "max_event_bytes": self.settings.max_event_bytes,
        }

    def event_types(self) -> list[dict[str, Any]]:
        return [
            {
                "type": s.type,
                "subject": s.subject(self.settings.prefix),
                **({"callback_subject": s.callback_subject(self.settings.prefix)} if s.by_callback else {}),
                "kind": s.kind,
                "description": s.description,
                "schema": f"/{API_VERSION}/schemas/{s.type}",
            }
            for s in CATALOGUE.values()
        ]

    async def capabilities(self) -> dict[str, Any]:
        return {
            "server": self.server_info(),
            "generators": await self.generators(),
            "configs": self.list_configs(),
            "limits": self.limits(),
            "events": self.event_types(),
        }

    # ------------------------------------------------------------------ helpers
    def _check_config(self, config_id: Any) -> None:
        self._check_id(self.configs, config_id, "INVALID_CONFIG_ID", "content_config_id")

    def _check_artifact(self, artifact_id: Any) -> None:
        self._check_id(self.artifacts, artifact_id, "INVALID_ARTIFACT_ID", "artifact_id")

    @staticmethod
    def _check_id(store: Any, config_id: Any, invalid: str, name: str) -> None:
        """A well-formed id of a config that loads (404 when it does not exist; 422 when it
        is broken). Without a configs directory here, the outcome will tell."""
        if not valid_config_id(config_id):
            raise GatewayError(422, invalid, f"{name} must match ^[a-z][a-z0-9-]*$ (at most 128 characters)")
        if not store.root.is_dir():
            return
        try:
            store.get(config_id)
        except GenerationError as e:
            raise GatewayError(404 if e.code.endswith("NOT_FOUND") else 422, e.code, e.message) from None

    def _context(self, context: Any) -> dict[str, Any]:
        if context is None:
            return {}
        if not isinstance(context, dict):
            raise GatewayError(422, "INVALID_CONTEXT", "context must be a JSON object")
        try:
            size = len(json.dumps(context, separators=(",", ":"), allow_nan=False))
        except (TypeError, ValueError) as e:
            raise GatewayError(422, "INVALID_CONTEXT", f"context is not plain JSON: {e}") from None
        if size > self.gateway.max_context_bytes:
            raise GatewayError(
                413, "CONTEXT_TOO_LARGE", f"context has {size} bytes of JSON; at most {self.gateway.max_context_bytes}"
            )
        return context

    def _callback(self, url: Any) -> str | None:
        if url is None:
            return None
        if not isinstance(url, str):
            raise GatewayError(422, "CALLBACK_REFUSED", "callback_url must be a string")
        try:
            return check_callback_url(url, self.settings.callback_allow)
        except CallbackRefused as e:
            raise GatewayError(422, "CALLBACK_REFUSED", str(e)) from None

    @staticmethod
    def _convert(doc: dict[str, Any], struct: type[msgspec.Struct]) -> Any:
        try:
            return msgspec.convert({k: v for k, v in doc.items() if v is not None}, struct)
        except (msgspec.ValidationError, ValueError) as e:
            raise GatewayError(422, "INVALID_REQUEST", str(e)) from None

    def _event(self, event_type: str, data: msgspec.Struct, trace: Trace | None) -> CloudEvent:
        trace = trace or Trace(new_trace_id())
        ev = new_event(event_type, data, source=self.gateway.source, trace_id=trace.trace_id)
        if trace.traceparent:
            ev.traceparent = child_traceparent(trace.trace_id, trace.traceparent)
        return ev

    async def _publish(self, ev: CloudEvent):
        try:
            return await self.publisher.publish(ev)
        except Exception as e:
            raise GatewayError(503, "BUS_UNAVAILABLE", f"the request could not be stored: {e}") from None

    async def _request_and_wait(self, kind: str, ev: CloudEvent, timeout_s: float | None) -> Outcome | Pending:
        timeout = self._timeout(timeout_s)
        try:
            fut = await self.waiter.expect(ev.id)
        except Exception as e:
            raise GatewayError(503, "BUS_UNAVAILABLE", f"the request's outcome cannot be followed: {e}") from None
        try:
            ack = await self._publish(ev)
        except BaseException:
            self.waiter.forget(ev.id)
            raise
        self._note_trace(ev, ack.seq)
        try:
            got = await asyncio.wait_for(asyncio.shield(fut), timeout) if timeout > 0 else None
        except asyncio.TimeoutError:
            got = None
        except BaseException:
            self.waiter.forget(ev.id)
            raise
        if got is None:
            got = self.waiter.give_up(ev.id)
        if got is None:
            record = RequestRecord(
                request_id=ev.id, kind=kind, trace_id=ev.traceid, seq=ack.seq, created_at=time.time()
            )
            await self.stores.records.create(request_key(ev.id), msgspec.json.encode(record))
            return Pending(ev.id, kind, ev.traceid)
        outcome = await self._outcome(kind, got)
        self._background(self._record_done(ev.id, kind, outcome, ack.seq))
        return outcome

    def _timeout(self, timeout_s: float | None) -> float:
        if timeout_s is None:
            return self.gateway.default_timeout_s
        if not (0 <= timeout_s <= self.gateway.max_timeout_s):
            raise GatewayError(
                422, "BAD_TIMEOUT", f"the timeout must be 0..{self.gateway.max_timeout_s:g} seconds, not {timeout_s:g}"
            )
        return timeout_s

    async def _outcome(self, kind: str, ev: CloudEvent) -> Outcome:
        data = msgspec.to_builtins(ev.data)
        ref = data.get("content_ref")
        if ref and data.get("content") is None:
            try:
                raw = await self.stores.content.get(ref, max_bytes=self.gateway.max_inline_content_bytes)
                data["content"] = raw.decode("utf-8")
            except ContentMissing:
                pass  # too large to inline, or expired: the reference stays
        return Outcome(_request_id(ev) or "", kind, ev.type, ev.traceid, data)

    async def _record_late(self, ev: CloudEvent) -> None:
        kind = "generate" if ev.type == CONTENT_GENERATED else "assemble"
        record = await self._record(_request_id(ev) or "")
        await self._record_done(_request_id(ev) or "", kind, await self._outcome(kind, ev), record.seq if record else 0)

    async def _record_done(self, request_id: str, kind: str, outcome: Outcome, seq: int) -> RequestRecord:
        record = RequestRecord(
            request_id=request_id,
            kind=kind,
            trace_id=outcome.trace_id,
            seq=seq,
            created_at=time.time(),
            state="done",
            outcome=outcome.data,
        )
        raw = msgspec.json.encode(record)
        if len(raw) > self.settings.max_event_bytes:  # a huge inlined content: keep the reference
            record.outcome = {
                k: v for k, v in outcome.data.items() if k != "content" or not outcome.data.get("content_ref")
            }
            raw = msgspec.json.encode(record)
        await self.stores.records.put(request_key(request_id), raw)
        return record

    async def _record(self, request_id: str) -> RequestRecord | None:
        got = await self.stores.records.get(request_key(request_id))
        if got is None:
            return None
        try:
            return msgspec.json.decode(got[0], type=RequestRecord)
        except msgspec.DecodeError:
            return None

    @staticmethod
    def _record_view(r: RequestRecord) -> dict[str, Any]:
        out: dict[str, Any] = {"request_id": r.request_id, "kind": r.kind, "state": r.state, "trace_id": r.trace_id}
        if r.outcome is not None:
            out["outcome"] = r.outcome
        return out

    async def _scan(self, event_type: str, seq: int, match, want: int = 1) -> list[CloudEvent]:
        return await scan(
            self.nc,
            self.settings.stream_name,
            subject_for(event_type, self.settings.prefix),
            seq + 1,
            match,
            want=want,
            limit=self.gateway.max_scan_events,
            max_event_bytes=self.settings.max_event_bytes,
        )

    async def _attach_content(self, batch_id: str, items: list[dict[str, Any]]) -> None:
        wanted = {str(i["index"]): i for i in items if i.get("status") == "success"}
        record = await self._record(batch_id)
        if not wanted or record is None:
            return

        def match(ev: CloudEvent) -> bool:
            o = getattr(ev.data, "origin", None)
            return o is not None and o.kind == "batch" and o.id == batch_id and o.key in wanted

        for ev in await self._scan(CONTENT_GENERATED, record.seq, match, want=len(wanted)):
            item = wanted.get(ev.data.origin.key)
            if item is not None and "content" not in item:
                item["content"] = (await self._outcome("generate", ev)).data.get("content")

    def _note_trace(self, ev: CloudEvent, seq: int) -> None:
        """Remember where a trace starts (the first request of it this gateway published), so
        that an event stream of it replays from there: one KV create, off the response path."""
        if ev.traceid:
            self._background(self.stores.records.create(trace_key(ev.traceid), str(seq).encode()))

    async def trace_start(self, trace_id: str) -> int | None:
        """The stream sequence of the first request of ``trace_id`` this gateway published, if any."""
        got = await self.stores.records.get(trace_key(trace_id))
        try:
            return int(got[0]) if got is not None else None
        except ValueError:
            return None

    def _background(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _request_id(ev: CloudEvent) -> str | None:
    rid = getattr(ev.data, "request_id", None)
    return rid if isinstance(rid, str) else None
