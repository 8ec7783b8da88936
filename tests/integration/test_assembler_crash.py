"""kill -9 of the assembler in the middle of a batch, twice, then a restart: nothing lost,
nothing counted twice, one batch_completed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from bus.publisher import Publisher
from bus.topology import Topology, provision
from services.assembler.status import read_batch_status
from contracts.catalogue import BATCH_COMPLETED, BATCH_REQUESTED
from contracts.envelope import new_event
from services.assembler.batches import completed_id
from tests.conftest import child_env, wait_for
from tests.integration.test_assembler_batches import Collector, batch, count_stored, running, stored


def spawn_assembler(settings, log_path):
    env = child_env(
        NATS_URL=settings.nats.url,
        CHORA_HOME=str(settings.home),
        CHORA_PREFIX=settings.prefix,
        CHORA_CONFIGS_DIR=str(settings.configs_dir),
        CHORA_ACK_WAIT_S=str(settings.ack_wait_s),
    )
    log = open(log_path, "ab")
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "chora", "service", "run", "assembler"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    finally:
        log.close()


async def test_kill_dash_nine_mid_batch(settings, nc, tmp_path):
    settings = settings.model_copy(update={"ack_wait_s": 2.0})  # redeliveries within seconds
    js = nc.jetstream()
    topo = Topology.from_settings(settings)
    await provision(js, topo)
    col = await Collector().start(nc, settings.prefix)
    n = 3000
    req = new_event(BATCH_REQUESTED, batch(n, bad={1, 1500, 2999}), source="test")
    log = tmp_path / "assembler.log"

    async def done_count():
        st = await read_batch_status(nc, settings, req.id)
        return st["done"] if st else -1

    procs = []
    killed_at: list[int] = []
    try:
        async with running(("generator", settings)):
            procs.append(spawn_assembler(settings, log))
            await wait_for(
                lambda: (settings.home / "run").exists() and any((settings.home / "run").glob("assembler.*.json")),
                timeout=30,
                what="assembler ready",
            )
            await Publisher(js, topo.prefix).publish(req)
            for fraction in (0.3, 0.7):

                async def past(fraction=fraction):
                    return await done_count() >= fraction * n

                await wait_for(past, timeout=60, what=f"{fraction:.0%} of the items counted")
                os.kill(procs[-1].pid, signal.SIGKILL)  # mid-flight: puts, CAS, publishes, acks cut anywhere
                procs[-1].wait(10)
                killed_at.append(await done_count())
                for f in (settings.home / "run").glob("assembler.*.json"):
                    f.unlink()
                procs.append(spawn_assembler(settings, log))
            await wait_for(
                lambda: col.of(BATCH_COMPLETED, lambda e: e.data.batch_id == req.id),
                timeout=90,
                what="batch_completed after the restarts",
            )

            async def finished():
                st = await read_batch_status(nc, settings, req.id)
                return st["finished"]

            await wait_for(finished, timeout=30, what="the record marked finished")
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(30)
    print("killed at", killed_at)
    assert len(killed_at) == 2 and all(k < n for k in killed_at), killed_at  # both kills hit a running batch
    assert await count_stored(js, topo, BATCH_COMPLETED) == 1, log.read_text()[-3000:]
    (done,) = await stored(js, topo, BATCH_COMPLETED)
    c = done.data
    assert done.id == completed_id(req.id)
    assert (c.total, c.successful, c.failed, c.skipped) == (n, n - 3, 3, 0)
    assert c.items is None and c.items_ref  # over 1,000 items: by reference
    st = await read_batch_status(nc, settings, req.id)
    assert (st["done"], st["successful"], st["failed"]) == (n, n - 3, 3)
