"""The MCP tools and resources over :class:`Operations` (built with the SDK's ``MCPServer``).

Tools answer structured content (their output schemas are the models below) and a text
block with the same JSON. A refusal or failure is a tool error (``isError``) whose text is
``CODE: detail`` and whose structured content is ``{"error": {"code", "message", "status"}}``:
the codes of the events and of the HTTP API (CONFIG_NOT_FOUND, CONTEXT_TOO_LARGE, ...).
Nothing a caller sends crashes the server: an unexpected exception is logged and answered
as INTERNAL_ERROR.

generate_content and assemble_artifact wait for the outcome up to ``timeout_s`` (default
and bound from the gateway's settings); past it they answer ``state: "pending"`` with the
request id, and request_status gives the outcome later.

Scopes: each tool needs one (:data:`TOOL_SCOPES`), the resources need ``read``, ``admin``
grants all. Over stdio (``local=True``) the local user has every scope; over HTTP the
scopes are those of the caller's API key, which :mod:`.http` hands to the SDK's auth
context (``get_access_token()``).

No ``from __future__ import annotations`` here: the tools' argument types carry bounds
taken from the settings at build time, so they are built as objects, not strings.
"""

import json
import logging
from typing import Annotated, Any, Awaitable, Callable, Literal

from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.mcpserver import MCPServer
from mcp.shared.exceptions import MCPError
from mcp_types import INVALID_REQUEST, CallToolResult, TextContent, ToolAnnotations
from pydantic import BaseModel, ConfigDict, Field

from services.gateway.model import Accepted, GatewayError, Outcome, Pending, Trace
from services.gateway.operations import Operations

log = logging.getLogger("chora.gateway.mcp")

ALL_SCOPES = frozenset({"generate", "batch", "read", "admin"})
TOOL_SCOPES = {
    "generate_content": "generate",
    "assemble_artifact": "generate",
    "batch_generate": "batch",
    "batch_status": "read",
    "batch_results": "read",
    "request_status": "read",
    "list_configs": "read",
    "cancel_run": "batch",  # for kind "batch"; "generate" for an artifact run (CANCEL_SCOPES)
}
CANCEL_SCOPES = {"batch": "batch", "artifact": "generate"}  # the scope that may start such a run
RESOURCE_SCOPE = "read"

INSTRUCTIONS = """chora-compose renders content from configs (templates, model prompts) and assembles
artifacts from parts. list_configs (or the capabilities://configs resource) tells which
content_config_id and artifact_id exist and the context each one declares. generate_content
and assemble_artifact wait for the outcome up to timeout_s; a result with state "pending"
means it is still being made: call request_status with its request_id later. batch_generate
answers at once with a batch_id: poll batch_status until state is "finished", then read
batch_results page by page (next_cursor) while they are kept (BATCH_RESULTS_EXPIRED after).
cancel_run stops a batch or an artifact run under way."""


# ---------------------------------------------------------------------- output models
class RequestResult(BaseModel):
    """A generation or an artifact: its outcome, or pending."""

    state: Literal["done", "pending"] = Field(description="done: the outcome is here; pending: poll request_status")
    request_id: str = Field(description="the request's id (request_status takes it)")
    kind: str = Field(description="generate | assemble")
    trace_id: str | None = Field(None, description="the trace the request and its outcome belong to")
    status: Literal["success", "error"] | None = Field(None, description="done: the outcome's status")
    content: str | None = Field(None, description="done: the content (unless too large to inline)")
    content_ref: str | None = Field(None, description="the Object Store name when the content was too large to inline")
    outcome: dict[str, Any] | None = Field(None, description="done: the content_generated / artifact_assembled data")
    poll: str | None = Field(None, description="pending: what to call to get the outcome")


class BatchAccepted(BaseModel):
    state: Literal["accepted"] = "accepted"
    batch_id: str = Field(description="batch_status and batch_results take it")
    trace_id: str | None = None
    total: int = Field(description="how many items")
    poll: str


class BatchStatus(BaseModel):
    """A batch's progress (more members may follow: successful, failed, skipped, elapsed_s, ...)."""

    model_config = ConfigDict(extra="allow")
    batch_id: str
    state: str = Field(description="queued | running | closing | finished")
    total: int | None = None
    done: int = Field(0, description="items with an outcome")
    status: str | None = Field(None, description="once closed: success, or error when an item failed")


