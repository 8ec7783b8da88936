"""The gateway's transport-neutral core (services/gateway/operations.py) against a real
nats-server with the generator, validator and assembler running: one stack per module."""

from __future__ import annotations

import asyncio

import pytest
import pytest_asyncio
from nats.js.errors import NotFoundError

from contracts.envelope import decode
from services.gateway.operations import Accepted, GatewayError, Operations, Outcome, Pending, Trace
from services.gateway.settings import GatewaySettings
from tests.conftest import wait_for
from tests.gateway_stack import nats_stack

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory):
    async with nats_stack(tmp_path_factory.mktemp("gw-ops")) as (server, settings, nc):
        yield server, settings, nc


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def ops(stack):
    _, settings, nc = stack
    o = Operations(nc, settings, GatewaySettings(max_context_bytes=2048, max_batch_items=50))
    await o.start()
    yield o
    await o.close()


async def test_generate_answers_the_content_generated_data_within_the_timeout(ops):
    out = await ops.generate("hello-world", {"name": "Ada"}, timeout_s=20, trace=Trace("ops-trace-1"))
    assert isinstance(out, Outcome) and out.ok
    assert out.data["content"].startswith("# Hello, Ada!")
    assert out.event_type == "chora.content_generated" and out.trace_id == "ops-trace-1"
    assert out.data["request_id"] == out.request_id


async def test_past_the_timeout_pending_then_request_status_has_the_outcome(ops):
    out = await ops.generate("hello-world", {"name": "Late"}, timeout_s=0)
    assert isinstance(out, Pending) and out.location == f"/v1/requests/{out.request_id}"

    async def done():
        st = await ops.request_status(out.request_id)
        return st if st["state"] == "done" else None

    st = await wait_for(done, timeout=20, what="the late outcome recorded")
    assert st["kind"] == "generate" and st["outcome"]["content"].startswith("# Hello, Late!")


async def test_request_status_finds_in_the_stream_an_outcome_no_gateway_recorded(stack, ops):
    _, settings, nc = stack
    gone = Operations(nc, settings)
    await gone.start()
    out = await gone.generate("hello-world", {"name": "Orphan"}, timeout_s=0)
    await gone.close()  # the gateway that published it stops: nobody records its outcome
    assert isinstance(out, Pending)

    async def done():
        st = await ops.request_status(out.request_id)
        return st if st["state"] == "done" else None

    st = await wait_for(done, timeout=20, what="the outcome found in the stream")
    assert st["outcome"]["content"].startswith("# Hello, Orphan!")


async def test_unknown_request_is_404(ops):
    with pytest.raises(GatewayError) as e:
        await ops.request_status("no-such-request")
    assert (e.value.status, e.value.code) == (404, "REQUEST_NOT_FOUND")


@pytest.mark.parametrize(
    "call, status, code",
    [
        (lambda o: o.generate("no-such-config", {}), 404, "CONFIG_NOT_FOUND"),
        (lambda o: o.generate("Bad Id", {}), 422, "INVALID_CONFIG_ID"),
        (lambda o: o.generate("hello-world", "not an object"), 422, "INVALID_CONTEXT"),
        (lambda o: o.generate("hello-world", {"x": "y" * 5000}), 413, "CONTEXT_TOO_LARGE"),
        (lambda o: o.generate("hello-world", {}, callback_url="http://evil.example/x"), 422, "CALLBACK_REFUSED"),
        (lambda o: o.generate("hello-world", {}, callback_url="file:///etc/passwd"), 422, "CALLBACK_REFUSED"),
        (lambda o: o.generate("hello-world", {}, timeout_s=10_000), 422, "BAD_TIMEOUT"),
        (lambda o: o.assemble("no-such-artifact", {}), 404, "ARTIFACT_NOT_FOUND"),
        (lambda o: o.batch([]), 422, "INVALID_REQUEST"),
        (lambda o: o.batch([{"content_config_id": "hello-world"}] * 51), 413, "TOO_MANY_ITEMS"),
        (lambda o: o.batch([{"content_config_id": "nope-nope"}]), 404, "CONFIG_NOT_FOUND"),
        (lambda o: o.batch_status("no-such-batch"), 404, "BATCH_NOT_FOUND"),
    ],
)
async def test_refusals_carry_a_status_and_the_event_code(ops, call, status, code):
    with pytest.raises(GatewayError) as e:
        await call(ops)
    assert (e.value.status, e.value.code) == (status, code), e.value.detail


async def test_an_allowed_callback_travels_in_the_request(stack, ops):
    _, settings, nc = stack
    out = await ops.generate("hello-world", {}, timeout_s=20, callback_url="http://127.0.0.1:9/hooks/n8n")
    assert isinstance(out, Outcome) and out.ok
    # on the subject of requests with a callback, the one the notifier reads
    subject = f"{settings.prefix}.generation.requested.callback"
    stored = await nc.jetstream().get_last_msg(settings.stream_name, subject)
    request = decode(stored.headers, stored.data)
    assert request.id == out.request_id and request.data.callback_url == "http://127.0.0.1:9/hooks/n8n"


async def test_assemble_answers_the_artifact(ops):
    out = await ops.assemble("product-docs", {"product": "Acme"}, timeout_s=60)
    assert isinstance(out, Outcome) and out.ok, out.data
    assert out.event_type == "chora.artifact_assembled" and out.data["content"].startswith("# Acme")


