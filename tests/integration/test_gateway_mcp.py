"""The MCP server (services/gateway/mcp) through the SDK's own client, over both transports,
against one stack per module (a real nats-server, the generator, validator and assembler):

- stdio: `python -m chora mcp` spawned by the SDK's stdio client, connected to the stack;
- streamable HTTP: the gateway's own /mcp (GatewayApp: uvicorn on a free port), behind its
  API keys with scopes and its rate limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from types import SimpleNamespace
from typing import Any, AsyncIterator

import httpx2
import pytest
import pytest_asyncio
from mcp import Client, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from services.gateway.mcp import TOOL_SCOPES
from services.gateway.security import ApiKey, KeyRing, hash_key
from services.gateway.service import GatewayApp
from services.gateway.settings import GatewaySettings
from tests.conftest import ROOT, child_env, wait_for
from tests.gateway_stack import nats_stack

pytestmark = pytest.mark.asyncio(loop_scope="module")

GATEWAY = GatewaySettings(max_batch_items=50, max_context_bytes=2048, default_timeout_s=20, max_body_bytes=64 * 1024)
KEYS = {  # key -> (name, scopes)
    "key-all": ("all", ["generate", "batch", "read"]),
    "key-no-batch": ("no-batch", ["generate", "read"]),
    "key-generate-only": ("generate-only", ["generate"]),
}
INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}},
}
MCP_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


@contextlib.asynccontextmanager
async def held(cm) -> AsyncIterator[Any]:
    """``cm`` entered and exited by one task of its own (anyio task groups want that), its
    value usable from the tests' tasks meanwhile."""
    ready: asyncio.Future = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()

    async def hold() -> None:
        try:
            async with cm as value:
                ready.set_result(value)
                await stop.wait()
        except BaseException as e:
            if not ready.done():
                ready.set_exception(e)
            raise

    task = asyncio.create_task(hold())
    try:
        yield await asyncio.wait_for(asyncio.shield(ready), 60)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory):
    async with nats_stack(tmp_path_factory.mktemp("gw-mcp")) as (server, settings, nc):
        yield server, settings, nc


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stdio(stack, tmp_path_factory):
    server, settings, _ = stack
    env = child_env(
        NATS_URL=server.url,
        CHORA_PREFIX=settings.prefix,
        CHORA_CONFIGS_DIR=str(settings.configs_dir),
        CHORA_HOME=str(settings.home),
        CHORA_GATEWAY_DEFAULT_TIMEOUT_S="20",
        CHORA_GATEWAY_MAX_BATCH_ITEMS="50",
        CHORA_GATEWAY_MAX_CONTEXT_BYTES="2048",
    )
    params = StdioServerParameters(command=sys.executable, args=["-m", "chora", "mcp"], env=env, cwd=str(ROOT))
    with open(tmp_path_factory.mktemp("mcp-stdio") / "stderr.log", "w+") as errlog:
        async with held(Client(stdio_client(params, errlog=errlog))) as client:
            yield client


# ---------------------------------------------------------------------- the HTTP side
@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gateway_url(stack):
    """The real gateway (uvicorn on a free port), its /mcp behind its own API keys and scopes."""
    _, settings, nc = stack
    ring = KeyRing([ApiKey(name, hash_key(key), frozenset(scopes)) for key, (name, scopes) in KEYS.items()])
    gw = GatewayApp(settings, GATEWAY.model_copy(update={"port": 0}), keys=ring)
    await gw.start(SimpleNamespace(connection=nc))
    try:
        yield f"{gw.url}/mcp"
    finally:
        await gw.close()


@contextlib.asynccontextmanager
async def over_http(url: str, key: str) -> AsyncIterator[Client]:
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30, read=120)) as hc:
        async with Client(streamable_http_client(url, http_client=hc)) as client:
            yield client


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def http(gateway_url):
    async with held(over_http(gateway_url, "key-all")) as client:
        yield client


@pytest.fixture(params=["stdio", "http"])
def client(request):
    return request.getfixturevalue(request.param)


def error_of(result) -> dict[str, Any]:
    assert result.is_error, result
    return result.structured_content["error"]


