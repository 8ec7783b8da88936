"""The HTTP API v1 (FastAPI): routes over :class:`~.operations.Operations`.

See docs/gateway.md. FastAPI because the OpenAPI document comes from the request models
(checked in as contracts/openapi/gateway.json and fuzzed in the tests); uvicorn serves it.
"""

from __future__ import annotations

import re
from pathlib import Path as FsPath
from typing import Annotated, Any, Awaitable, Callable, Literal

from fastapi import Depends, FastAPI, Header, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from contracts.catalogue import CATALOGUE
from services.gateway import sse
from services.gateway.idempotency import fingerprint, idempotent
from services.gateway.mcp.http import Caller, McpHttp
from services.gateway.middleware import GatewayMiddleware
from composition.runs import RunKind
from services.gateway.model import API_VERSION, GatewayError, Outcome, Pending
from services.gateway.operations import Operations
from services.gateway.problems import HTTP_CODES, from_error, problem, trace_of
from services.gateway.security import KeyRing, Principal, RateLimiter
from services.gateway.settings import GatewaySettings

SCHEMA_DIR = FsPath(__file__).resolve().parents[2] / "contracts" / "schemas"
_PREFER_WAIT = re.compile(r"(?:^|[,;\s])wait\s*=\s*\"?(\d+(?:\.\d+)?)\"?", re.I)
_UPSTREAM = ("UPSTREAM_", "CREDENTIALS_MISSING", "RATE_LIMIT_UNAVAILABLE")

Context = Annotated[dict[str, Any], Field(description="template variables, over the config's defaults")]
CallbackUrl = Annotated[
    str | None,
    Field(max_length=2048, description="POST the outcome here (signed); only to hosts on the allow-list"),
]


class Problem(BaseModel):
    """RFC 9457 problem details, with the events' stable code."""

    type: str
    title: str
    status: int
    detail: str
    code: str = Field(description="stable UPPER_SNAKE code, the events' where there is one (CONFIG_NOT_FOUND, ...)")
    trace_id: str | None = None


_PROBLEM = {"model": Problem, "content": {"application/problem+json": {}}}
PROBLEMS: dict[int | str, dict[str, Any]] = {
    "4XX": {**_PROBLEM, "description": "a problem with the request (401, 403, 404, 409, 413, 422, 429, ...)"},
    422: {**_PROBLEM, "description": "invalid request (INVALID_REQUEST, CALLBACK_REFUSED, ...) or failed outcome"},
    "5XX": {
        **_PROBLEM,
        "description": "the bus is unavailable (BUS_UNAVAILABLE), an upstream failed, or too many streams",
    },
}
ACCEPTED: dict[int | str, dict[str, Any]] = {
    202: {"description": "no outcome within the timeout: poll the Location (/v1/requests/{id})"}
}


class GenerateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    content_config_id: str = Field(max_length=128, description="content config id, ^[a-z][a-z0-9-]*$")
    context: Context = {}
    callback_url: CallbackUrl = None
    no_cache: bool = False


class ArtifactBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    artifact_id: str = Field(max_length=128, description="artifact config id, ^[a-z][a-z0-9-]*$")
    context: Context = {}
    callback_url: CallbackUrl = None


class BatchItemBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    content_config_id: str = Field(max_length=128)
    context: Context = {}


class BatchBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    items: list[BatchItemBody] = Field(min_length=1, max_length=100_000)
    context: Context = {}
    continue_on_error: bool = True
    callback_url: CallbackUrl = None


Id = Annotated[str, Path(min_length=1, max_length=256)]
ReasonQ = Annotated[str | None, Query(max_length=500, description="why; carried on the cancel request")]


class CancelAccepted(BaseModel):
    kind: Literal["artifact", "batch"]
    id: str = Field(description="the run's id")
    state: Literal["cancelling"]
    cancel_id: str = Field(description="the chora.cancel.requested event's id: derived from the run, so one per run")
    location: str = Field(description="where the run's state and, once it comes, its completion show")


def cancel_responses(what: str, location: str) -> dict[int | str, dict[str, Any]]:
    return {
        202: {
            "model": CancelAccepted,
            "description": f"the cancel is asked; Location is {location}, where the completion (status cancelled, "
            "unless the run completed first) shows",
        },
        404: {**_PROBLEM, "description": f"{what} is unknown (or expired): BATCH_NOT_FOUND, ARTIFACT_RUN_NOT_FOUND"},
        409: {**_PROBLEM, "description": f"{what} has already completed: RUN_COMPLETED (with its run_status)"},
    }


