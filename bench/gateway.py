"""The gateway's cost: the same generation requests over HTTP (POST /v1/generate through the
gateway) and over NATS (publish + await content_generated), in the same run.

Starts the real stack as `chora up` does (embedded nats-server; the generator and the gateway
as their own processes) in a temp dir. Each mode runs ``--requests`` requests from
``--concurrency`` clients, each waiting for its outcome before sending the next; every
request has its own context (no result-cache hits). The NATS side awaits outcomes the way the
gateway does: one follower of content_generated dispatching by request id
(services/gateway/outcomes.py). Prints a table (throughput, p50, p99, and gateway/NATS ratios)
and the machine. Usage: python -m bench.gateway [--requests N] [--concurrency C]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import httpx2 as httpx

from bench.e2e import _machine
from bench.stack import running_stack
from bus.publisher import Publisher
from bus.settings import NatsSettings
from contracts.catalogue import CONTENT_GENERATED, GENERATION_REQUESTED, subject_for
from contracts.envelope import new_event
from contracts.events import GenerationRequested
from services.gateway.outcomes import OutcomeWaiter
from services.settings import Settings

CONFIG = "hello-world"


async def _drive(n: int, concurrency: int, one) -> dict:
    """``n`` calls of ``one(i)`` from ``concurrency`` workers; latency per call, overall rate."""
    latencies: list[float] = []
    counter = iter(range(n))

    async def worker() -> None:
        for i in counter:
            t0 = time.perf_counter()
            await one(i)
            latencies.append((time.perf_counter() - t0) * 1000)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    q = statistics.quantiles(sorted(latencies), n=100, method="inclusive")
    return {"requests": n, "rps": n / elapsed, "p50_ms": q[49], "p99_ms": q[98]}


async def over_nats(nc, settings: Settings, n: int, concurrency: int, run: str) -> dict:
    async def nothing(_ev) -> None:
        return None

    waiter = OutcomeWaiter(nc, settings.stream_name, [subject_for(CONTENT_GENERATED, settings.prefix)], nothing)
    await waiter.start()
    pub = Publisher(nc.jetstream(), settings.prefix)

    async def one(i: int) -> None:
        ev = new_event(
            GENERATION_REQUESTED,
            GenerationRequested(content_config_id=CONFIG, context={"name": f"nats-{run}-{i}"}),
            source="chora://bench",
        )
        fut = waiter.expect(ev.id)
        await pub.publish(ev)
        out = await asyncio.wait_for(fut, 60)
        assert out.data.status == "success", out.data

    try:
        return await _drive(n, concurrency, one)
    finally:
        await waiter.stop()


async def over_http(url: str, key: str | None, n: int, concurrency: int, run: str) -> dict:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=60) as client:

        async def one(i: int) -> None:
            r = await client.post(
                "/v1/generate", json={"content_config_id": CONFIG, "context": {"name": f"http-{run}-{i}"}}
            )
            assert r.status_code == 200, r.text

        return await _drive(n, concurrency, one)


def table(nats: dict, http: dict) -> str:
    rows = [
        ("", "NATS (publish + await)", "gateway (POST /v1/generate)", "gateway / NATS"),
        ("requests/s", f"{nats['rps']:.0f}", f"{http['rps']:.0f}", f"{http['rps'] / nats['rps']:.2f}x"),
        ("p50 ms", f"{nats['p50_ms']:.1f}", f"{http['p50_ms']:.1f}", f"{http['p50_ms'] / nats['p50_ms']:.2f}x"),
        ("p99 ms", f"{nats['p99_ms']:.1f}", f"{http['p99_ms']:.1f}", f"{http['p99_ms'] / nats['p99_ms']:.2f}x"),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    return "\n".join(lines)


async def main(args: argparse.Namespace) -> None:
    os.environ["CHORA_GATEWAY_PORT"] = "0"  # the services are child processes: settings by environment
    os.environ["CHORA_GATEWAY_RATE_PER_S"] = "0"  # no rate limit: the benchmark is the load
    with tempfile.TemporaryDirectory(prefix="chora-bench-gw-") as tmp:
        settings = Settings(
            home=Path(tmp) / "var",
            prefix="benchgw",
            nats_port=0,
            nats_http_port=0,
            metrics_port=0,
            configs_dir=Path(__file__).resolve().parent.parent / "examples" / "configs",
            nats=NatsSettings(url=None),
        )
        async with running_stack(settings, ["generator", "gateway"]) as (stack, nc):
            url = stack.info["gateway"]["gateway_url"]
            run = uuid.uuid4().hex[:8]
            await over_nats(nc, settings, 100, args.concurrency, run + "w")  # warm-up: imports, render workers
            await over_http(url, stack.gateway_key, 100, args.concurrency, run + "w")
            nats = await over_nats(nc, settings, args.requests, args.concurrency, run)
            http = await over_http(url, stack.gateway_key, args.requests, args.concurrency, run)
    m = _machine()
    print(f"{args.requests} requests per mode, {args.concurrency} concurrent clients, config {CONFIG}")
    print(f"machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}; clients, server and services share it")
    print(table(nats, http))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=2000, help="requests per mode")
    ap.add_argument("--concurrency", type=int, default=16, help="concurrent clients")
    asyncio.run(main(ap.parse_args()))