# ---------------------------------------------------------------------- both transports
async def test_tools_are_listed_with_their_input_and_output_schemas(client):
    tools = {t.name: t for t in (await client.list_tools()).tools}
    assert set(tools) == set(TOOL_SCOPES)
    gen = tools["generate_content"]
    assert gen.input_schema["required"] == ["content_config_id"]
    props = gen.input_schema["properties"]
    assert props["content_config_id"]["maxLength"] == 128 and props["content_config_id"]["description"]
    timeout = next(s for s in props["timeout_s"]["anyOf"] if s.get("type") == "number")
    assert timeout["maximum"] == GATEWAY.max_timeout_s and timeout["minimum"] == 0
    items = tools["batch_generate"].input_schema["properties"]["items"]
    assert items["maxItems"] == 50 and items["minItems"] == 1
    assert gen.output_schema["properties"]["state"]["enum"] == ["done", "pending"]
    assert tools["list_configs"].annotations.read_only_hint is True


async def test_generate_content_answers_the_content(client):
    result = await client.call_tool(
        "generate_content", {"content_config_id": "hello-world", "context": {"name": "Ada"}}
    )
    assert not result.is_error, result.content
    out = result.structured_content
    assert out["state"] == "done" and out["status"] == "success" and out["kind"] == "generate"
    assert out["content"].startswith("# Hello, Ada!")
    assert json.loads(result.content[0].text)["request_id"] == out["request_id"]


async def test_list_configs_lists_content_configs_and_artifacts(client):
    result = await client.call_tool("list_configs", {})
    configs = {c["id"]: c for c in result.structured_content["configs"]}
    assert configs["hello-world"]["kind"] == "content" and configs["hello-world"]["context"]["name"] == "World"
    assert configs["product-docs"]["kind"] == "artifact"
    only = await client.call_tool("list_configs", {"kind": "artifact"})
    assert {c["kind"] for c in only.structured_content["configs"]} == {"artifact"}


async def test_the_three_capabilities_resources_are_json(client):
    listed = {str(r.uri): r for r in (await client.list_resources()).resources}
    uris = ["capabilities://server", "capabilities://generators", "capabilities://configs"]
    assert set(uris) <= set(listed) and all(listed[u].mime_type == "application/json" for u in uris)
    docs = {}
    for uri in uris:
        (contents,) = (await client.read_resource(uri)).contents
        docs[uri] = json.loads(contents.text)
    assert docs["capabilities://server"]["name"] == "chora-compose"
    assert docs["capabilities://server"]["limits"]["max_batch_items"] > 0
    gens = {g["name"]: g for g in docs["capabilities://generators"]["generators"]}
    assert gens["jinja2"]["ready"] is True
    assert "hello-world" in {c["id"] for c in docs["capabilities://configs"]["configs"]}


async def test_an_unknown_config_is_a_tool_error_with_config_not_found(client):
    result = await client.call_tool("generate_content", {"content_config_id": "no-such-config"})
    error = error_of(result)
    assert error["code"] == "CONFIG_NOT_FOUND" and error["status"] == 404
    assert result.content[0].text.startswith("CONFIG_NOT_FOUND: ")


async def test_bad_arguments_are_tool_errors_not_crashes(client):
    big = await client.call_tool("generate_content", {"content_config_id": "hello-world", "context": {"x": "y" * 5000}})
    assert error_of(big)["code"] == "CONTEXT_TOO_LARGE"
    trace = await client.call_tool("generate_content", {"content_config_id": "hello-world", "trace_id": "bad trace"})
    assert error_of(trace)["code"] == "BAD_TRACE_ID"
    schema = await client.call_tool("batch_results", {"batch_id": "x", "limit": 0})
    assert schema.is_error and "limit" in schema.content[0].text
    # and the server still answers
    assert not (await client.call_tool("list_configs", {})).is_error


# ---------------------------------------------------------------------- stdio only
async def test_stdio_stdout_carries_only_the_protocol_and_stdin_closed_ends_it(stack):
    server, settings, _ = stack
    env = child_env(NATS_URL=server.url, CHORA_PREFIX=settings.prefix, CHORA_CONFIGS_DIR=str(settings.configs_dir))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "chora", "-v", "mcp", cwd=ROOT, env=env,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(INITIALIZE).encode() + b"\n")
    await proc.stdin.drain()
    proc.stdin.close()
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    assert lines and all(json.loads(line)["jsonrpc"] == "2.0" for line in lines), out
    assert json.loads(lines[0])["result"]["serverInfo"]["name"] == "chora-compose"
    assert b"DEBUG" in err  # -v logs went somewhere: stderr


