"""chora_client against the real stack (`chora up` as a subprocess, one for the module):
generation, artifacts and batches awaited, trace context in and out, a clear timeout,
and a durable consumer of outcomes that keeps what was published while it was away."""

from __future__ import annotations

import asyncio
import uuid

import nats
import pytest

from chora_client import ChoraClient, ChoraClientError, OutcomeTimeout
from contracts.catalogue import CONTENT_GENERATED, events_stream
from contracts.events import BatchItem, ContentGenerated
from contracts.tracing import parse_traceparent
from tests.conftest import wait_for
from tests.e2e.test_up_and_generate import jsonl, running_stack


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with running_stack(tmp_path_factory.mktemp("client-stack")) as info:
        yield info


@pytest.fixture
async def client(stack):
    async with await ChoraClient.connect(stack["nats_url"], prefix=stack["prefix"], source="urn:test:client") as c:
        yield c


async def test_generate_awaits_the_content_and_its_verdict(client, stack):
    trace = "client-" + uuid.uuid4().hex[:8]
    result = await client.generate("hello-world", {"name": "Ada"}, trace_id=trace, timeout=60)
    assert result.ok and result.generated.status == "success"
    assert result.validated is not None and result.validated.valid
    assert "Ada" in (result.content or "")
    assert result.generated.request_id == result.request.id == result.validated.request_id
    assert result.trace_id == trace == result.request.traceid
    # the request went out as a CloudEvent with its attributes: the telemetry mirror has it

    def mirrored() -> list[dict]:
        return [e for e in jsonl(stack) if e.get("event_id") == result.request.id]

    await wait_for(mirrored, 30, "the request in the telemetry JSONL")
    (line,) = mirrored()
    assert (line["source"], line["trace_id"]) == ("urn:test:client", trace)
    assert line["traceparent"] == result.request.traceparent


async def test_a_caller_traceparent_makes_the_request_a_child_span(client):
    parent = "00-" + "4bf92f3577b34da6a3ce929d0e0e4736" + "-" + "00f067aa0ba902b7" + "-01"
    result = await client.generate("hello-world", {"name": "Lin"}, traceparent=parent, timeout=60)
    trace_id, span, _ = parse_traceparent(result.request.traceparent)
    assert trace_id == "4bf92f3577b34da6a3ce929d0e0e4736" and span != "00f067aa0ba902b7"
    assert parse_traceparent(result.traceparent)[0] == trace_id  # the outcome is in the caller's trace
    with pytest.raises(ValueError, match="not W3C"):
        await client.generate("hello-world", traceparent="not-a-traceparent")


async def test_a_failed_generation_comes_back_with_its_code_and_no_verdict(client):
    result = await client.generate("no-such-config", timeout=60)
    assert not result.ok and result.validated is None
    assert result.generated.status == "error" and result.generated.error.code == "CONFIG_NOT_FOUND"


async def test_many_requests_at_once_each_get_their_own_outcome(client):
    names = [f"n{i}" for i in range(8)]
    results = await asyncio.gather(*(client.generate("hello-world", {"name": n}, timeout=90) for n in names))
    for name, result in zip(names, results):
        assert result.ok and name in (result.content or ""), (name, result.content)
    assert len({r.request.id for r in results}) == len(names)


async def test_assemble_and_run_batch(client):
    art = await client.assemble("product-docs", {"product": "Acme"}, timeout=120)
    assert art.ok and (art.content or "").startswith("# Acme"), art.assembled
    batch = await client.run_batch(
        [BatchItem(content_config_id="hello-world", context={"name": "A"}), {"content_config_id": "no-such-config"}],
        timeout=120,
    )
    done = batch.completed
    assert (done.batch_id, done.total, done.successful, done.failed) == (batch.request.id, 2, 1, 1)
    assert not batch.ok


async def test_no_outcome_in_time_is_a_clear_timeout(stack):
    """A prefix whose stream exists but where no service runs: the request is stored, never answered."""
    prefix = "q" + uuid.uuid4().hex[:8]
    nc = await nats.connect(stack["nats_url"])
    try:
        await nc.jetstream().add_stream(name=events_stream(prefix), subjects=[f"{prefix}.>"])
        async with ChoraClient(nc, prefix=prefix) as c:
            with pytest.raises(OutcomeTimeout) as e:
                await c.generate("hello-world", timeout=0.5)
        assert e.value.request.id in str(e.value) and "chora.content_generated" in str(e.value)
        assert "within 0.5s" in str(e.value) and isinstance(e.value, TimeoutError)
        assert not nc.is_closed  # a connection passed in stays the caller's
    finally:
        await nc.close()


async def test_a_prefix_without_a_stream_is_a_clear_error(stack):
    async with await ChoraClient.connect(stack["nats_url"], prefix="nostream" + uuid.uuid4().hex[:6]) as c:
        with pytest.raises(ChoraClientError, match="cannot follow the outcomes in stream NOSTREAM"):
            await c.generate("hello-world", timeout=5)


async def test_a_durable_consumer_gets_outcomes_including_those_from_while_it_was_away(client):
    durable = "team-b-" + uuid.uuid4().hex[:6]
    stream = await client.outcomes(durable, [CONTENT_GENERATED])
    first = await client.generate("hello-world", {"name": "one"}, validate=False, timeout=60)
    got = []
    async with asyncio.timeout(30):
        async for event in stream:
            got.append(event)
            break
    (event,) = got
    assert event.type == CONTENT_GENERATED and isinstance(event.data, ContentGenerated)
    assert event.data.request_id == first.request.id and event.traceparent == first.traceparent
    await stream.close()  # left unacknowledged: it would come back after the ack wait

    # away: this outcome is stored for the durable, and read when it is back
    second = await client.generate("hello-world", {"name": "two"}, validate=False, timeout=60)
    async with await client.outcomes(durable, [CONTENT_GENERATED]) as again:
        seen = [(await again.next(timeout=30)).data.request_id]
        while second.request.id not in seen:
            seen.append((await again.next(timeout=60)).data.request_id)
    assert set(seen) <= {first.request.id, second.request.id}
    with pytest.raises(ValueError, match="unknown event types: chora.nope"):
        await client.outcomes(durable, ["chora.nope"])