class BatchResults(BaseModel):
    batch_id: str
    total: int | None = Field(description="items in the batch (None while it is queued)")
    cursor: int
    next_cursor: int | None = Field(description="the cursor of the next page; None at the end")
    items: list[dict[str, Any]] = Field(description="index, status (success, error, skipped, pending), content, error")


class CancelAsked(BaseModel):
    """A cancel that was asked; the run's completion will say cancelled, unless it completes first."""

    kind: Literal["artifact", "batch"]
    id: str = Field(description="the run's id")
    state: Literal["cancelling"] = "cancelling"
    cancel_id: str = Field(description="the chora.cancel.requested event's id (the same for every ask)")
    location: str = Field(description="the HTTP resource where the run's state and outcome show")
    poll: str = Field(description="what to call to see the completion")


class ConfigList(BaseModel):
    configs: list[dict[str, Any]] = Field(description="id, kind (content | artifact), description, declared context")


class BatchItem(BaseModel):
    content_config_id: str = Field(description="the content config to render", max_length=128)
    context: dict[str, Any] | None = Field(None, description="this item's context, over the batch's")


# ---------------------------------------------------------------------- results
def _ok(model: BaseModel) -> CallToolResult:
    data = model.model_dump(mode="json")
    return CallToolResult(content=[TextContent(type="text", text=json.dumps(data))], structured_content=data)


def tool_error(code: str, message: str, status: int = 500, extra: dict[str, Any] | None = None) -> CallToolResult:
    error = {"code": code, "message": message, "status": status}
    return CallToolResult(
        content=[TextContent(type="text", text=f"{code}: {message}")],
        structured_content={"error": error, **(extra or {})},
        is_error=True,
    )


def granted_scopes(local: bool) -> frozenset[str]:
    """The scopes of whoever makes the current request: every one on stdio, else its key's."""
    if local:
        return ALL_SCOPES
    token = get_access_token()
    return frozenset(token.scopes) if token is not None else frozenset()


def allowed(scopes: frozenset[str], needed: str) -> bool:
    return needed in scopes or "admin" in scopes


def _request_result(got: Outcome | Pending, timeout_s: float) -> CallToolResult:
    if isinstance(got, Pending):
        return _ok(
            RequestResult(
                state="pending",
                request_id=got.request_id,
                kind=got.kind,
                trace_id=got.trace_id,
                poll=f"no outcome within {timeout_s:g}s; the request goes on: call request_status "
                f"with request_id={got.request_id}",
            )
        )
    return _outcome_result(got.request_id, got.kind, got.trace_id, got.data)


def _outcome_result(request_id: str, kind: str, trace_id: str | None, data: dict[str, Any]) -> CallToolResult:
    if data.get("status") != "success":
        err = data.get("error") or {}
        return tool_error(
            err.get("code", "FAILED"),
            err.get("message", "the request failed"),
            422,
            {"request_id": request_id, "trace_id": trace_id, "outcome": data},
        )
    return _ok(
        RequestResult(
            state="done",
            request_id=request_id,
            kind=kind,
            trace_id=trace_id,
            status="success",
            content=data.get("content"),
            content_ref=data.get("content_ref") if data.get("content") is None else None,
            outcome=data,
        )
    )


