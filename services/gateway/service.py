"""Wiring of the gateway: ``build(settings)`` -> :class:`GatewayApp`, run by services/runtime.py.

It has no durable consumer: on start it builds :class:`~.operations.Operations` on the
process's connection (its one outcome follower), the HTTP app, and serves it with uvicorn
on ``CHORA_GATEWAY_HOST:CHORA_GATEWAY_PORT`` (0: a free port; the readiness file names
the real ``gateway_url``). On SIGTERM it stops taking connections, lets the requests in
flight finish (5 s at most) and closes.

Auth is on unless ``CHORA_GATEWAY_AUTH=false``; with it on, ``CHORA_GATEWAY_KEYS_FILE``
must name the keys (`chora up` makes one with a fresh key on first start).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import uvicorn

from services.gateway.app import create_app, mcp_caller
from services.gateway.mcp import McpHttp, mcp_asgi_app
from services.gateway.operations import Operations
from services.gateway.security import KeyRing, load_keys, parse_keys
from services.gateway.settings import GatewaySettings
from services.settings import Settings

log = logging.getLogger("chora.gateway")


class _Server(uvicorn.Server):
    """uvicorn without its own signal handlers: the service runtime owns SIGTERM/SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


class GatewayApp:
    name = "gateway"
    wants_connection = True  # the runtime hands it the connection (BusContext.connection)

    def __init__(self, settings: Settings, gateway: GatewaySettings | None = None, keys: KeyRing | None = None):
        self.settings = settings
        self.gateway = gateway or GatewaySettings()
        self.keys = keys
        self.ops: Operations | None = None
        self.server: _Server | None = None
        self._serving: asyncio.Task | None = None
        self.url: str | None = None
        self.draining = False
        self.mcp: McpHttp | None = None
        self._mcp_task: asyncio.Task | None = None
        self._mcp_stop = asyncio.Event()

    def consumers(self, topology: Any) -> list:
        return []  # no durable consumer: one outcome follower, in Operations

    def _keyring(self) -> KeyRing:
        if self.keys is not None:
            return self.keys
        g = self.gateway
        if not g.auth:
            log.warning("gateway auth is off (CHORA_GATEWAY_AUTH=false): anyone who reaches it may call it")
            return KeyRing([], enabled=False)
        if g.keys_file is None and not g.keys:
            raise RuntimeError(
                "gateway auth is on and no key is set: name a file of {name, key_sha256, scopes} in "
                "CHORA_GATEWAY_KEYS_FILE, or give the list in CHORA_GATEWAY_KEYS (see docs/gateway.md); "
                "or set CHORA_GATEWAY_AUTH=false on a trusted network"
            )
        keys = load_keys(g.keys_file) if g.keys_file is not None else []
        return KeyRing(keys + parse_keys(g.keys, "CHORA_GATEWAY_KEYS"))

    def ready(self) -> bool:
        ops = self.ops
        return ops is not None and not self.draining and ops.nc.is_connected

    async def start(self, ctx: Any) -> None:
        keys = self._keyring()
        self.ops = Operations(ctx.connection, self.settings, self.gateway)
        await self.ops.start()
        # MCP over streamable HTTP at /mcp; its session manager runs in a task of its own
        # (anyio wants a task group left by the task that entered it)
        self.mcp = mcp_asgi_app(self.ops, caller_of=mcp_caller)
        self._mcp_task = asyncio.create_task(self._run_mcp(), name="gateway-mcp")
        app = create_app(self.ops, self.gateway, keys, ready=self.ready, mcp=self.mcp)
        config = uvicorn.Config(
            app,
            host=self.gateway.host,
            port=self.gateway.port,
            log_level="warning",
            access_log=False,
            lifespan="off",
            server_header=False,
            timeout_graceful_shutdown=5,
            ws="none",
        )
        self.server = _Server(config)
        self._serving = asyncio.create_task(self.server.serve(), name="gateway-http")
        while not self.server.started:
            if self._serving.done():
                await self._stop_mcp()
                await self.ops.close()
                self._serving.result()  # what stopped it
                raise RuntimeError(f"cannot serve on {self.gateway.host}:{self.gateway.port}")
            await asyncio.sleep(0.01)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{port}"
        log.info("gateway listening on %s", self.url)

    async def _run_mcp(self) -> None:
        assert self.mcp is not None
        async with self.mcp.lifespan():
            await self._mcp_stop.wait()

    async def _stop_mcp(self) -> None:
        if self._mcp_task is not None:
            self._mcp_stop.set()
            await asyncio.gather(self._mcp_task, return_exceptions=True)

    async def drain(self) -> None:
        """Stop taking connections; requests in flight finish."""
        self.draining = True
        await self._stop_serving()

    async def _stop_serving(self) -> None:
        if self.server is not None and self._serving is not None:
            self.server.should_exit = True
            await asyncio.gather(self._serving, return_exceptions=True)

    async def close(self) -> None:
        await self._stop_serving()
        await self._stop_mcp()
        if self.ops is not None:
            await self.ops.close()

    async def handle(self, event: Any, delivery: Any) -> list:
        return []  # never called: the gateway has no durable consumer

    def info(self) -> dict[str, Any]:
        return {"gateway_url": self.url, "auth": self.gateway.auth}


def build(settings: Settings) -> GatewayApp:
    return GatewayApp(settings)
