"""What every HTTP request goes through (plain ASGI, so streams pass untouched):

- trace context in: ``X-Trace-ID`` and ``traceparent`` (a bad X-Trace-ID is 400), kept
  in ``request.state.trace``; out: every response carries ``X-Trace-ID`` and a ``traceparent``;
- the body limit: a declared Content-Length over it is 413 at once; any body (chunked too)
  is counted while it is read, and 413 as soon as it passes the limit;
- a last guard: an unexpected exception is a 500 problem (the fuzz tests see none).
"""

from __future__ import annotations

import logging
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from contracts.tracing import child_traceparent
from services.gateway.model import GatewayError, Trace
from services.gateway.problems import from_error, problem

log = logging.getLogger("chora.gateway")


class _TooLarge(Exception):
    pass


class GatewayMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int = 1 << 20):
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        try:
            trace = Trace.parse(headers.get("x-trace-id"), headers.get("traceparent"))
        except GatewayError as e:
            await from_error(e, None)(scope, receive, send)
            return
        scope.setdefault("state", {})["trace"] = trace
        out_headers = [
            (b"x-trace-id", trace.trace_id.encode()),
            (b"traceparent", child_traceparent(trace.trace_id, trace.traceparent).encode()),
        ]
        started = False

        async def send_traced(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", []), *out_headers]}
            await send(message)

        declared = headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                await problem(400, "BAD_REQUEST", "Content-Length is not a number", trace_id=trace.trace_id)(
                    scope, receive, send_traced
                )
                return
            if int(declared) > self.max_body_bytes:
                await self._too_large(scope, receive, send_traced, trace.trace_id)
                return
        try:
            body_receive = (
                await self._read_body(receive) if scope.get("method") in ("POST", "PUT", "PATCH") else receive
            )
        except _TooLarge:
            await self._too_large(scope, receive, send_traced, trace.trace_id)
            await _discard(receive, 16 * self.max_body_bytes)  # let the client finish sending, to read the 413
            return
        try:
            await self.app(scope, body_receive, send_traced)
        except Exception:
            log.exception("unexpected error on %s %s", scope.get("method"), scope.get("path"))
            if not started:
                await problem(500, "INTERNAL", "an unexpected error; it is logged", trace_id=trace.trace_id)(
                    scope, receive, send_traced
                )

    async def _too_large(self, scope: Scope, receive: Receive, send: Send, trace_id: str) -> None:
        detail = f"the request body is larger than {self.max_body_bytes} bytes"
        await problem(413, "BODY_TOO_LARGE", detail, trace_id=trace_id)(scope, receive, send)

    async def _read_body(self, receive: Receive) -> Receive:
        """Read the whole body (at most the limit) and hand it on as one message."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return _replay([message])
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_body_bytes:
                raise _TooLarge()
            chunks.append(body)
            if not message.get("more_body", False):
                break
        return _replay([{"type": "http.request", "body": b"".join(chunks), "more_body": False}], receive)


async def _discard(receive: Receive, limit: int) -> None:
    """Read and drop the rest of a refused body, up to ``limit`` bytes (then the connection closes)."""
    dropped = 0
    while dropped <= limit:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return
        dropped += len(message.get("body", b""))


def _replay(messages: list[Message], then: Receive | None = None) -> Receive:
    async def receive() -> Message:
        if messages:
            return messages.pop(0)
        if then is not None:
            return await then()
        return {"type": "http.disconnect"}

    return receive
