"""A 100,000-item batch end to end: `chora batch run` (a real subprocess) parses the file,
sends the items by reference (the request would be far over the 1 MiB event limit), and the
generator and the assembler (each its own process, so they use both cores, on a real
nats-server) complete it exactly once."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time

import msgspec
import pytest

from bus.topology import Topology, provision
from contracts.catalogue import BATCH_COMPLETED, BATCH_REQUESTED, CONTENT_GENERATED, GENERATION_REQUESTED
from contracts.envelope import decode
from tests.conftest import write
from tests.faults.harness import ProcStack
from tests.integration.test_assembler_batches import count_stored

N = 100_000


async def phases(js, topo: Topology) -> str:
    """Where the time went, from the stream's own timestamps (first and last event of each type)."""
    from datetime import datetime

    async def at(event_type: str, last: bool) -> datetime:
        subject = topo.subject(event_type)
        if last:
            m = await js.get_last_msg(topo.events_stream, subject)
        else:
            m = await js.get_msg(topo.events_stream, seq=1, subject=subject, next=True)
        return datetime.fromisoformat(m.headers["ce-time"].replace("Z", "+00:00"))

    t = {
        "request": await at(BATCH_REQUESTED, False),
        "first item request": await at(GENERATION_REQUESTED, False),
        "last item request": await at(GENERATION_REQUESTED, True),
        "first outcome": await at(CONTENT_GENERATED, False),
        "last outcome": await at(CONTENT_GENERATED, True),
        "completed": await at(BATCH_COMPLETED, True),
    }
    start = t["request"]
    return ", ".join(f"{k} +{(v - start).total_seconds():.1f}s" for k, v in t.items())


@pytest.mark.timeout(600)
async def test_a_100000_item_batch_completes_once_with_every_success(tmp_path, settings, nats_server, nc):
    configs = tmp_path / "configs"
    write(configs / "tiny.yaml", "id: tiny\ngenerator: demonstration\nexample_output: ok\n")
    # JSON: a 100,000-item YAML file alone takes 10-40 s to parse here, even with libyaml
    # (tests/unit/test_batch_file.py checks the YAML path)
    batch = tmp_path / "big.json"
    batch.write_text(json.dumps({"items": [{"content_config_id": "tiny", "context": {"n": i}} for i in range(N)]}))
    stack = ProcStack(tmp_path, nats_server)
    stack.env["CHORA_CONFIGS_DIR"] = str(configs)
    js = nc.jetstream()
    topo = Topology.from_settings(settings.model_copy(update={"prefix": stack.prefix}))
    await provision(js, topo)
    try:
        await asyncio.to_thread(stack.spawn, "generator")
        await asyncio.to_thread(stack.spawn, "assembler")
        t0 = time.perf_counter()
        r = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "chora", "batch", "run", str(batch), "--timeout", "500"],
            env=stack.env,
            capture_output=True,
            text=True,
            timeout=560,
        )
        elapsed = time.perf_counter() - t0
    finally:
        await asyncio.to_thread(stack.stop_all)
    print(f"\n{N:,} items end to end through `chora batch run`: {elapsed:.1f} s")
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-3000:]
    print("phases:", await phases(js, topo))
    assert re.search(rf"successful\s*\S\s*{N}\b", r.stdout) and re.search(r"failed\s*\S\s*0\b", r.stdout), r.stdout
    assert await count_stored(js, topo, BATCH_COMPLETED) == 1
    assert await count_stored(js, topo, GENERATION_REQUESTED) == N

    # The request travelled with its items in the Object Store, well under the event limit.
    msg = await js.get_last_msg(topo.events_stream, topo.subject(BATCH_REQUESTED))
    request = decode(msg.headers, msg.data)
    assert request.data.items == [] and request.data.item_count == N and request.data.items_ref
    assert len(msg.data) < 1024
    done = await js.get_last_msg(topo.events_stream, topo.subject(BATCH_COMPLETED))
    completed = decode(done.headers, done.data).data
    assert (completed.batch_id, completed.total, completed.successful, completed.failed) == (request.id, N, N, 0)
    assert completed.items_ref and msgspec.json.decode(msg.data)["items_ref"] == request.data.items_ref
