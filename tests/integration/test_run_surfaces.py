"""The surfaces that ask for a cancel or read a batch's results, against one stack per module
(a real nats-server, the generator, validator and assembler in-process, the real gateway on
uvicorn): `chora batch cancel|results`, `chora artifact cancel|status` (cli.main in a thread),
``DELETE /v1/batches/{id}`` and ``DELETE /v1/artifacts/{id}``, the MCP tool ``cancel_run``,
``ChoraClient.cancel``, and the results TTL (2 s here).

The tests check what these surfaces own (the ``chora.cancel.requested`` in the stream with its
data and headers, the answers and exit codes), with run records written as the assembler
writes them; the assembler in the stack acts on the cancels (the saga: tests/integration/test_saga.py
covers it), and where a command follows the completion it is the assembler's."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
import uuid
from types import SimpleNamespace
from typing import Any

import httpx2 as httpx
import msgspec
import pytest
import pytest_asyncio

from bus.state import StateStore
from bus.topology import Topology
from chora import cli
from chora_client import ChoraClient
from composition.batch_records import BatchRecord, batch_item_key, batch_key, decode_batch
from composition.runs import artifact_key
from contracts.cancels import cancel_event_id
from contracts.catalogue import CANCEL_REQUESTED, subject_for
from contracts.envelope import decode
from contracts.events import BatchItemOutcome, ErrorInfo
from services.gateway.security import ApiKey, KeyRing, hash_key
from services.gateway.service import GatewayApp
from services.gateway.settings import GatewaySettings
from tests.conftest import wait_for
from tests.gateway_stack import nats_stack
from tests.integration.test_gateway_mcp import held, over_http

pytestmark = pytest.mark.asyncio(loop_scope="module")

TTL_S = 2
KEYS = {"all": ["generate", "batch", "read"], "reader": ["read"], "maker": ["generate", "read"]}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory):
    async with nats_stack(tmp_path_factory.mktemp("runs"), batch_results_ttl_s=TTL_S) as (server, settings, nc):
        ring = KeyRing([ApiKey(n, hash_key(f"key-{n}"), frozenset(s)) for n, s in KEYS.items()])
        gw = GatewayApp(settings, GatewaySettings(port=0), keys=ring)
        await gw.start(SimpleNamespace(connection=nc))
        env = {"CHORA_PREFIX": settings.prefix, "CHORA_HOME": str(settings.home), "NATS_URL": server.url}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)  # for cli.main, which reads its settings from the environment
        try:
            state = StateStore(nc.jetstream(), Topology.from_settings(settings).state_bucket)
            yield SimpleNamespace(server=server, settings=settings, nc=nc, gw=gw, state=state)
        finally:
            for k, v in saved.items():
                os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
            await gw.close()


@pytest_asyncio.fixture(loop_scope="module")
async def http(stack):
    async with httpx.AsyncClient(base_url=stack.gw.url, timeout=30) as c:
        yield c


def auth(name: str = "all") -> dict[str, str]:
    return {"Authorization": f"Bearer key-{name}"}


async def chora(capsys, *argv: str) -> tuple[int, Any, str]:
    """(exit code, the --json document or stdout, stderr) of `chora argv` run in-process."""
    code = await asyncio.to_thread(cli.main, list(argv))
    out, err = capsys.readouterr()
    try:
        return code, json.loads(out), err
    except json.JSONDecodeError:
        return code, out, err


async def write_batch(
    stack, total: int, *, closed=False, finished=False, outcomes=(), expire_at=None, batch_id=None
) -> str:
    """A batch record (and its item outcomes) as the assembler writes them; its id."""
    batch_id = batch_id or str(uuid.uuid4())
    failed = sum(1 for o in outcomes if o.status == "error")
    bitmap = bytearray((total + 7) // 8)
    for o in outcomes:
        bitmap[o.index >> 3] |= 1 << (o.index & 7)
    record = BatchRecord(
        bitmap=bytes(bitmap),
        total=total,
        started_at=time.time(),
        successful=len(outcomes) - failed,
        failed=failed,
        closed=closed,
        finished=finished,
        results_expire_at=expire_at,
    )
    for o in outcomes:
        await stack.state.put(batch_item_key(batch_id, o.index), msgspec.msgpack.encode(o))
    await stack.state.put(batch_key(batch_id), msgspec.msgpack.encode(record))
    return batch_id


async def write_artifact_run(stack, *, status: str | None = None, readable_by_the_assembler: bool = True) -> str:
    run_id = str(uuid.uuid4())
    doc = {"v": 1, "run_id": run_id, "artifact_id": "product-docs", "started_at": time.time()}
    if not readable_by_the_assembler:
        del doc["run_id"]
    if status is not None:
        doc.update(closed=True, status=status, finished=True)
    await stack.state.put(artifact_key(run_id), msgspec.msgpack.encode(doc))
    return run_id


async def last_cancel(stack) -> tuple[int, Any]:
    """(stream sequence, decoded event) of the last chora.cancel.requested, or (0, None)."""
    js = stack.nc.jetstream()
    try:
        msg = await js.get_last_msg(stack.settings.stream_name, subject_for(CANCEL_REQUESTED, stack.settings.prefix))
    except Exception:  # noqa: BLE001 - none yet
        return 0, None
    return msg.seq, decode(msg.headers, msg.data)


def ok(index: int) -> BatchItemOutcome:
    return BatchItemOutcome(index=index, content_config_id="hello-world", status="success", request_id=f"r{index}")


def bad(index: int) -> BatchItemOutcome:
    return BatchItemOutcome(
        index=index, content_config_id="hello-world", status="error", error=ErrorInfo(code="RENDER_FAILED", message="x")
    )


# ---------------------------------------------------------------------- CLI: cancel
async def test_cli_batch_cancel_publishes_one_cancel_request_with_its_data_and_headers(stack, capsys):
    batch_id = await write_batch(stack, 3, outcomes=[ok(0)])
    code, doc, err = await chora(capsys, "batch", "cancel", batch_id[:13], "--reason", "enough", "--json")
    assert code == 0, err
    assert doc["outcome"] == "requested" and doc["id"] == batch_id  # the prefix resolved to the batch
    assert doc["cancel_id"] == cancel_event_id("batch", batch_id)
    seq, ev = await last_cancel(stack)
    assert ev.type == CANCEL_REQUESTED and ev.id == doc["cancel_id"] and ev.source == "chora://cli"
    assert (ev.data.kind, ev.data.id, ev.data.reason) == ("batch", batch_id, "enough")
    js = stack.nc.jetstream()
    raw = await js.get_last_msg(stack.settings.stream_name, subject_for(CANCEL_REQUESTED, stack.settings.prefix))
    assert raw.headers["Nats-Msg-Id"] == doc["cancel_id"] and raw.headers["ce-type"] == CANCEL_REQUESTED

    # the assembler stops the batch; asking again then publishes nothing: it has completed
    async def cancelled():
        got = await stack.state.get(batch_key(batch_id))
        return got is not None and decode_batch(got[0]).outcome == "cancelled"

    await wait_for(cancelled, timeout=20, what="the assembler to close the batch as cancelled")
    code, doc, err = await chora(capsys, "batch", "cancel", batch_id, "--json")
    assert code == 1 and doc["outcome"] == "already_completed" and doc["status"] == "cancelled", err
    assert (await last_cancel(stack))[0] == seq


async def test_cli_cancel_of_an_unknown_or_completed_run_publishes_nothing(stack, capsys):
    before = (await last_cancel(stack))[0]
    code, doc, err = await chora(capsys, "batch", "cancel", "no-such-batch", "--json")
    assert code == 3 and doc["outcome"] == "not_found" and "no batch run no-such-batch" in err
    code, doc, err = await chora(capsys, "artifact", "cancel", "no-such-run")
    assert code == 3 and "no artifact run no-such-run" in err
    done = await write_batch(stack, 1, closed=True, finished=True, outcomes=[ok(0)])
    code, doc, err = await chora(capsys, "batch", "cancel", done, "--json")
    assert code == 1 and doc["outcome"] == "already_completed" and doc["status"] == "success", err
    assembled = await write_artifact_run(stack, status="error")
    code, doc, err = await chora(capsys, "artifact", "cancel", assembled, "--json")
    assert code == 1 and doc["status"] == "error" and "already completed" in err
    code, _, err = await chora(capsys, "batch", "cancel", done, "--reason", "x" * 501)
    assert code == 64 and "--reason" in err
    stem = uuid.uuid4().hex[:8]
    for n in (1, 2):
        await write_batch(stack, 1, batch_id=f"{stem}-{n}")
    code, _, err = await chora(capsys, "batch", "cancel", stem)
    assert code == 3 and "ambiguous" in err and f"{stem}-1" in err
    assert (await last_cancel(stack))[0] == before


async def test_cli_batch_cancel_wait_prints_the_completion_status_and_counts(stack, capsys):
    batch_id = await write_batch(stack, 4, outcomes=[ok(0), bad(1)])
    run = asyncio.create_task(chora(capsys, "batch", "cancel", batch_id, "--wait", "--timeout", "30", "--json"))

    async def asked():
        return (await last_cancel(stack))[1] is not None and (await last_cancel(stack))[1].data.id == batch_id

    await wait_for(asked, timeout=20, what="the cancel request in the stream", interval=0.05)
    # the assembler's completion: the two items that ran are counted, the other two skipped;
    # these outcomes registered no effects (no cache entry, no stored content), so nothing is undone
    code, doc, err = await asyncio.wait_for(run, 30)
    assert code == 0, err
    assert doc["outcome"] == "completed" and doc["status"] == "cancelled"
    assert (doc["total"], doc["successful"], doc["failed"], doc["skipped"]) == (4, 1, 1, 2)
    assert doc["compensated_parts"] == []


async def test_cli_cancel_wait_past_the_timeout_is_75(stack, capsys):
    # a run record the assembler cannot act on (no run_id: it retries the cancel, no completion comes)
    run_id = await write_artifact_run(stack, readable_by_the_assembler=False)
    code, doc, err = await chora(capsys, "artifact", "cancel", run_id, "--wait", "--timeout", "0.5", "--json")
    assert code == 75 and doc["outcome"] == "timeout" and "the cancel stays asked" in err
    assert (await last_cancel(stack))[1].data.id == run_id


async def test_cli_artifact_status_reads_the_run_record(stack, capsys):
    running, done = await write_artifact_run(stack), await write_artifact_run(stack, status="success")
    code, doc, _ = await chora(capsys, "artifact", "status", running, "--json")
    assert code == 0 and doc == {"kind": "artifact", "id": running, "state": "running", "status": None}
    code, doc, _ = await chora(capsys, "artifact", "status", done, "--json")
    assert code == 0 and (doc["state"], doc["status"]) == ("finished", "success")
    assert (await chora(capsys, "artifact", "status", "nope"))[0] == 3


# ---------------------------------------------------------------------- CLI: results
async def test_cli_batch_results_pages_and_filters_the_item_outcomes(stack, capsys):
    batch_id = await write_batch(stack, 5, closed=True, finished=True, outcomes=[ok(0), bad(1), ok(2), ok(3)])
    code, page, err = await chora(capsys, "batch", "results", batch_id, "--json")
    assert code == 0, err
    assert [i["status"] for i in page["items"]] == ["success", "error", "success", "success", "skipped"]
    assert page["total"] == 5 and page["next_cursor"] is None
    code, page, _ = await chora(capsys, "batch", "results", batch_id[:10], "--limit", "2", "--cursor", "1", "--json")
    assert [i["index"] for i in page["items"]] == [1, 2] and page["next_cursor"] == 3
    code, page, _ = await chora(capsys, "batch", "results", batch_id, "--failed-only", "--json")
    assert [(i["index"], i["error"]["code"]) for i in page["items"]] == [(1, "RENDER_FAILED")]
    code, text, _ = await chora(capsys, "batch", "results", batch_id, "--limit", "2")
    assert code == 0 and "RENDER_FAILED" in text and "--cursor 2" in text
    assert (await chora(capsys, "batch", "results", batch_id, "--limit", "0"))[0] == 64
    code, _, err = await chora(capsys, "batch", "results", "no-such-batch")
    assert code == 3 and "no batch no-such-batch" in err


async def test_cli_batch_results_of_a_large_batch_reads_every_item_with_one_consumer(stack, capsys):
    """Past 256 indexes a page is read with one ordered consumer (StateStore.matching), not a get each."""
    batch_id = await write_batch(stack, 300, closed=True, finished=True)
    await stack.state.put_many(
        {batch_item_key(batch_id, i): msgspec.msgpack.encode(ok(i) if i % 7 else bad(i)) for i in range(299)}, 600
    )
    code, page, err = await chora(capsys, "batch", "results", batch_id, "--json")
    assert code == 0, err
    assert [i["index"] for i in page["items"]] == list(range(300))
    assert [i["status"] for i in page["items"]][:8] == ["error"] + ["success"] * 6 + ["error"]
    assert page["items"][299]["status"] == "skipped"


async def test_results_past_their_expiry_time_are_expired_everywhere(stack, capsys, http):
    batch_id = await write_batch(stack, 2, closed=True, finished=True, outcomes=[ok(0), ok(1)], expire_at=1.0)
    code, _, err = await chora(capsys, "batch", "results", batch_id)
    assert code == 3 and "have expired" in err
    r = await http.get(f"/v1/batches/{batch_id}/results", headers=auth("reader"))
    assert r.status_code == 404 and r.json()["code"] == "BATCH_RESULTS_EXPIRED", r.text
    r = await http.get(f"/v1/batches/{batch_id}", headers=auth("reader"))  # the record itself stays
    assert r.status_code == 200 and r.json()["state"] == "finished"


# ---------------------------------------------------------------------- the results TTL, for real
async def test_a_finished_batchs_item_records_expire_by_the_results_ttl_and_its_record_stays(stack, http):
    items = [{"content_config_id": "hello-world", "context": {"name": f"T{i}"}} for i in range(3)]
    r = await http.post("/v1/batches", json={"items": items}, headers=auth())
    assert r.status_code == 202, r.text
    batch_id = r.json()["batch_id"]

    async def expiry_set():
        got = await stack.state.get(batch_key(batch_id))
        return got is not None and decode_batch(got[0]).results_expire_at

    expire_at = await wait_for(expiry_set, timeout=30, what="the finished batch's results_expire_at", interval=0.05)
    record = decode_batch((await stack.state.get(batch_key(batch_id)))[0])
    assert record.finished and record.successful == 3
    assert record.closed_at + TTL_S <= expire_at <= record.closed_at + TTL_S + 10  # the TTL counts from completion

    async def items_gone():
        return all([await stack.state.get(batch_item_key(batch_id, i)) is None for i in range(3)])

    await wait_for(items_gone, timeout=TTL_S + 10, what="the item records expiring by their TTL", interval=0.1)
    r = await http.get(f"/v1/batches/{batch_id}/results", headers=auth("reader"))
    assert r.status_code == 404 and r.json()["code"] == "BATCH_RESULTS_EXPIRED", r.text
    assert await stack.state.get(batch_key(batch_id)) is not None  # the record stays: a redelivered request is known


# ---------------------------------------------------------------------- gateway: DELETE
async def test_delete_batch_answers_202_with_the_location_and_publishes_the_cancel(stack, http):
    batch_id = await write_batch(stack, 3)
    r = await http.delete(f"/v1/batches/{batch_id}", params={"reason": "changed my mind"}, headers=auth())
    assert r.status_code == 202, r.text
    assert r.headers["location"] == f"/v1/batches/{batch_id}" == r.json()["location"]
    assert r.json()["state"] == "cancelling" and r.json()["cancel_id"] == cancel_event_id("batch", batch_id)
    _, ev = await last_cancel(stack)
    assert (ev.data.kind, ev.data.id, ev.data.reason) == ("batch", batch_id, "changed my mind")
    assert ev.traceid == r.headers["x-trace-id"] and ev.source == stack.gw.gateway.source


async def test_delete_batch_is_404_unknown_409_completed_403_without_the_batch_scope(stack, http):
    r = await http.delete("/v1/batches/no-such-batch", headers=auth())
    assert r.status_code == 404 and r.json()["code"] == "BATCH_NOT_FOUND"
    done = await write_batch(stack, 1, closed=True, finished=True, outcomes=[bad(0)])
    r = await http.delete(f"/v1/batches/{done}", headers=auth())
    assert r.status_code == 409 and r.json()["code"] == "RUN_COMPLETED" and r.json()["run_status"] == "error"
    r = await http.delete(f"/v1/batches/{done}", headers=auth("maker"))
    assert r.status_code == 403


async def test_a_batch_the_gateway_published_can_be_cancelled_before_the_assembler_has_it(stack, http):
    """Queued: the gateway's own request record knows it; no assembler record is needed."""
    from services.gateway.model import RequestRecord
    from services.gateway.operations import request_key

    queued = str(uuid.uuid4())
    record = RequestRecord(request_id=queued, kind="batch", trace_id=None, seq=1, created_at=time.time(), total=2)
    await stack.gw.ops.stores.records.put(request_key(queued), msgspec.json.encode(record))
    r = await http.delete(f"/v1/batches/{queued}", headers=auth())
    assert r.status_code == 202, r.text
    assert (await last_cancel(stack))[1].data.id == queued


