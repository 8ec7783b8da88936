"""The HTTP API v1 over a real uvicorn on a free port, httpx against it, the stack on a real
nats-server (one per module): every endpoint, every problem code, idempotency, SSE, limits."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import httpx2 as httpx
import pytest
import pytest_asyncio

from services.gateway.openapi import OPENAPI_PATH
from services.gateway.security import ApiKey, KeyRing, hash_key
from services.gateway.service import GatewayApp
from services.gateway.settings import GatewaySettings
from tests.conftest import wait_for
from tests.gateway_stack import nats_stack

pytestmark = pytest.mark.asyncio(loop_scope="module")

KEYS = {
    "admin": ["admin"],
    "reader": ["read"],
    "maker": ["generate", "read"],
    "batcher": ["batch"],
    "streamer": ["read"],  # only test_event_streams_are_capped_and_a_slot_comes_back: its own bucket
}


def keyring() -> KeyRing:
    return KeyRing([ApiKey(name, hash_key(f"key-{name}"), frozenset(scopes)) for name, scopes in KEYS.items()])


def auth(name: str = "admin") -> dict[str, str]:
    return {"Authorization": f"Bearer key-{name}"}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory):
    async with nats_stack(tmp_path_factory.mktemp("gw-http")) as s:
        yield s


async def _gateway(stack, **overrides):
    _, settings, nc = stack
    gw = GatewayApp(settings, GatewaySettings(port=0, **overrides), keys=keyring())
    await gw.start(SimpleNamespace(connection=nc))
    return gw


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gw(stack):
    app = await _gateway(stack, rate_per_s=1000, rate_burst=1000)
    yield app
    await app.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def strict(stack):
    """A second gateway on the same stack with small limits."""
    app = await _gateway(stack, max_body_bytes=2000, rate_per_s=0.5, rate_burst=3, max_event_streams=1)
    yield app
    await app.close()


@pytest_asyncio.fixture(loop_scope="module")
async def client(gw):
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as c:
        yield c


def assert_problem(r, status: int, code: str):
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    doc = r.json()
    assert doc["status"] == status and doc["code"] == code, doc
    assert doc["type"].endswith(code.lower().replace("_", "-")) and doc["title"] and doc["detail"]
    assert doc["trace_id"] == r.headers["x-trace-id"]
    return doc


# --------------------------------------------------------------------------- requests


async def test_generate_within_the_timeout_is_200_with_the_content_and_the_trace(client):
    r = await client.post(
        "/v1/generate",
        json={"content_config_id": "hello-world", "context": {"name": "Ada"}},
        headers={**auth(), "X-Trace-ID": "http-trace-1"},
    )
    assert r.status_code == 200, r.text
    assert r.json()["content"].startswith("# Hello, Ada!") and r.json()["status"] == "success"
    assert r.headers["x-trace-id"] == "http-trace-1" and r.headers["traceparent"].startswith("00-")


async def test_a_traceparent_in_gives_its_trace_id_out(client):
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    r = await client.post(
        "/v1/generate", json={"content_config_id": "hello-world"}, headers={**auth(), "traceparent": tp}
    )
    assert r.status_code == 200
    assert r.headers["x-trace-id"] == "0af7651916cd43dd8448eb211c80319c"
    assert r.headers["traceparent"].split("-")[1] == "0af7651916cd43dd8448eb211c80319c"


@pytest.mark.parametrize(
    "how", [{"params": {"timeout": 0}}, {"headers": {"Prefer": "respond-async"}}, {"headers": {"Prefer": "wait=0"}}]
)
async def test_past_the_timeout_202_with_a_location_to_poll(client, how):
    headers = {**auth(), **how.get("headers", {})}
    r = await client.post(
        "/v1/generate",
        json={"content_config_id": "hello-world", "context": {"name": "Poll"}},
        params=how.get("params"),
        headers=headers,
    )
    assert r.status_code == 202, r.text
    location = r.headers["location"]
    assert location == f"/v1/requests/{r.json()['request_id']}" and r.json()["state"] == "pending"
    if "Prefer" in headers:
        assert r.headers["preference-applied"] in ("respond-async", "wait=0")

    async def done():
        p = await client.get(location, headers=auth("reader"))
        return p.json() if p.status_code == 200 and p.json()["state"] == "done" else None

    st = await wait_for(done, timeout=20, what="the polled request done")
    assert st["outcome"]["content"].startswith("# Hello, Poll!")


async def test_artifacts_is_200_with_the_artifact(client):
    r = await client.post(
        "/v1/artifacts",
        json={"artifact_id": "product-docs", "context": {"product": "Acme"}},
        params={"timeout": 60},
        headers=auth("maker"),
    )
    assert r.status_code == 200, r.text
    assert r.json()["content"].startswith("# Acme") and r.json()["artifact_id"] == "product-docs"


async def test_a_failed_generation_is_a_problem_with_the_event_code(client):
    r = await client.post(
        "/v1/generate", json={"content_config_id": "api-endpoint-doc", "context": {"auth": {}}}, headers=auth()
    )
    doc = assert_problem(r, 422, "MISSING_VARIABLE")
    assert doc["outcome"]["status"] == "error" and doc["request_id"]


async def test_batches_202_then_progress_and_paged_results(client):
    items = [{"content_config_id": "hello-world", "context": {"name": f"B{i}"}} for i in range(5)]
    r = await client.post("/v1/batches", json={"items": items, "continue_on_error": True}, headers=auth("batcher"))
    assert r.status_code == 202, r.text
    location = r.headers["location"]
    assert location == f"/v1/batches/{r.json()['batch_id']}"

    async def finished():
        p = await client.get(location, headers=auth("reader"))
        return p.json() if p.json().get("state") == "finished" else None

    st = await wait_for(finished, timeout=30, what="the batch finished")
    assert st["total"] == 5 and st["successful"] == 5 and st["status"] == "success"
    page = (await client.get(f"{location}/results", params={"limit": 3}, headers=auth("reader"))).json()
    assert [i["index"] for i in page["items"]] == [0, 1, 2] and page["items"][1]["content"].startswith("# Hello, B1!")
    rest = (await client.get(page["next"], headers=auth("reader"))).json()
    assert [i["index"] for i in rest["items"]] == [3, 4] and rest["next_cursor"] is None and "next" not in rest
    bare = (await client.get(f"{location}/results", params={"content": "false"}, headers=auth("reader"))).json()
    assert all("content" not in i for i in bare["items"])


# --------------------------------------------------------------------------- problems


async def test_unknown_request_batch_and_route_are_404_problems(client):
    assert_problem(await client.get("/v1/requests/nope", headers=auth()), 404, "REQUEST_NOT_FOUND")
    assert_problem(await client.get("/v1/batches/nope", headers=auth()), 404, "BATCH_NOT_FOUND")
    assert_problem(await client.get("/v1/nothing-here", headers=auth()), 404, "NOT_FOUND")
    assert_problem(
        await client.post("/v1/generate", json={"content_config_id": "no-such"}, headers=auth()),
        404,
        "CONFIG_NOT_FOUND",
    )
    assert_problem(await client.delete("/v1/generate", headers=auth()), 405, "METHOD_NOT_ALLOWED")


async def test_missing_or_wrong_key_is_401_and_a_missing_scope_403(client):
    r = await client.post("/v1/generate", json={"content_config_id": "hello-world"})
    assert_problem(r, 401, "UNAUTHORIZED")
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert_problem(await client.get("/v1/configs", headers={"Authorization": "Bearer wrong"}), 401, "UNAUTHORIZED")
    assert_problem(await client.get("/v1/configs", headers={"X-API-Key": "wrong"}), 401, "UNAUTHORIZED")
    assert (await client.get("/v1/configs", headers={"X-API-Key": "key-reader"})).status_code == 200
    r = await client.post("/v1/generate", json={"content_config_id": "hello-world"}, headers=auth("reader"))
    assert_problem(r, 403, "FORBIDDEN")
    assert_problem(
        await client.post("/v1/batches", json={"items": [{"content_config_id": "hello-world"}]}, headers=auth("maker")),
        403,
        "FORBIDDEN",
    )
    assert_problem(await client.get("/v1/configs", headers=auth("batcher")), 403, "FORBIDDEN")


@pytest.mark.parametrize(
    "body, code",
    [
        ({}, "INVALID_REQUEST"),
        ({"content_config_id": "hello-world", "surprise": 1}, "INVALID_REQUEST"),
        ({"content_config_id": "Bad Id"}, "INVALID_CONFIG_ID"),
        ({"content_config_id": "hello-world", "context": []}, "INVALID_REQUEST"),
        ({"content_config_id": "hello-world", "callback_url": "http://169.254.169.254/latest"}, "CALLBACK_REFUSED"),
        ({"content_config_id": "hello-world", "callback_url": "gopher://127.0.0.1:9/hooks/"}, "CALLBACK_REFUSED"),
    ],
)
async def test_bad_bodies_are_422_problems_with_a_code(client, body, code):
    doc = assert_problem(await client.post("/v1/generate", json=body, headers=auth()), 422, code)
    if code == "CALLBACK_REFUSED":
        assert "allow-list" in doc["detail"] or "http or https" in doc["detail"]


async def test_not_json_bad_timeout_and_bad_trace_id(client):
    r = await client.post("/v1/generate", content=b"{not json", headers={**auth(), "Content-Type": "application/json"})
    assert_problem(r, 422, "INVALID_REQUEST")
    r = await client.post(
        "/v1/generate", json={"content_config_id": "hello-world"}, params={"timeout": 99999}, headers=auth()
    )
    assert_problem(r, 422, "BAD_TIMEOUT")
    r = await client.get("/v1/configs", headers={**auth(), "X-Trace-ID": "bad trace id!"})
    assert r.status_code == 400 and r.json()["code"] == "BAD_TRACE_ID"


async def test_a_body_over_the_limit_is_413_declared_or_chunked(strict):
    async with httpx.AsyncClient(base_url=strict.url) as c:
        big = {"content_config_id": "hello-world", "context": {"x": "y" * 5000}}
        assert_problem(await c.post("/v1/generate", json=big, headers=auth()), 413, "BODY_TOO_LARGE")

        async def chunks():
            for _ in range(10):
                yield b" " * 500

        r = await c.post("/v1/generate", content=chunks(), headers={**auth(), "Content-Type": "application/json"})
        assert "content-length" not in r.request.headers
        assert_problem(r, 413, "BODY_TOO_LARGE")


async def test_the_rate_limit_is_429_with_retry_after(strict):
    async with httpx.AsyncClient(base_url=strict.url) as c:
        codes = [(await c.get("/v1/capabilities/server", headers=auth("reader"))).status_code for _ in range(5)]
        assert codes[:3] == [200, 200, 200] and 429 in codes[3:]
        r = await c.get("/v1/capabilities/server", headers=auth("reader"))
        assert_problem(r, 429, "RATE_LIMITED")
        assert int(r.headers["retry-after"]) >= 1
        # another key has its own bucket
        assert (await c.get("/v1/capabilities/server", headers=auth("maker"))).status_code == 200


# --------------------------------------------------------------------------- idempotency


async def _requests_of_trace(stack, trace: str) -> int:
    from services.gateway.outcomes import scan

    _, settings, nc = stack
    found = await scan(
        nc, settings.stream_name, f"{settings.prefix}.generation.requested", 1, lambda e: e.traceid == trace, want=100
    )
    return len(found)


async def test_a_repeated_idempotency_key_answers_the_first_response_and_publishes_once(stack, client):
    body = {"content_config_id": "hello-world", "context": {"name": "Once"}}
    h = {**auth(), "Idempotency-Key": "k-replay", "X-Trace-ID": "idem-replay"}
    first = await client.post("/v1/generate", json=body, headers=h)
    again = await client.post("/v1/generate", json=body, headers=h)
    assert first.status_code == again.status_code == 200
    assert again.json() == first.json() and again.headers["idempotent-replayed"] == "true"
    assert await _requests_of_trace(stack, "idem-replay") == 1
    other = await client.post("/v1/generate", json={**body, "context": {"name": "Twice"}}, headers=h)
    assert_problem(other, 422, "IDEMPOTENCY_KEY_REUSED")
    # the same key from another API key is another key
    mine = await client.post("/v1/generate", json=body, headers={**auth("maker"), "Idempotency-Key": "k-replay"})
    assert mine.status_code == 200 and "idempotent-replayed" not in mine.headers


async def test_concurrent_duplicates_do_not_both_publish(stack, client):
    body = {"content_config_id": "hello-world", "context": {"name": "Race"}}
    h = {**auth(), "Idempotency-Key": "k-race", "X-Trace-ID": "idem-race"}
    rs = await asyncio.gather(*(client.post("/v1/generate", json=body, headers=h) for _ in range(8)))
    assert {r.status_code for r in rs} <= {200, 409}
    ids = {r.json()["request_id"] for r in rs if r.status_code == 200}
    assert len(ids) == 1
    for r in rs:
        if r.status_code == 409:
            assert r.json()["code"] == "IDEMPOTENCY_IN_PROGRESS" and r.headers["retry-after"] == "1"
    assert await _requests_of_trace(stack, "idem-race") == 1


async def test_idempotent_batch_replays_its_202(client):
    body = {"items": [{"content_config_id": "hello-world"}]}
    h = {**auth(), "Idempotency-Key": "k-batch"}
    a, b = [await client.post("/v1/batches", json=body, headers=h) for _ in range(2)]
    assert a.status_code == b.status_code == 202 and a.json()["batch_id"] == b.json()["batch_id"]
    assert b.headers["location"] == a.headers["location"]


# --------------------------------------------------------------------------- events


async def _sse_events(response, until: int, into: list[dict]):
    event: dict = {}
    async for line in response.aiter_lines():
        if line.startswith("id: "):
            event["id"] = int(line[4:])
        elif line.startswith("event: "):
            event["event"] = line[7:]
        elif line.startswith("data: "):
            event["data"] = json.loads(line[6:])
        elif line == "" and event:
            into.append(event)
            event = {}
            if len(into) >= until:
                return


async def test_events_replay_the_trace_then_follow_live(client):
    h = {**auth(), "X-Trace-ID": "sse-trace-1"}
    assert (await client.post("/v1/generate", json={"content_config_id": "hello-world"}, headers=h)).status_code == 200
    got: list[dict] = []
    async with client.stream("GET", "/v1/events", params={"trace_id": "sse-trace-1"}, headers=auth("reader")) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        reading = asyncio.create_task(_sse_events(r, 6, got))
        await wait_for(lambda: len(got) >= 3, timeout=20, what="the replayed request, content_generated, validated")
        assert {e["event"] for e in got[:3]} == {
            "chora.generation.requested",
            "chora.content_generated",
            "chora.content_validated",
        }
        live = await client.post(
            "/v1/generate", json={"content_config_id": "hello-world", "context": {"name": "Live"}}, headers=h
        )
        await asyncio.wait_for(reading, 20)
        assert [e["id"] for e in got] == sorted(e["id"] for e in got)
        assert any(e["data"]["data"].get("request_id") == live.json()["request_id"] for e in got[3:])
        assert all(e["data"]["traceid"] == "sse-trace-1" for e in got)


async def test_event_streams_are_capped_and_a_slot_comes_back(strict):
    async with httpx.AsyncClient(base_url=strict.url, timeout=10) as c:
        h = auth("streamer")
        async with c.stream("GET", "/v1/events", params={"trace_id": "cap-1"}, headers=h) as first:
            assert first.status_code == 200
            lines = first.aiter_lines()  # (kept: a dropped iterator is closed by the GC, mid-request)
            assert (await lines.__anext__()).startswith(": events of trace cap-1")  # the stream is set up
            assert_problem(
                await c.get("/v1/events", params={"trace_id": "cap-2"}, headers=auth("maker")), 503, "TOO_MANY_STREAMS"
            )

        async def reopened():
            async with c.stream("GET", "/v1/events", params={"trace_id": "cap-3"}, headers=auth("streamer")) as r:
                return r.status_code == 200

        # polled gently: each attempt spends a token of the strict gateway's small rate limit
        assert await wait_for(reopened, timeout=20, what="a stream slot given back after the disconnect", interval=0.25)


async def test_events_refuse_an_unknown_type_and_a_bad_trace_id(client):
    assert_problem(
        await client.get("/v1/events", params={"trace_id": "t", "type": "chora.nope"}, headers=auth()),
        422,
        "UNKNOWN_EVENT_TYPE",
    )
    assert_problem(
        await client.get("/v1/events", params={"trace_id": "bad id"}, headers=auth()), 422, "INVALID_REQUEST"
    )


# --------------------------------------------------------------------------- discovery and health


async def test_capabilities_configs_schemas_and_health(client):
    caps = (await client.get("/v1/capabilities", headers=auth("reader"))).json()
    assert set(caps) == {"server", "generators", "configs", "limits", "events"}
    for part in ("server", "generators", "configs", "limits", "events"):
        r = await client.get(f"/v1/capabilities/{part}", headers=auth("reader"))
        assert r.status_code == 200 and r.json() == caps[part], part
    assert {g["name"] for g in caps["generators"]["generators"]} >= {"jinja2", "template_fill"}
    configs = (await client.get("/v1/configs", headers=auth("reader"))).json()
    assert any(c["id"] == "hello-world" and "name" in c["context"] for c in configs)
    schema_link = next(e["schema"] for e in caps["events"] if e["type"] == "chora.content_generated")
    schema = (await client.get(schema_link, headers=auth("reader"))).json()
    assert schema["title"] == "chora.content_generated"
    assert_problem(await client.get("/v1/schemas/chora.nope"), 404, "UNKNOWN_EVENT_TYPE")
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    assert (await client.get("/readyz")).json() == {"status": "ready"}
    served = (await client.get("/openapi.json")).json()
    assert served == json.loads(OPENAPI_PATH.read_text())  # the checked-in document is what is served
