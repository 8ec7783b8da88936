"""What isolating renders costs: per render, and for the whole stack, in one run.

(a) Per render, hello-world (the examples' jinja2 config), in this process:
    - in-loop: ``Jinja2Generator.render`` called directly (what the event loop would do);
    - pool, one at a time: a request waits for its answer before the next is sent
      (latency: IPC, two process wake-ups, the render);
    - pool, concurrent: ``--concurrency`` requests in flight (throughput);
    with the parent's CPU time per render (what the event loop spends on it) and the
    workers' (the render itself plus the worker's side of the round trip).
(b) The full stack (bench.e2e: embedded nats-server, generator and telemetry processes),
    saturation and fixed-rate latency, twice in the same run: renders on the event loop
    (CHORA_RENDER_ISOLATION=false, "before") and in the render pool ("after"), alternating
    ``--rounds`` times; the ratio after/before of the best round of each.

Prints one JSON object. Usage: python -m bench.isolation [--requests N] [--rounds R]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path

from bench import e2e
from composition.configs import ConfigStore
from services.generator.generators.jinja import Jinja2Generator
from services.generator.isolation import RenderLimits, RenderPool

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "configs"


def _per(seconds: float, n: int) -> float:
    return round(seconds / n * 1e6, 1)


def _workers_cpu(pool: RenderPool) -> float:
    """CPU seconds the pool's live workers have used (the same workers throughout a measurement:
    hello-world never kills one)."""
    return sum(e2e._cpu_s(w.proc.pid) for w in pool._all)


async def per_render(n: int, concurrency: int) -> dict:
    config = ConfigStore(EXAMPLES).get("hello-world")
    context = {**config.defaults, "name": "bench"}
    gen = Jinja2Generator()
    gen.render(config, context)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n):
        gen.render(config, context)
    in_loop = {"us_per_render": _per(time.perf_counter() - t0, n), "cpu_us": _per(time.process_time() - c0, n)}

    pool = RenderPool(RenderLimits())
    pool.start()
    try:
        for _ in range(2 * pool.size):  # every worker started and holding the compiled template
            await asyncio.gather(*(pool.render(config, context) for _ in range(pool.size)))
        t0, c0, w0 = time.perf_counter(), time.process_time(), _workers_cpu(pool)
        for _ in range(n):
            await pool.render(config, context)
        one = {
            "us_per_render": _per(time.perf_counter() - t0, n),
            "parent_cpu_us": _per(time.process_time() - c0, n),
            "workers_cpu_us": _per(_workers_cpu(pool) - w0, n),
        }
        sem = asyncio.Semaphore(concurrency)

        async def bounded() -> None:
            async with sem:
                await pool.render(config, context)

        t0, c0, w0 = time.perf_counter(), time.process_time(), _workers_cpu(pool)
        await asyncio.gather(*(bounded() for _ in range(n)))
        many = {
            "us_per_render": _per(time.perf_counter() - t0, n),
            "parent_cpu_us": _per(time.process_time() - c0, n),
            "workers_cpu_us": _per(_workers_cpu(pool) - w0, n),
            "concurrency": concurrency,
        }
    finally:
        pool.close()
    return {
        "renders": n,
        "workers": pool.size,
        "in_loop": in_loop,
        "pool_one_at_a_time": one,
        "pool_concurrent": many,
        "pool_parent_cpu_over_in_loop": round(many["parent_cpu_us"] / in_loop["cpu_us"], 2),
    }


async def full_stack(requests: int, rate: float, seconds: float, rounds: int) -> dict:
    runs: dict[str, list[dict]] = {"in_loop": [], "pool": []}
    args = argparse.Namespace(requests=requests, rate=rate, seconds=seconds, services="generator,telemetry")
    for _ in range(rounds):
        for mode, flag in (("in_loop", "false"), ("pool", "true")):
            os.environ["CHORA_RENDER_ISOLATION"] = flag  # read by the generator process
            out = await e2e.main(args)
            runs[mode].append(
                {"saturation": out["saturation"], "latency": out["latency"], "generator": out["generator"]}
            )
    os.environ.pop("CHORA_RENDER_ISOLATION", None)

    def best(mode: str) -> dict:
        return max(runs[mode], key=lambda r: r["saturation"]["end_to_end_per_s"])

    before, after = best("in_loop"), best("pool")
    return {
        "runs": runs,
        "best_end_to_end_per_s": {
            "in_loop": before["saturation"]["end_to_end_per_s"],
            "pool": after["saturation"]["end_to_end_per_s"],
        },
        "throughput_ratio_pool_over_in_loop": round(
            after["saturation"]["end_to_end_per_s"] / before["saturation"]["end_to_end_per_s"], 3
        ),
        "p50_ms_at_fixed_rate": {"in_loop": before["latency"]["p50_ms"], "pool": after["latency"]["p50_ms"]},
    }


async def main(args: argparse.Namespace) -> dict:
    out: dict = {"machine": e2e._machine(), "loadavg_at_start": os.getloadavg()}
    out["per_render"] = await per_render(args.renders, args.concurrency)
    if args.requests > 0:
        out["full_stack"] = await full_stack(args.requests, args.rate, args.seconds, args.rounds)
    out["loadavg_at_end"] = os.getloadavg()
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--renders", type=int, default=5000, help="renders per in-process measurement")
    ap.add_argument("--concurrency", type=int, default=64, help="renders in flight for the concurrent figure")
    ap.add_argument("--requests", type=int, default=10_000, help="requests per full-stack saturation run (0: none)")
    ap.add_argument("--rate", type=float, default=200.0, help="offered rate of the latency run")
    ap.add_argument("--seconds", type=float, default=5.0, help="length of the latency run")
    ap.add_argument("--rounds", type=int, default=2, help="full-stack runs of each mode, alternating")
    print(json.dumps(asyncio.run(main(ap.parse_args())), indent=2))
