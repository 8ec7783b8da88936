"""A 100,000-item batch end to end: `chora batch run` (a real subprocess) parses the file,
sends the items by reference (the request would be far over the 1 MiB event limit), and the
generator and assembler (in-process, on a real nats-server) complete it exactly once."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time

import msgspec
import pytest

from bus.topology import Topology, provision
from contracts.catalogue import BATCH_COMPLETED, BATCH_REQUESTED, GENERATION_REQUESTED
from contracts.envelope import decode
from tests.conftest import child_env, write
from tests.integration.test_assembler_batches import count_stored, running

N = 100_000


@pytest.mark.timeout(600)
async def test_a_100000_item_batch_completes_once_with_every_success(tmp_path, settings, nc):
    configs = tmp_path / "configs"
    write(configs / "tiny.yaml", "id: tiny\ngenerator: demonstration\nexample_output: ok\n")
    s = settings.model_copy(update={"configs_dir": configs})
    batch = tmp_path / "big.yaml"
    batch.write_text("items:\n" + "".join(f"- {{content_config_id: tiny, context: {{n: {i}}}}}\n" for i in range(N)))
    js = nc.jetstream()
    topo = Topology.from_settings(s)
    await provision(js, topo)
    env = child_env(NATS_URL=s.nats.url, CHORA_HOME=str(s.home), CHORA_PREFIX=s.prefix, CHORA_CONFIGS_DIR=str(configs))
    async with running(("generator", s), ("assembler", s)):
        t0 = time.perf_counter()
        r = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "chora.cli", "batch", "run", str(batch), "--timeout", "500"],
            env=env, capture_output=True, text=True, timeout=560,
        )
        elapsed = time.perf_counter() - t0
    print(f"\n{N:,} items end to end through `chora batch run`: {elapsed:.1f} s")
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-3000:]
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
