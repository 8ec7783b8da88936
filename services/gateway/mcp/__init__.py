"""The gateway's MCP server (the official ``mcp`` SDK) over :class:`~services.gateway.operations.Operations`.

- :mod:`.server`: :func:`build_server`, the tools (generate_content, assemble_artifact,
  batch_generate, batch_status, batch_results, request_status, list_configs) and the
  ``capabilities://`` resources, each checked against the caller's scopes.
- :mod:`.http`: :func:`mcp_asgi_app`, the streamable HTTP transport as an ASGI app the gateway
  mounts at ``/mcp`` behind its own auth; stdio is ``chora mcp`` (chora/commands/mcp.py).

See docs/mcp.md.
"""

from services.gateway.mcp.http import Caller, McpHttp, mcp_asgi_app, starlette_caller
from services.gateway.mcp.server import ALL_SCOPES, TOOL_SCOPES, build_server

__all__ = ["ALL_SCOPES", "TOOL_SCOPES", "Caller", "McpHttp", "build_server", "mcp_asgi_app", "starlette_caller"]