TimeoutQ = Annotated[
    float | None, Query(ge=0, description="seconds to wait for the outcome (else Prefer: wait=N, else the default)")
]
# (module level: the dependencies' annotations are resolved by name)
bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <API key>")
api_key = APIKeyHeader(name="X-API-Key", auto_error=False)
IdemKey = Annotated[str | None, Header(alias="Idempotency-Key", max_length=255)]
PreferH = Annotated[
    str | None, Header(max_length=200, description="RFC 7240: wait=N (seconds, capped at the maximum) or respond-async")
]


def wait_time(timeout: float | None, prefer: str | None, gw: GatewaySettings) -> tuple[float | None, str | None]:
    """(seconds to wait, the Preference-Applied value): ``?timeout=`` wins (over the maximum:
    422), else ``Prefer: wait=N`` (capped at the maximum: a preference) or ``respond-async`` (0)."""
    if timeout is not None:
        return timeout, None
    if prefer:
        m = _PREFER_WAIT.search(prefer)
        if m:
            wait = min(float(m.group(1)), gw.max_timeout_s)
            return wait, f"wait={wait:g}"
        if "respond-async" in prefer.lower():
            return 0.0, "respond-async"
    return None, None


def outcome_response(out: Outcome | Pending, trace_id: str | None, applied: str | None) -> Response:
    headers = {"Preference-Applied": applied} if applied else {}
    if isinstance(out, Pending):
        return JSONResponse(
            {"request_id": out.request_id, "state": "pending", "location": out.location},
            status_code=202,
            headers={**headers, "Location": out.location, "Retry-After": "1"},
        )
    if out.ok:
        return JSONResponse(out.data, headers=headers)
    err = out.data.get("error") or {}
    code = err.get("code") or "FAILED"
    status = 404 if code.endswith("NOT_FOUND") else 502 if code.startswith(_UPSTREAM) else 422
    return problem(
        status,
        code,
        err.get("message") or "the request failed",
        trace_id=trace_id or out.trace_id,
        title="The request failed",
        headers=headers,
        request_id=out.request_id,
        outcome=out.data,
    )


class McpGuard:
    """``/mcp`` (the MCP server over streamable HTTP, services/gateway/mcp) behind the same API
    keys, scopes and rate limit as the HTTP API: the caller goes on in the ASGI scope
    (``chora.caller``), where :func:`mcp_caller` finds it for the tools' scope checks."""

    def __init__(self, inner: Any, keys: KeyRing, limiter: RateLimiter):
        self.inner, self.keys, self.limiter = inner, keys, limiter

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        request = Request(scope, receive)
        header = request.headers.get("authorization", "")
        scheme, _, bearer_key = header.partition(" ")
        presented = bearer_key.strip() if scheme.lower() == "bearer" else request.headers.get("x-api-key")
        try:
            principal = self.keys.identify(presented)
            self.limiter.take(principal.name)
        except GatewayError as e:
            await from_error(e, trace_of(request))(scope, receive, send)
            return
        await self.inner({**scope, "chora.caller": Caller(principal.name, principal.scopes)}, receive, send)


def mcp_caller(scope: Any) -> Caller | None:
    return scope.get("chora.caller")


