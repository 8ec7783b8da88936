"""The consumer loop alone: how fast bus.consumer.ConsumerLoop reads a pre-filled stream.

On a nats-server of its own, N generation requests are stored first; then the loop
of the ``generator`` consumer reads them all with a handler that (a) only returns
(decode, ack) or (b) publishes one content_generated per request (the generator's
shape). Next to it, in the same run: the same per-message work fed by a durable push
consumer (flow control, explicit acks) instead of the loop's continuous pull, and the
nats-py receive ceiling, a durable push consumer that only counts. Prints msg/s and
the process CPU per message.

Usage: python -m bench.consumer_loop [--messages N] [--publish]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from pathlib import Path

import nats
from nats.js.api import AckPolicy, ConsumerConfig

from bus.consumer import ConsumerLoop
from bus.publisher import Publisher
from bus.server import EmbeddedServer
from bus.settings import BusSettings
from bus.topology import Topology, provision
from contracts.catalogue import CONTENT_GENERATED, GENERATION_REQUESTED
from contracts.envelope import new_event
from contracts.events import ContentGenerated, GenerationRequested
from services import eventloop


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


async def _fill(js, prefix: str, n: int) -> None:
    pub = Publisher(js, prefix)
    events = [
        new_event(
            GENERATION_REQUESTED,
            GenerationRequested(content_config_id="hello-world", context={"name": f"user-{i}"}),
            source="chora://bench",
        )
        for i in range(n)
    ]
    for i in range(0, n, 2000):
        await pub.publish_many(events[i : i + 2000])


async def loop_rate(nc, topo: Topology, n: int, publish: bool, push: bool = False) -> dict:
    js = nc.jetstream()
    done = asyncio.Event()
    count = 0

    async def handler(ev, delivery):
        nonlocal count
        count += 1
        if count >= n:
            done.set()
        if not publish:
            return []
        data = ContentGenerated(request_id=ev.id, content_config_id="hello-world", status="success", content="hi")
        return [new_event(CONTENT_GENERATED, data, source="chora://bench", cause=ev)]

    loop = ConsumerLoop(nc, js, topo, topo.consumers["generator"], handler)
    t0, c0 = time.perf_counter(), _cpu()
    if not push:
        task = asyncio.create_task(loop.run())
        await asyncio.wait_for(done.wait(), 600)
        dt, dc = time.perf_counter() - t0, _cpu() - c0
        await loop.stop()
        await task
    else:
        # the same per-message work (ConsumerLoop._on_msg -> _process: decode, handle, publish,
        # ack) fed by a durable push consumer with flow control and explicit acks instead
        cfg = ConsumerConfig(
            durable_name="push",
            ack_policy=AckPolicy.EXPLICIT,
            flow_control=True,
            idle_heartbeat=5.0,
            max_ack_pending=topo.consumers["generator"].max_ack_pending,
        )
        sub = await js.subscribe(
            topo.subject(GENERATION_REQUESTED), durable="push", cb=loop._on_msg, manual_ack=True, config=cfg
        )
        await asyncio.wait_for(done.wait(), 600)
        dt, dc = time.perf_counter() - t0, _cpu() - c0
        await sub.unsubscribe()
        await asyncio.gather(*list(loop._tasks))  # the last ones still settling
    return {"msg_per_s": round(n / dt), "cpu_us_per_msg": round(dc / n * 1e6, 1), "acked": loop.stats.acked}


async def push_ceiling(nc, topo: Topology, n: int) -> dict:
    js = nc.jetstream()
    done = asyncio.Event()
    count = 0

    async def cb(msg):
        nonlocal count
        count += 1
        if count >= n:
            done.set()

    cfg = ConsumerConfig(durable_name="ceiling", ack_policy=AckPolicy.NONE, flow_control=True, idle_heartbeat=5.0)
    t0, c0 = time.perf_counter(), _cpu()
    sub = await js.subscribe(topo.subject(GENERATION_REQUESTED), durable="ceiling", cb=cb, config=cfg)
    await asyncio.wait_for(done.wait(), 600)
    dt, dc = time.perf_counter() - t0, _cpu() - c0
    await sub.unsubscribe()
    return {"msg_per_s": round(n / dt), "cpu_us_per_msg": round(dc / n * 1e6, 1)}


async def main(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="chora-loop-") as tmp:
        server = EmbeddedServer(Path(tmp) / "store", config=None, http_port=None).start()
        try:
            nc = await nats.connect(server.url)
            settings = BusSettings(prefix="loopbench")
            topo = Topology.from_settings(settings)
            await provision(nc.jetstream(), topo, consumers=["generator"])
            await _fill(nc.jetstream(), topo.prefix, args.messages)
            out = {"messages": args.messages, "load": os.getloadavg()}
            out["push_ceiling"] = await push_ceiling(nc, topo, args.messages)
            out["pull_loop"] = await loop_rate(nc, topo, args.messages, args.publish)
            out["push_loop"] = await loop_rate(nc, topo, args.messages, args.publish, push=True)
            await nc.close()
        finally:
            server.stop()
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=20_000)
    ap.add_argument("--publish", action="store_true", help="the handler publishes one event per message")
    ap.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop", help="the event loop to run on")
    args = ap.parse_args()
    os.environ["CHORA_EVENT_LOOP"] = args.loop
    print(json.dumps({"loop": eventloop.install(), **asyncio.run(main(args))}))