async def test_delete_artifact_answers_202_404_409(stack, http):
    run_id = await write_artifact_run(stack)
    r = await http.delete(f"/v1/artifacts/{run_id}", headers=auth("maker"))
    assert r.status_code == 202 and r.headers["location"] == f"/v1/requests/{run_id}", r.text
    _, ev = await last_cancel(stack)
    assert (ev.data.kind, ev.data.id, ev.id) == ("artifact", run_id, cancel_event_id("artifact", run_id))
    r = await http.delete("/v1/artifacts/no-such-run", headers=auth("maker"))
    assert r.status_code == 404 and r.json()["code"] == "ARTIFACT_RUN_NOT_FOUND"
    done = await write_artifact_run(stack, status="success")
    r = await http.delete(f"/v1/artifacts/{done}", headers=auth("maker"))
    assert r.status_code == 409 and r.json()["run_status"] == "success"
    r = await http.delete(f"/v1/artifacts/{run_id}", headers=auth("reader"))
    assert r.status_code == 403


# ---------------------------------------------------------------------- MCP and the client
async def test_mcp_cancel_run_asks_the_cancel_and_batch_results_past_the_ttl_are_expired(stack):
    batch_id, run_id = await write_batch(stack, 2), await write_artifact_run(stack)
    expired = await write_batch(stack, 1, closed=True, finished=True, outcomes=[ok(0)], expire_at=1.0)
    async with held(over_http(f"{stack.gw.url}/mcp", "key-all")) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
        schema = tools["cancel_run"].input_schema
        assert schema["properties"]["kind"]["enum"] == ["artifact", "batch"] and schema["required"] == ["kind", "id"]
        assert "cancel_id" in tools["cancel_run"].output_schema["properties"]
        got = await client.call_tool("cancel_run", {"kind": "batch", "id": batch_id, "reason": "mcp"})
        assert not got.is_error, got.content
        assert got.structured_content["cancel_id"] == cancel_event_id("batch", batch_id)
        assert (await last_cancel(stack))[1].data.reason == "mcp"
        got = await client.call_tool("cancel_run", {"kind": "artifact", "id": "no-such-run"})
        assert got.is_error and got.structured_content["error"]["code"] == "ARTIFACT_RUN_NOT_FOUND"
        got = await client.call_tool("batch_results", {"batch_id": expired})
        assert got.is_error and got.structured_content["error"]["code"] == "BATCH_RESULTS_EXPIRED"
    async with held(over_http(f"{stack.gw.url}/mcp", "key-reader")) as reader:
        got = await reader.call_tool("cancel_run", {"kind": "artifact", "id": run_id})
        assert got.is_error and got.structured_content["error"]["code"] == "FORBIDDEN"


