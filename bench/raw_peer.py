"""Baseline: the peer's three-stage pipeline in plain nats-py, one process, no framework.

generation requested -> [generate: jinja2 sandboxed render] -> content generated
                     -> [validate: length + placeholder check] -> content validated
every event          -> [sink: one JSONL line per event, flushed]

Each stage is a durable push consumer with flow control and explicit acks; a handler
publishes its outcome, waits for the PubAck, then acks. Same template, same requests and
the same JSON line on stdout as the FastStream peer (../shared/bench/faststream_peer.py),
so `make bench` can set the three side by side.

Usage: python -m bench.raw_peer NATS_URL N [RATE]
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import time
import uuid

import jinja2.sandbox
import msgspec
import nats
from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig

TEMPLATE = jinja2.sandbox.SandboxedEnvironment(undefined=jinja2.StrictUndefined).from_string(
    "# {{ title }}\n\nRelease {{ version }} of {{ name }}.\n{% for i in items %}- {{ i }}\n{% endfor %}"
)


class Requested(msgspec.Struct):
    id: str
    config_id: str
    context: dict
    sent_ns: int


class Generated(msgspec.Struct):
    id: str
    config_id: str
    content: str
    duration_ms: float
    sent_ns: int


class Validated(msgspec.Struct):
    id: str
    valid: bool
    sent_ns: int


def request(i: int) -> bytes:
    ctx = {"title": f"Doc {i}", "version": "1.0.0", "name": "peer", "items": ["a", "b", "c"]}
    return msgspec.json.encode(
        Requested(id=uuid.uuid4().hex, config_id="release-notes", context=ctx, sent_ns=time.perf_counter_ns())
    )


async def main(url: str, n: int, rate: float) -> dict:
    nc = await nats.connect(url)
    js = nc.jetstream(publish_async_max_pending=4000)
    await js.add_stream(StreamConfig(name="RAW", subjects=["raw.>"]))
    out = open(os.path.join(tempfile.mkdtemp(), "events.jsonl"), "a")
    state: dict = {"validated": 0, "target": None, "done": None, "lat": [], "record_lat": False}

    def mirror(event_type: str, body: dict) -> None:
        out.write(json.dumps({"timestamp": time.time(), "event_type": event_type, **body}) + "\n")
        out.flush()

    async def generate(msg) -> None:
        req = msgspec.json.decode(msg.data, type=Requested)
        t0 = time.perf_counter()
        content = TEMPLATE.render(**req.context)
        ev = Generated(req.id, req.config_id, content, (time.perf_counter() - t0) * 1e3, req.sent_ns)
        await js.publish("raw.content.generated", msgspec.json.encode(ev))
        await msg.ack()

    async def validate(msg) -> None:
        ev = msgspec.json.decode(msg.data, type=Generated)
        ok = 10 < len(ev.content) < 100_000 and "[TBD]" not in ev.content
        await js.publish("raw.content.validated", msgspec.json.encode(Validated(ev.id, ok, ev.sent_ns)))
        await msg.ack()

    async def sink(msg) -> None:
        body = msgspec.json.decode(msg.data)
        if msg.subject.endswith(".requested"):
            mirror("generation.requested", {"id": body["id"], "config_id": body["config_id"]})
        elif msg.subject.endswith(".generated"):
            mirror("content.generated", {"id": body["id"], "config_id": body["config_id"]})
        else:
            mirror("content.validated", {"id": body["id"], "valid": body["valid"]})
            if state["record_lat"]:
                state["lat"].append((time.perf_counter_ns() - body["sent_ns"]) / 1e6)
            state["validated"] += 1
            if state["target"] is not None and state["validated"] >= state["target"]:
                state["done"].set()
        await msg.ack()

    def push(durable: str) -> ConsumerConfig:
        return ConsumerConfig(
            durable_name=durable, ack_policy=AckPolicy.EXPLICIT, flow_control=True, idle_heartbeat=5.0
        )

    for subject, durable, cb in (
        ("raw.generation.requested", "gen", generate),
        ("raw.content.generated", "val", validate),
        ("raw.>", "sink", sink),
    ):
        await js.subscribe(subject, durable=durable, cb=cb, manual_ack=True, config=push(durable))
    await asyncio.sleep(0.5)

    state["done"], state["target"] = asyncio.Event(), n
    t0 = time.perf_counter()
    for i in range(n):
        await js.publish_async("raw.generation.requested", request(i))
    await js.publish_async_completed()
    await asyncio.wait_for(state["done"].wait(), 600)
    thr = n / (time.perf_counter() - t0)

    m = int(rate * 5)
    state["validated"], state["target"], state["done"] = 0, m, asyncio.Event()
    state["record_lat"] = True
    start = time.perf_counter()
    for i in range(m):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        await js.publish("raw.generation.requested", request(i))
    await asyncio.wait_for(state["done"].wait(), 120)
    lat = sorted(state["lat"])

    def pct(p: float) -> float:
        return round(lat[min(len(lat) - 1, int(p * len(lat)))], 2)

    await nc.close()
    return {
        "peer": "raw-nats-py",
        "n": n,
        "throughput_rps": round(thr, 1),
        "rate": rate,
        "p50_ms": pct(0.50),
        "p95_ms": pct(0.95),
        "p99_ms": pct(0.99),
    }


if __name__ == "__main__":
    rate_arg = float(sys.argv[3]) if len(sys.argv) > 3 else 200.0
    print(json.dumps(asyncio.run(main(sys.argv[1], int(sys.argv[2]), rate_arg))))
