"""The MCP server over streamable HTTP: an ASGI app the gateway mounts at ``/mcp``.

The gateway's own auth middleware checks the API key before a request gets here; this app
reads who the caller is from the ASGI scope (:func:`starlette_caller`: ``scope["user"]`` and
``scope["auth"]`` as Starlette's AuthenticationMiddleware sets them; pass ``caller_of`` for
another convention), answers 401 when nobody is (defence in depth: never open by mistake),
and hands the caller to the SDK as its authenticated user, so the tools see the key's scopes
(``get_access_token()``) and a session can only be used by the key that opened it.

The transport is stateless with JSON responses: every POST stands alone, no session is
kept in the process, so any gateway instance answers any request. The SDK's session
manager needs its task group running: enter :meth:`McpHttp.lifespan` in the gateway's
lifespan (after ``Operations.start()``)::

    mcp_http = mcp_asgi_app(operations)
    routes.append(Route("/mcp", endpoint=mcp_http.app))   # the exact path, as the SDK does
    async with mcp_http.lifespan():                       # inside the app's lifespan
        yield
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from mcp.server.auth.middleware.auth_context import AuthContextMiddleware
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.server.transport_security import TransportSecuritySettings
from starlette.types import Receive, Scope, Send

from services.gateway.mcp.server import ALL_SCOPES, build_server
from services.gateway.operations import Operations


@dataclass(frozen=True)
class Caller:
    """Who calls: the API key's name and its scopes (generate, batch, read, admin)."""

    name: str
    scopes: frozenset[str]


def starlette_caller(scope: Scope) -> Caller | None:
    """The caller as Starlette's AuthenticationMiddleware leaves it: ``scope["user"]`` (an
    authenticated user; its ``display_name`` names the key) and ``scope["auth"]`` (its scopes)."""
    user, auth = scope.get("user"), scope.get("auth")
    if user is None or not getattr(user, "is_authenticated", False) or auth is None:
        return None
    return Caller(str(getattr(user, "display_name", "") or "api-key"), frozenset(getattr(auth, "scopes", ())))


@dataclass
class McpHttp:
    """``app``: the ASGI app to mount; ``lifespan()``: run it around the gateway's life."""

    app: Callable[[Scope, Receive, Send], Any]
    session_manager: StreamableHTTPSessionManager

    @contextlib.asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        async with self.session_manager.run():
            yield


def mcp_asgi_app(
    operations: Operations,
    *,
    auth: bool = True,
    caller_of: Callable[[Scope], Caller | None] = starlette_caller,
    transport_security: TransportSecuritySettings | None = None,
) -> McpHttp:
    """The MCP server over ``operations`` as a mountable ASGI app. ``auth=False`` (a gateway
    whose auth is off: a trusted network only) gives every request every scope; otherwise a
    request whose caller ``caller_of`` cannot tell is refused with 401. Request bodies are
    bounded by the gateway's ``max_body_bytes`` (413)."""
    manager = StreamableHTTPSessionManager(
        app=build_server(operations, local=False)._lowlevel_server,
        json_response=True,
        stateless=True,
        security_settings=transport_security,
        max_request_body_size=operations.gateway.max_body_bytes,
    )
    return McpHttp(_McpAsgi(AuthContextMiddleware(manager.handle_request), auth, caller_of), manager)


class _McpAsgi:
    """An ASGI app (a class, so Starlette's ``Route`` serves it as one, not as an endpoint)."""

    def __init__(self, inner: Callable[[Scope, Receive, Send], Any], auth: bool, caller_of):
        self.inner, self.auth, self.caller_of = inner, auth, caller_of

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan events: the gateway runs McpHttp.lifespan()
            return
        caller = self.caller_of(scope) if self.auth else Caller("anonymous", ALL_SCOPES)
        if caller is None:
            await _unauthorized(send)
            return
        token = AccessToken(token="-", client_id=caller.name, scopes=sorted(caller.scopes))
        await self.inner({**scope, "user": AuthenticatedUser(token)}, receive, send)


async def _unauthorized(send: Send) -> None:
    body = json.dumps(
        {
            "type": "about:blank",
            "title": "Unauthorized",
            "status": 401,
            "code": "UNAUTHORIZED",
            "detail": "an API key is needed: Authorization: Bearer <key>",
        }
    ).encode()
    headers = [
        (b"content-type", b"application/problem+json"),
        (b"www-authenticate", b'Bearer realm="chora-compose"'),
        (b"content-length", str(len(body)).encode()),
    ]
    await send({"type": "http.response.start", "status": 401, "headers": headers})
    await send({"type": "http.response.body", "body": body})