def create_app(
    ops: Operations,
    gw: GatewaySettings,
    keys: KeyRing,
    *,
    ready: Callable[[], bool],
    mcp: McpHttp | None = None,
) -> FastAPI:
    app = FastAPI(
        title="chora-compose gateway",
        version=API_VERSION,
        description="HTTP API v1 of chora-compose: generate content, assemble artifacts, run batches, "
        "follow events by trace. Errors are RFC 9457 problem details with the events' codes.",
        docs_url=None,
        redoc_url=None,
        responses=PROBLEMS,
    )
    app.add_middleware(GatewayMiddleware, max_body_bytes=gw.max_body_bytes)
    limiter = RateLimiter(gw.rate_per_s, gw.rate_burst)
    slots = sse.StreamSlots(gw.max_event_streams)
    if mcp is not None:  # the exact path, as the SDK serves it; not part of the HTTP API's document
        app.add_route("/mcp", McpGuard(mcp.app, keys, limiter), include_in_schema=False)  # type: ignore[arg-type]

    def auth(scope: str):
        async def dep(
            creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
            header_key: Annotated[str | None, Depends(api_key)],
        ) -> Principal:
            principal = keys.identify(creds.credentials if creds else header_key)
            if not principal.allows(scope):
                raise GatewayError(403, "FORBIDDEN", f"the key {principal.name!r} lacks the {scope!r} scope")
            limiter.take(principal.name)
            return principal

        return Depends(dep)

    async def answer(
        request: Request, principal: Principal, key: str | None, compute: Callable[[], Awaitable[Response]]
    ) -> Response:
        trace_id = trace_of(request)

        async def safe() -> Response:
            try:
                return await compute()
            except GatewayError as e:
                return from_error(e, trace_id)

        if key is None:
            return await safe()
        print_ = fingerprint(request.method, request.url.path, await request.body())
        return await idempotent(ops.stores.records, principal.name, key, print_, safe)

    # ------------------------------------------------------------------ errors
    @app.exception_handler(GatewayError)
    async def on_gateway_error(request: Request, e: GatewayError) -> Response:
        return from_error(e, trace_of(request))

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, e: RequestValidationError) -> Response:
        errors = [
            {"loc": list(x.get("loc", ())), "msg": x.get("msg", ""), "type": x.get("type", "")} for x in e.errors()
        ]
        detail = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in errors[:5])
        return problem(422, "INVALID_REQUEST", detail or "invalid request", trace_id=trace_of(request), errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, e: StarletteHTTPException) -> Response:
        code = HTTP_CODES.get(e.status_code, "HTTP_ERROR")
        return problem(e.status_code, code, str(e.detail), trace_id=trace_of(request), headers=dict(e.headers or {}))

    # ------------------------------------------------------------------ requests
    async def awaited(
        request: Request,
        principal: Principal,
        key: str | None,
        timeout: float | None,
        prefer: str | None,
        run: Callable[[float | None], Awaitable[Outcome | Pending]],
    ) -> Response:
        wait, applied = wait_time(timeout, prefer, gw)

        async def compute() -> Response:
            return outcome_response(await run(wait), trace_of(request), applied)

        return await answer(request, principal, key, compute)

    @app.post("/v1/generate", status_code=200, tags=["requests"], summary="Render a content config", responses=ACCEPTED)
    async def post_generate(
        request: Request,
        body: GenerateBody,
        timeout: TimeoutQ = None,
        idempotency_key: IdemKey = None,
        prefer: PreferH = None,
        principal: Principal = auth("generate"),
    ) -> Response:
        trace = request.state.trace
        return await awaited(
            request,
            principal,
            idempotency_key,
            timeout,
            prefer,
            lambda wait: ops.generate(
                body.content_config_id,
                body.context,
                timeout_s=wait,
                trace=trace,
                callback_url=body.callback_url,
                no_cache=body.no_cache,
            ),
        )

    @app.post("/v1/artifacts", status_code=200, tags=["requests"], summary="Assemble an artifact", responses=ACCEPTED)
    async def post_artifact(
        request: Request,
        body: ArtifactBody,
        timeout: TimeoutQ = None,
        idempotency_key: IdemKey = None,
        prefer: PreferH = None,
        principal: Principal = auth("generate"),
    ) -> Response:
        trace = request.state.trace
        return await awaited(
            request,
            principal,
            idempotency_key,
            timeout,
            prefer,
            lambda wait: ops.assemble(
                body.artifact_id, body.context, timeout_s=wait, trace=trace, callback_url=body.callback_url
            ),
        )

    @app.post("/v1/batches", status_code=202, tags=["batches"], summary="Run a batch")
    async def post_batch(
        request: Request, body: BatchBody, idempotency_key: IdemKey = None, principal: Principal = auth("batch")
    ) -> Response:
        async def compute() -> Response:
            acc = await ops.batch(
                [i.model_dump() for i in body.items],
                body.context,
                body.continue_on_error,
                callback_url=body.callback_url,
                trace=request.state.trace,
            )
            doc = {"batch_id": acc.batch_id, "trace_id": acc.trace_id, "total": acc.total, "location": acc.location}
            return JSONResponse(doc, status_code=202, headers={"Location": acc.location})

        return await answer(request, principal, idempotency_key, compute)

    # ------------------------------------------------------------------ cancels
    async def cancelled(request: Request, kind: RunKind, run_id: str, reason: str | None) -> Response:
        doc = await ops.cancel(kind, run_id, reason, trace=request.state.trace)
        return JSONResponse(doc, status_code=202, headers={"Location": doc["location"]})

    @app.delete(
        "/v1/batches/{batch_id}",
        status_code=202,
        tags=["batches"],
        summary="Cancel a batch",
        description="Publishes a chora.cancel.requested for the batch and answers at once: its "
        "batch_completed will say cancelled (with the counts of what ran), unless it completes first. "
        "Asking twice is one request (the cancel's id is derived from the batch).",
        responses=cancel_responses("the batch", "/v1/batches/{id}"),
    )
    async def delete_batch(
        request: Request, batch_id: Id, reason: ReasonQ = None, _: Principal = auth("batch")
    ) -> Response:
        return await cancelled(request, "batch", batch_id, reason)

    @app.delete(
        "/v1/artifacts/{request_id}",
        status_code=202,
        tags=["requests"],
        summary="Cancel an artifact run",
        description="Publishes a chora.cancel.requested for the artifact request and answers at once: "
        "its artifact_assembled will say cancelled, unless it completes first.",
        responses=cancel_responses("the artifact run", "/v1/requests/{id}"),
    )
    async def delete_artifact(
        request: Request, request_id: Id, reason: ReasonQ = None, _: Principal = auth("generate")
    ) -> Response:
        return await cancelled(request, "artifact", request_id, reason)

    # ------------------------------------------------------------------ reading
    @app.get("/v1/batches/{batch_id}", tags=["batches"], summary="A batch's progress")
    async def get_batch(batch_id: Id, _: Principal = auth("read")) -> dict[str, Any]:
        return await ops.batch_status(batch_id)

    @app.get("/v1/batches/{batch_id}/results", tags=["batches"], summary="A batch's item outcomes, paged")
    async def get_batch_results(
        batch_id: Id,
        cursor: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
        limit: Annotated[int | None, Query(ge=1, le=10_000)] = None,
        content: bool = True,
        _: Principal = auth("read"),
    ) -> dict[str, Any]:
        page = await ops.batch_results(batch_id, cursor=cursor, limit=limit, content=content)
        if page["next_cursor"] is not None:
            size = limit or gw.page_size
            page["next"] = f"/{API_VERSION}/batches/{batch_id}/results?cursor={page['next_cursor']}&limit={size}"
        return page

    @app.get("/v1/requests/{request_id}", tags=["requests"], summary="A request's state and outcome")
    async def get_request(request_id: Id, _: Principal = auth("read")) -> dict[str, Any]:
        return await ops.request_status(request_id)

    @app.get("/v1/events", tags=["events"], summary="A trace's events as Server-Sent Events")
    async def get_events(
        request: Request,
        trace_id: Annotated[str, Query(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:-]+$")],
        type: Annotated[list[str] | None, Query(max_length=20)] = None,
        last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", max_length=20)] = None,
        _: Principal = auth("read"),
    ) -> Response:
        types = sse.check_types(type or [])
        start = int(last_event_id) + 1 if last_event_id and last_event_id.isdigit() else None
        if start is None:
            start = await ops.trace_start(trace_id)
        slots.check()
        s = ops.settings

        async def body():
            with slots.held():
                async for chunk in sse.event_stream(
                    ops.nc,
                    s.stream_name,
                    s.prefix,
                    trace_id,
                    types,
                    start_seq=start,
                    replay_s=gw.events_replay_s,
                    max_event_bytes=s.max_event_bytes,
                ):
                    yield chunk

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(body(), media_type="text/event-stream", headers=headers)

    # ------------------------------------------------------------------ discovery
    @app.get("/v1/configs", tags=["discovery"], summary="Content and artifact configs")
    async def get_configs(_: Principal = auth("read")) -> list[dict[str, Any]]:
        return ops.list_configs()

    @app.get("/v1/capabilities", tags=["discovery"], summary="Everything this gateway offers")
    async def get_capabilities(_: Principal = auth("read")) -> dict[str, Any]:
        return await ops.capabilities()

    @app.get("/v1/capabilities/server", tags=["discovery"])
    async def get_cap_server(_: Principal = auth("read")) -> dict[str, Any]:
        return ops.server_info()

    @app.get("/v1/capabilities/generators", tags=["discovery"])
    async def get_cap_generators(_: Principal = auth("read")) -> dict[str, Any]:
        return await ops.generators()

    @app.get("/v1/capabilities/configs", tags=["discovery"])
    async def get_cap_configs(_: Principal = auth("read")) -> list[dict[str, Any]]:
        return ops.list_configs()

    @app.get("/v1/capabilities/limits", tags=["discovery"])
    async def get_cap_limits(_: Principal = auth("read")) -> dict[str, Any]:
        return ops.limits()

    @app.get("/v1/capabilities/events", tags=["discovery"])
    async def get_cap_events(_: Principal = auth("read")) -> list[dict[str, Any]]:
        return ops.event_types()

    @app.get("/v1/schemas/{event_type}", tags=["discovery"], summary="The JSON Schema of an event's data")
    async def get_schema(event_type: Annotated[str, Path(max_length=64)]) -> Response:
        if event_type not in CATALOGUE:
            raise GatewayError(404, "UNKNOWN_EVENT_TYPE", f"no event type {event_type!r}")
        return Response((SCHEMA_DIR / f"{event_type}.json").read_bytes(), media_type="application/schema+json")

    # ------------------------------------------------------------------ health
    @app.get("/healthz", tags=["health"], summary="Alive")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], summary="Connected to NATS and following outcomes")
    async def readyz(request: Request) -> Response:
        if not ready():
            return problem(503, "NOT_READY", "not connected to NATS, or draining", trace_id=trace_of(request))
        return JSONResponse({"status": "ready"})

    return app
