"""The gateway as its own least-privilege NATS user (deploy/nats/auth.conf, `gateway`) against
the server an operator deploys (deploy/nats/single-auth.conf): the services run as theirs, the
topology is provisioned by admin, and every operation of the gateway works with no
permission violation; what is not its business is refused."""

from __future__ import annotations

import asyncio

import msgspec

from contracts.catalogue import CONTENT_GENERATED
from services.gateway.operations import Operations, Outcome, Pending
from services.gateway.sse import event_stream
from services.runtime import ready_file, run_service
from tests.conftest import wait_for
from tests.integration.test_nats_permissions import (  # noqa: F401  (fixtures by name)
    auth_server,
    connect,
    make_settings,
    passwords,
    provisioned,
    refused,
)


async def test_the_gateway_user_can_do_its_work_and_no_more(tmp_path, auth_server, passwords, provisioned, connect):  # noqa: F811
    admin, topo = provisioned
    stop = asyncio.Event()
    names = ("generator", "validator", "assembler")
    per = {n: make_settings(tmp_path, auth_server, n, passwords[n], content_threshold_bytes=64) for n in names}
    tasks = [asyncio.create_task(run_service(n, s, stop=stop)) for n, s in per.items()]
    try:
        for (n, s), t in zip(per.items(), tasks):
            await wait_for(lambda n=n, s=s, t=t: ready_file(s, n).exists() or t.done(), 20, f"{n} ready")
            assert not t.done(), f"{n} stopped at start: {t.exception()!r}"
        gw = await connect("gateway")
        settings = make_settings(tmp_path, auth_server, "gateway", passwords["gateway"], content_threshold_bytes=64)
        ops = Operations(gw.nc, settings)
        await ops.start()
        try:
            out = await ops.generate("hello-world", {"name": "Least"}, timeout_s=20)
            assert isinstance(out, Outcome) and out.data["content"].startswith("# Hello, Least!")  # by reference
            late = await ops.generate("hello-world", {"name": "Late"}, timeout_s=0)
            assert isinstance(late, Pending)

            async def done():
                return (await ops.request_status(late.request_id))["state"] == "done"

            await wait_for(done, 20, "the late outcome recorded in the gateway's bucket")
            items = [{"content_config_id": "hello-world", "context": {"name": f"I{i}" * 20}} for i in range(3)]
            acc = await ops.batch(items, {}, True)  # more than 64 bytes of items: to the Object Store

            async def finished():
                return (await ops.batch_status(acc.batch_id))["state"] == "finished"

            await wait_for(finished, 30, "the batch finished (read from the assembler's records)")
            page = await ops.batch_results(acc.batch_id)
            assert page["items"][2]["content"].startswith("# Hello, I2")
            # a cancel of a batch under way: its chora.cancel.requested is stored (PubAck), and the run stops
            big = await ops.batch(
                [{"content_config_id": "hello-world", "context": {"name": f"C{i}"}} for i in range(300)]
            )
            cancel = await ops.cancel("batch", big.batch_id, "least privilege")
            assert cancel["state"] == "cancelling" and cancel["cancel_id"]

            async def stopped():
                return (await ops.batch_status(big.batch_id))["state"] == "finished"

            await wait_for(stopped, 60, "the cancelled batch finished")
            assert (await ops.generators())["reported"] is True
            stream = event_stream(
                gw.nc,
                settings.stream_name,
                "chora",
                out.trace_id or "",
                [CONTENT_GENERATED],
                start_seq=1,
                replay_s=60,
                max_event_bytes=1 << 20,
            )
            chunks = [await stream.__anext__(), await stream.__anext__()]
            await stream.aclose()
            assert b"event: chora.content_generated" in chunks[1]
            assert msgspec.json.decode(chunks[1].split(b"data: ", 1)[1])["data"]["request_id"] == out.request_id
        finally:
            await ops.close()
        assert gw.violations() == [], gw.violations()
        # not its business: the assembler's records, another service's facts, other streams' consumers
        await refused(ops.stores.state.put("batch.forged", b"x"), gw, "$KV.CHORA_STATE.batch.forged")
        await refused(gw.js().add_consumer("CHORA_DLQ"), gw, "$JS.API.CONSUMER.CREATE.CHORA_DLQ")
        await gw.nc.publish("chora.content_generated", b"{}")
        await wait_for(lambda: gw.refused("Publish") >= {"chora.content_generated"}, 10, "a forged fact refused")
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