# ---------------------------------------------------------------------- HTTP only
@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer wrong-key"}, {"Authorization": "Basic a2V5LWFsbA=="}]
)
async def test_http_without_a_valid_key_is_401(gateway_url, headers):
    async with httpx2.AsyncClient() as hc:
        r = await hc.post(gateway_url, json=INITIALIZE, headers={**MCP_HEADERS, **headers})
    assert r.status_code == 401 and r.json()["code"] == "UNAUTHORIZED"


async def test_http_a_body_over_the_limit_is_413(gateway_url):
    body = {**INITIALIZE, "params": {**INITIALIZE["params"], "pad": "x" * (GATEWAY.max_body_bytes + 1)}}
    async with httpx2.AsyncClient() as hc:
        r = await hc.post(gateway_url, json=body, headers={**MCP_HEADERS, "Authorization": "Bearer key-all"})
    assert r.status_code == 413


async def test_http_a_key_without_the_batch_scope_cannot_call_batch_generate(gateway_url):
    async with over_http(gateway_url, "key-no-batch") as client:
        refused = await client.call_tool("batch_generate", {"items": [{"content_config_id": "hello-world"}]})
        error = error_of(refused)
        assert error["code"] == "FORBIDDEN" and error["status"] == 403 and "'batch'" in error["message"]
        allowed = await client.call_tool("generate_content", {"content_config_id": "hello-world"})
        assert not allowed.is_error and allowed.structured_content["content"].startswith("# Hello, World!")


async def test_http_a_key_without_read_can_neither_list_configs_nor_read_resources(gateway_url):
    async with over_http(gateway_url, "key-generate-only") as client:
        assert error_of(await client.call_tool("list_configs", {}))["code"] == "FORBIDDEN"
        with pytest.raises(MCPError, match="FORBIDDEN"):
            await client.read_resource("capabilities://configs")


async def test_http_past_the_timeout_pending_then_request_status_has_the_outcome(http):
    result = await http.call_tool(
        "generate_content", {"content_config_id": "hello-world", "context": {"name": "Late"}, "timeout_s": 0}
    )
    pending = result.structured_content
    assert pending["state"] == "pending" and "request_status" in pending["poll"]

    async def done():
        st = await http.call_tool("request_status", {"request_id": pending["request_id"]})
        assert not st.is_error, st.content
        return st.structured_content if st.structured_content["state"] == "done" else None

    out = await wait_for(done, timeout=30, what="the late outcome through request_status", interval=0.1)
    assert out["content"].startswith("# Hello, Late!") and out["request_id"] == pending["request_id"]


async def test_http_assemble_artifact_answers_the_artifact(http):
    result = await http.call_tool("assemble_artifact", {"artifact_id": "product-docs", "context": {"product": "Acme"}})
    assert not result.is_error, result.content
    out = result.structured_content
    assert out["state"] == "done" and out["kind"] == "assemble" and out["content"].startswith("# Acme")
    assert out["outcome"]["parts_count"] > 1


async def test_http_batch_generate_then_status_and_results_until_done(http):
    items = [{"content_config_id": "hello-world", "context": {"name": f"B{i}"}} for i in range(5)]
    accepted = await http.call_tool("batch_generate", {"items": items})
    assert not accepted.is_error, accepted.content
    batch_id = accepted.structured_content["batch_id"]
    assert accepted.structured_content["total"] == 5

    async def finished():
        st = await http.call_tool("batch_status", {"batch_id": batch_id})
        assert not st.is_error, st.content
        return st.structured_content if st.structured_content["state"] == "finished" else None

    status = await wait_for(finished, timeout=30, what="the batch finished", interval=0.1)
    assert status["done"] == 5 and status["status"] == "success"
    page = (await http.call_tool("batch_results", {"batch_id": batch_id, "limit": 3})).structured_content
    assert [i["index"] for i in page["items"]] == [0, 1, 2] and page["next_cursor"] == 3
    assert page["items"][1].get("content", "").startswith("# Hello, B1!"), page["items"]
    rest = (await http.call_tool("batch_results", {"batch_id": batch_id, "cursor": 3})).structured_content
    assert [i["index"] for i in rest["items"]] == [3, 4] and rest["next_cursor"] is None
    assert error_of(await http.call_tool("batch_status", {"batch_id": "no-such-batch"}))["code"] == "BATCH_NOT_FOUND"