# ---------------------------------------------------------------------- the server
def build_server(ops: Operations, *, local: bool) -> MCPServer:
    """The MCP server over ``ops``; ``local`` (stdio): the caller has every scope."""
    g = ops.gateway
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    server: MCPServer = MCPServer("chora-compose", version=ops.server_info()["version"], instructions=INSTRUCTIONS)
    root.handlers[:] = handlers  # undo the SDK's logging.basicConfig: the process configures its logging
    root.setLevel(level)

    async def guarded(
        tool: str, call: Callable[[], Awaitable[CallToolResult]], needed: str | None = None
    ) -> CallToolResult:
        needed = needed or TOOL_SCOPES[tool]
        if not allowed(granted_scopes(local), needed):
            return tool_error("FORBIDDEN", f"{tool} needs the {needed!r} scope, which this API key has not", 403)
        try:
            return await call()
        except GatewayError as e:
            return tool_error(e.code, e.detail, e.status, e.extra)
        except Exception:
            log.exception("MCP tool %s failed", tool)
            return tool_error("INTERNAL_ERROR", f"{tool} failed unexpectedly; the gateway's log has the cause")

    def timeout(t: float | None) -> float:
        return g.default_timeout_s if t is None else t

    ConfigId = Annotated[
        str, Field(description="a content config id (list_configs), e.g. hello-world", min_length=1, max_length=128)
    ]
    ArtifactId = Annotated[str, Field(description="an artifact config id (list_configs)", min_length=1, max_length=128)]
    ContextArg = Annotated[
        dict[str, Any] | None,
        Field(description=f"values for the template, a JSON object (at most {g.max_context_bytes} bytes of JSON)"),
    ]
    Timeout = Annotated[
        float | None,
        Field(
            description=f"seconds to wait for the outcome (default {g.default_timeout_s:g}); past it the answer is "
            "pending with a request_id to poll",
            ge=0,
            le=g.max_timeout_s,
        ),
    ]
    TraceId = Annotated[str | None, Field(description="join this trace id (1-128 of [A-Za-z0-9._:-])", max_length=128)]
    CallbackUrl = Annotated[
        str | None, Field(description="also POST the outcome here (only to the allow-listed hosts)", max_length=2048)
    ]
    BatchId = Annotated[str, Field(description="the batch_id batch_generate answered", min_length=1, max_length=200)]
    RequestId = Annotated[str, Field(description="a request_id a pending answer gave", min_length=1, max_length=200)]
    read_only = ToolAnnotations(read_only_hint=True, open_world_hint=False)
    makes = ToolAnnotations(read_only_hint=False, destructive_hint=False, open_world_hint=False)

    @server.tool(annotations=makes)
    async def generate_content(
        content_config_id: ConfigId,
        context: ContextArg = None,
        timeout_s: Timeout = None,
        no_cache: Annotated[bool, Field(description="render afresh, not from the result cache")] = False,
        trace_id: TraceId = None,
        callback_url: CallbackUrl = None,
    ) -> Annotated[CallToolResult, RequestResult]:
        """Render a content config with a context and return the content (validated by the
        config's rules), or state "pending" with a request_id when it takes longer than timeout_s."""

        async def call() -> CallToolResult:
            got = await ops.generate(
                content_config_id,
                context,
                timeout_s=timeout_s,
                trace=Trace.parse(trace_id),
                callback_url=callback_url,
                no_cache=no_cache,
            )
            return _request_result(got, timeout(timeout_s))

        return await guarded("generate_content", call)

    @server.tool(annotations=makes)
    async def assemble_artifact(
        artifact_id: ArtifactId,
        context: ContextArg = None,
        timeout_s: Timeout = None,
        trace_id: TraceId = None,
        callback_url: CallbackUrl = None,
    ) -> Annotated[CallToolResult, RequestResult]:
        """Assemble an artifact (a document made of several generated parts) and return it, or
        state "pending" with a request_id when it takes longer than timeout_s."""

        async def call() -> CallToolResult:
            got = await ops.assemble(
                artifact_id, context, timeout_s=timeout_s, trace=Trace.parse(trace_id), callback_url=callback_url
            )
            return _request_result(got, timeout(timeout_s))

        return await guarded("assemble_artifact", call)

    @server.tool(annotations=makes)
    async def batch_generate(
        items: Annotated[
            list[BatchItem],
            Field(description="what to render, one entry per item", min_length=1, max_length=g.max_batch_items),
        ],
        context: Annotated[dict[str, Any] | None, Field(description="context shared by every item")] = None,
        continue_on_error: Annotated[bool, Field(description="go on after an item fails")] = True,
        trace_id: TraceId = None,
        callback_url: CallbackUrl = None,
    ) -> Annotated[CallToolResult, BatchAccepted]:
        """Start a batch of generations; answers at once with a batch_id. Poll batch_status until
        its state is "finished", then read batch_results."""

        async def call() -> CallToolResult:
            acc: Accepted = await ops.batch(
                [i.model_dump(exclude_none=True) for i in items],
                context,
                continue_on_error,
                callback_url=callback_url,
                trace=Trace.parse(trace_id),
            )
            return _ok(
                BatchAccepted(
                    batch_id=acc.batch_id,
                    trace_id=acc.trace_id,
                    total=acc.total,
                    poll=f"call batch_status with batch_id={acc.batch_id} until state is finished, then batch_results",
                )
            )

        return await guarded("batch_generate", call)

    @server.tool(annotations=read_only)
    async def batch_status(batch_id: BatchId) -> Annotated[CallToolResult, BatchStatus]:
        """A batch's progress: state (queued, running, closing, finished), total, done, and once
        closed its status (success, or error when an item failed)."""

        async def call() -> CallToolResult:
            return _ok(BatchStatus.model_validate(await ops.batch_status(batch_id)))

        return await guarded("batch_status", call)

    @server.tool(annotations=read_only)
    async def batch_results(
        batch_id: BatchId,
        cursor: Annotated[int, Field(description="the first item index of the page", ge=0)] = 0,
        limit: Annotated[
            int | None, Field(description=f"items per page (default {g.page_size})", ge=1, le=g.max_page_size)
        ] = None,
        content: Annotated[bool, Field(description="include each successful item's content")] = True,
    ) -> Annotated[CallToolResult, BatchResults]:
        """One page of a batch's item outcomes (with their content); next_cursor is the cursor of
        the next page, None at the end."""

        async def call() -> CallToolResult:
            page = await ops.batch_results(batch_id, cursor=cursor, limit=limit, content=content)
            return _ok(BatchResults.model_validate(page))

        return await guarded("batch_results", call)

    @server.tool(annotations=ToolAnnotations(read_only_hint=False, destructive_hint=True, open_world_hint=False))
    async def cancel_run(
        kind: Annotated[Literal["artifact", "batch"], Field(description="what the run is")],
        id: Annotated[
            str, Field(description="the batch_id, or the artifact's request_id", min_length=1, max_length=256)
        ],
        reason: Annotated[str | None, Field(description="why (kept on the cancel request)", max_length=500)] = None,
        trace_id: TraceId = None,
    ) -> Annotated[CallToolResult, CancelAsked]:
        """Cancel a batch or an artifact run that is under way: nothing more is generated for it
        and its completion says cancelled. Answers at once; a run that has completed already is
        a RUN_COMPLETED error, an unknown one BATCH_NOT_FOUND or ARTIFACT_RUN_NOT_FOUND."""

        async def call() -> CallToolResult:
            doc = await ops.cancel(kind, id, reason, trace=Trace.parse(trace_id))
            poll = (
                f"call batch_status with batch_id={id}"
                if kind == "batch"
                else f"call request_status with request_id={id}"
            )
            return _ok(CancelAsked(**doc, poll=poll))

        return await guarded("cancel_run", call, CANCEL_SCOPES[kind])

    @server.tool(annotations=read_only)
    async def request_status(request_id: RequestId) -> Annotated[CallToolResult, RequestResult]:
        """The outcome of a generation or artifact that answered pending: state "done" with the
        content, or still "pending"."""

        async def call() -> CallToolResult:
            st = await ops.request_status(request_id)
            if st["kind"] == "batch":
                raise GatewayError(422, "IS_A_BATCH", f"{request_id} is a batch: call batch_status")
            if st["state"] != "done":
                return _ok(
                    RequestResult(
                        state="pending",
                        request_id=request_id,
                        kind=st["kind"],
                        trace_id=st.get("trace_id"),
                        poll="no outcome yet: call request_status again later",
                    )
                )
            return _outcome_result(request_id, st["kind"], st.get("trace_id"), st.get("outcome") or {})

        return await guarded("request_status", call)

    @server.tool(annotations=read_only)
    async def list_configs(
        kind: Annotated[
            Literal["content", "artifact"] | None, Field(description="only content configs, or only artifacts")
        ] = None,
    ) -> Annotated[CallToolResult, ConfigList]:
        """The content configs and artifacts this gateway can render: id, kind, description and
        the context each declares (with its defaults)."""

        async def call() -> CallToolResult:
            configs = [c for c in ops.list_configs() if kind is None or c["kind"] == kind]
            return _ok(ConfigList(configs=configs))

        return await guarded("list_configs", call)

    def resource(uri: str, description: str, read: Callable[[], Awaitable[Any]]) -> None:
        async def read_json() -> str:
            if not allowed(granted_scopes(local), RESOURCE_SCOPE):
                raise MCPError(
                    code=INVALID_REQUEST,
                    message=f"FORBIDDEN: reading {uri} needs the 'read' scope, which this API key has not",
                    data={"code": "FORBIDDEN", "status": 403},
                )
            return json.dumps(await read(), indent=2)

        server.resource(uri, name=uri.split("://")[1], description=description, mime_type="application/json")(read_json)

    async def server_info() -> dict[str, Any]:
        return {**ops.server_info(), "limits": ops.limits(), "tools": sorted(TOOL_SCOPES)}

    async def configs() -> dict[str, Any]:
        return {"configs": ops.list_configs()}

    resource("capabilities://server", "name, version, API version, features and limits", server_info)
    resource("capabilities://generators", "the generators and their readiness (pre-flight)", ops.generators)
    resource("capabilities://configs", "content configs and artifacts with their declared context", configs)
    return server
