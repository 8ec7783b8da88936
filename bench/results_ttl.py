"""Results TTL benchmark: what giving a finished batch's results their TTL costs the assembler
(services/assembler/retention.py), for batches of ``--items`` sizes, against an embedded
nats-server with the real topology, on both of its paths:

  short  a TTL shorter than the max age (10 min here): every item record read with one
         ordered consumer and written again with a per-message TTL, pipelined, then one
         compare-and-set of the batch record;
  max    the default (TTL = max age = 7 days): the compare-and-set only.

Prints one JSON object. Usage: python -m bench.results_ttl [--items 1000 5000 50000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import msgspec

from bench.e2e import _machine
from bus.connection import connect
from bus.server import EmbeddedServer
from bus.settings import NatsSettings
from bus.state import StateStore
from bus.topology import Topology, provision
from composition.batch_records import BatchRecord, batch_item_key, batch_key
from contracts.events import BatchItemOutcome
from services.assembler.retention import keep_batch_results
from services.settings import Settings


async def one(store: StateStore, n: int, ttl: float, max_age: float) -> dict:
    batch_id = f"bench-{n}-{int(ttl)}"
    outcome = BatchItemOutcome(index=0, content_config_id="hello-world", status="success", request_id="r" * 36)
    items = {batch_item_key(batch_id, i): msgspec.msgpack.encode(outcome) for i in range(n)}
    await store.put_many(items, 3600)  # as the assembler left them (a TTL here only to clean up)
    record = BatchRecord(total=n, started_at=time.time(), successful=n, closed=True, finished=True)
    await store.put(batch_key(batch_id), msgspec.msgpack.encode(record))
    deps = SimpleNamespace(state=store, results_ttl_s=ttl, state_max_age_s=max_age, clock=time.time)
    t0 = time.perf_counter()
    assert await keep_batch_results(batch_id, deps)
    s = time.perf_counter() - t0
    return {"items": n, "ttl_s": ttl, "seconds": round(s, 3), "items_per_s": round(n / s)}


async def main(sizes: list[int]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        server = EmbeddedServer(Path(tmp) / "store").start()
        try:
            settings = Settings(prefix="bench", nats=NatsSettings(url=server.url), metrics_port=-1)
            nc = await connect(settings.nats, name="bench-results-ttl")
            topo = Topology.from_settings(settings)
            await provision(nc.jetstream(), topo, consumers=[])
            store = StateStore(nc.jetstream(), topo.state_bucket)
            runs = [await one(store, n, ttl, topo.max_age_s) for n in sizes for ttl in (600.0, topo.max_age_s)]
            await nc.close()
        finally:
            server.stop()
    return {"benchmark": "results_ttl", "runs": runs, "machine": _machine()}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, nargs="+", default=[1000, 5000, 50000])
    print(json.dumps(asyncio.run(main(p.parse_args().items)), indent=2))
