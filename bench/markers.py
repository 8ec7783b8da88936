"""Stopped-run markers benchmark: what the generator's follow of the markers costs its event
loop (services/generator/compensation.py, StoppedRuns), against an embedded nats-server with
the real topology, with ``--markers`` markers in the state bucket:

  full     a follow that reads every current marker (the first one, at start; before
           2026-11-29 also every refresh, every 30 s);
  refresh  the follow made again from the last stream sequence the first one saw, with
           ``--new`` markers written since (what a refresh reads now).

For each: the wall time until the last marker was read, the process's CPU time, and the
longest the event loop went without running a 10 ms ticker (what a request waiting in the
same loop would wait). Prints one JSON object.
Usage: python -m bench.markers [--markers 100000] [--new 100]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

from bench.e2e import _machine
from bus.connection import connect
from bus.server import EmbeddedServer
from bus.settings import NatsSettings
from bus.state import StateStore
from bus.topology import Topology, provision
from composition.runs import MARKERS, cancelled_key
from services.settings import Settings

MARKER = b'{"kind":"batch","outcome":"cancelled","by":"' + b"e" * 36 + b'","at":1764390000.0}'


async def fill(js, bucket: str, first: int, n: int) -> None:
    """``n`` markers of runs ``first``..``first + n - 1``, pipelined, as the assembler writes
    them: without a TTL. (Not StateStore.put_many: its ``Nats-TTL`` header on every message
    made the full read 3.5 s instead of 2, so it would measure markers that do not exist.)"""
    pending = []
    for i in range(first, first + n):
        pending.append(await js.publish_async(f"$KV.{bucket}.{cancelled_key('batch', f'run-{i}')}", MARKER))
        if len(pending) >= 2000:
            await asyncio.gather(*pending)
            pending = []
    await asyncio.gather(*pending)


async def read(store: StateStore, until: str, after_seq: int = 0) -> tuple[dict, int]:
    """Follow the markers until the key ``until`` (the last one written) was read: the
    figures (how many were read on the way), and the last sequence seen."""
    got, last = 0, 0
    done = asyncio.Event()

    def on_change(key: str, present: bool, seq: int) -> None:
        nonlocal got, last
        got, last = got + 1, max(last, seq)
        if key == until:
            done.set()

    worst, stop = 0.0, False

    async def ticker() -> None:  # the loop's longest stall: how late a 10 ms timer ran
        nonlocal worst
        before = time.perf_counter()
        while not stop:
            await asyncio.sleep(0.01)
            now = time.perf_counter()
            worst, before = max(worst, now - before - 0.01), now

    tick = asyncio.create_task(ticker())
    cpu, t0 = time.process_time(), time.perf_counter()
    sub = await store.follow(MARKERS, on_change, after_seq=after_seq)
    await asyncio.wait_for(done.wait(), 300)
    figures = {
        "read": got,
        "seconds": round(time.perf_counter() - t0, 3),
        "cpu_s": round(time.process_time() - cpu, 3),
        "longest_loop_stall_ms": round(worst * 1000, 1),
    }
    stop = True
    await tick
    await sub.unsubscribe()
    return figures, last


async def main(markers: int, new: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        server = EmbeddedServer(Path(tmp) / "store").start()
        try:
            settings = Settings(prefix="bench", nats=NatsSettings(url=server.url), metrics_port=-1)
            nc = await connect(settings.nats, name="bench-markers")
            js = nc.jetstream()
            topo = Topology.from_settings(settings)
            await provision(js, topo, consumers=[])
            store = StateStore(js, topo.state_bucket)
            await fill(js, topo.state_bucket, 0, markers)
            full, last = await read(store, cancelled_key("batch", f"run-{markers - 1}"))
            await fill(js, topo.state_bucket, markers, new)
            refresh, _ = await read(store, cancelled_key("batch", f"run-{markers + new - 1}"), after_seq=last)
            await nc.close()
        finally:
            server.stop()
    return {
        "benchmark": "markers",
        "markers": markers,
        "full": full,
        "new": new,
        "refresh": refresh,
        "machine": _machine(),
    }


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--markers", type=int, default=100_000)
    p.add_argument("--new", type=int, default=100)
    a = p.parse_args()
    print(json.dumps(asyncio.run(main(a.markers, a.new)), indent=2))