async def test_batch_progress_and_paged_results_with_content(ops):
    items = [{"content_config_id": "hello-world", "context": {"name": f"N{i}"}} for i in range(7)]
    items.append({"content_config_id": "release-notes", "context": {"version": 3}})
    acc = await ops.batch(items, {}, True)
    assert isinstance(acc, Accepted) and acc.location == f"/v1/batches/{acc.batch_id}" and acc.total == 8

    async def finished():
        st = await ops.batch_status(acc.batch_id)
        return st if st["state"] == "finished" else None

    st = await wait_for(finished, timeout=30, what="the batch finished")
    assert st["total"] == 8 and st["done"] == 8 and st["trace_id"] == acc.trace_id

    page1 = await ops.batch_results(acc.batch_id, cursor=0, limit=5)
    assert [i["index"] for i in page1["items"]] == [0, 1, 2, 3, 4] and page1["next_cursor"] == 5
    assert page1["items"][2]["content"].startswith("# Hello, N2!")
    page2 = await ops.batch_results(acc.batch_id, cursor=5, limit=5)
    assert [i["index"] for i in page2["items"]] == [5, 6, 7] and page2["next_cursor"] is None
    assert all(i["status"] in ("success", "error") for i in page2["items"])


async def test_concurrent_requests_share_one_consumer(stack, ops):
    _, settings, nc = stack
    js = nc.jetstream()
    assert isinstance(await ops.generate("hello-world", {"name": "warm"}, timeout_s=30), Outcome)  # following now
    before = (await js.stream_info(settings.stream_name)).state.consumer_count
    outs = await asyncio.gather(*(ops.generate("hello-world", {"name": f"C{i}"}, timeout_s=30) for i in range(40)))
    during = (await js.stream_info(settings.stream_name)).state.consumer_count
    assert all(isinstance(o, Outcome) and o.data["content"].startswith(f"# Hello, C{i}!") for i, o in enumerate(outs))
    assert during == before  # no consumer per request


async def test_the_outcome_follower_runs_only_while_requests_wait(stack):
    _, settings, nc = stack
    js = nc.jetstream()
    o = Operations(nc, settings, GatewaySettings(follow_idle_s=0.3))
    await o.start()
    try:
        assert not o.waiter.following  # started, but reading no outcome: none waits
        late = await o.generate("hello-world", {"name": "Lazy"}, timeout_s=0)
        assert isinstance(late, Pending) and o.waiter.following
        consumer = (await o.waiter.follower._sub.consumer_info()).name
        # nothing waits any more: the follower stops, and the server sends it nothing more (its
        # consumer has no subscriber; the server drops it after its inactive threshold)
        await wait_for(lambda: not o.waiter.following, timeout=10, what="the idle follower stopped")

        async def unbound():
            try:
                return not (await js.consumer_info(settings.stream_name, consumer)).push_bound
            except NotFoundError:
                return True

        await wait_for(unbound, timeout=10, what="its consumer without a subscriber")
        # the late outcome is answered (recorded, or found in the stream once forgotten), and the
        # next request follows again
        st = await wait_for(lambda: _done(o, late.request_id), timeout=20, what="the late outcome answered")
        assert st["outcome"]["content"].startswith("# Hello, Lazy!")
        out = await o.generate("hello-world", {"name": "Again"}, timeout_s=20)
        assert isinstance(out, Outcome) and out.data["content"].startswith("# Hello, Again!")
    finally:
        await o.close()


async def test_a_request_is_a_clear_503_while_the_follower_is_re_created(stack):
    _, settings, nc = stack
    o = Operations(nc, settings, GatewaySettings())
    await o.start()
    try:
        o.waiter.start_timeout_s = 0.2
        await o.waiter._lock.acquire()  # as the watchdog holds it while it re-creates a lost consumer
        try:
            with pytest.raises(GatewayError) as e:
                await o.generate("hello-world", {"name": "Busy"}, timeout_s=5)
            assert (e.value.status, e.value.code) == (503, "BUS_UNAVAILABLE") and "re-created" in e.value.detail
        finally:
            o.waiter._lock.release()
        out = await o.generate("hello-world", {"name": "After"}, timeout_s=20)
        assert isinstance(out, Outcome) and out.data["content"].startswith("# Hello, After!")
    finally:
        await o.close()


async def _done(o: Operations, request_id: str) -> dict | None:
    st = await o.request_status(request_id)
    return st if st["state"] == "done" else None


async def test_capabilities_list_generators_configs_limits_and_events(ops):
    caps = await ops.capabilities()
    assert caps["server"]["api_version"] == "v1" and "generate" in caps["server"]["features"]
    gens = {g["name"]: g for g in caps["generators"]["generators"]}
    assert gens["jinja2"]["ready"] is True
    assert "ANTHROPIC_API_KEY" in gens["code_generation"]["credentials"]
    configs = {c["id"]: c for c in caps["configs"]}
    assert configs["hello-world"]["context"]["name"] == "World" and configs["product-docs"]["kind"] == "artifact"
    assert caps["limits"]["max_batch_items"] == 50
    events = {e["type"]: e for e in caps["events"]}
    assert events["chora.content_generated"]["schema"] == "/v1/schemas/chora.content_generated"
