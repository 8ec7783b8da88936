"""`chora mcp`: the MCP server over stdio, for Claude Desktop and other local MCP clients.

    chora mcp

It connects to NATS like the other commands (-s/--creds/... or NATS_URL, else the running `chora up`), and
serves the gateway's MCP tools and ``capabilities://`` resources (services/gateway/mcp,
docs/mcp.md) on stdin/stdout; the local user has every scope. stdout carries only the MCP
protocol: every log line and message goes to stderr. It runs until the client closes stdin.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys


def register(subparsers) -> None:
    from chora.options import add_command

    sp = add_command(
        subparsers, "mcp", connects=True, help="serve the MCP tools and resources over stdio (for Claude Desktop)"
    )
    sp.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds a tool waits for an outcome by default (else CHORA_GATEWAY_DEFAULT_TIMEOUT_S, 30)",
    )
    sp.set_defaults(func=lambda a: asyncio.run(serve(a)))


async def serve(args: argparse.Namespace) -> int:
    from bus.topology import Topology, provision
    from chora.common import EXIT_FAILED, EXIT_USAGE, Link, close_cli, connect_cli, load_settings
    from services.gateway.mcp import build_server
    from services.gateway.operations import Operations
    from services.gateway.settings import GatewaySettings

    logging.getLogger("mcp").setLevel(logging.WARNING)  # one line per request otherwise
    settings = load_settings(args)
    gateway = GatewaySettings()
    if args.timeout is not None:
        if not 0 <= args.timeout <= gateway.max_timeout_s:
            print(f"chora: --timeout must be 0..{gateway.max_timeout_s:g} seconds", file=sys.stderr)
            return EXIT_USAGE
        gateway = gateway.model_copy(update={"default_timeout_s": args.timeout})
    link = Link()  # a server reconnects for as long as it runs
    nc = await connect_cli(settings, link)
    ops = Operations(nc, settings, gateway)
    try:
        try:
            if settings.provision:
                await provision(nc.jetstream(), Topology.from_settings(settings), consumers=[])
            await ops.start()
        except Exception as e:
            print(
                f"chora: cannot read the events stream {settings.stream_name}: {type(e).__name__}: {e}. "
                "Run `chora nats provision`, or start the services once, which provision it.",
                file=sys.stderr,
            )
            return EXIT_FAILED
        await build_server(ops, local=True).run_stdio_async()
        return 0
    finally:
        await ops.close()
        await close_cli(nc, link)