async def test_client_cancel_publishes_the_same_request(stack):
    batch_id = await write_batch(stack, 2)
    async with contextlib.AsyncExitStack() as es:
        client = await es.enter_async_context(await ChoraClient.connect(stack.server.url, prefix=stack.settings.prefix))
        ev = await client.cancel("batch", batch_id, "from python", trace_id="trace-client-1")
        assert ev.id == cancel_event_id("batch", batch_id) and ev.traceid == "trace-client-1"
        _, stored = await last_cancel(stack)
        assert (stored.id, stored.data.reason, stored.traceid) == (ev.id, "from python", "trace-client-1")
        with pytest.raises(ValueError):
            await client.cancel("everything", batch_id)


# ---------------------------------------------------------------------- a bucket made without message TTLs
async def test_provision_lets_an_old_state_bucket_take_message_ttls(stack):
    """A state bucket created without allow_msg_ttl (an older client, `nats kv add`) would refuse
    the results TTL: provisioning updates it, and a TTL'd write then expires."""
    from nats.js.api import StreamConfig

    from bus.topology import allow_msg_ttl

    js = stack.nc.jetstream()
    bucket = "OLD" + uuid.uuid4().hex[:8].upper()
    await js.add_stream(
        StreamConfig(name=f"KV_{bucket}", subjects=[f"$KV.{bucket}.>"], max_msgs_per_subject=1, allow_rollup_hdrs=True)
    )
    old = StateStore(js, bucket)
    with pytest.raises(Exception, match="(?i)ttl"):
        await old.put_many({"k": b"v"}, 1)
    assert await allow_msg_ttl(js, bucket) is True
    assert await allow_msg_ttl(js, bucket) is False  # once
    await old.put_many({"k": b"v"}, 1)
    assert await old.get("k") is not None

    async def gone():
        return await old.get("k") is None

    await wait_for(gone, timeout=10, what="the TTL'd key expiring", interval=0.1)
