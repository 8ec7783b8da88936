"""Result cache benchmark: generation requests per second through the generator
service, on the cache-hit path next to the miss path and no cache at all, in one run.

Starts an embedded nats-server and the generator service as its own process
(as `chora up` does) over a temp configs directory with one jinja2 template
(a table of ``--rows`` rows) in two configs: ``cached`` (``cache: 1h``) and
``uncached`` (``cache: off``). Then, for each path, N requests are published
pipelined and the time runs from the first publish to the N-th
``content_generated`` (read from its subject):

  off   every request to ``uncached``, each with its own context: render only;
  miss  every request to ``cached``, each with its own context: a KV get, a claim,
        the render, the put and the release;
  hit   every request to ``cached`` with one context, after one warm-up request:
        a KV get and no render.

Prints one JSON object. Usage: python -m bench.cache [--requests N] [--rows R]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

from bench.e2e import _machine, _rss_mb
from bench.stack import running_stack
from bus.publisher import Publisher
from bus.settings import NatsSettings
from contracts.catalogue import CONTENT_GENERATED, GENERATION_REQUESTED, subject_for
from contracts.envelope import decode, new_event
from contracts.events import GenerationRequested
from services.settings import Settings

TEMPLATE = """# Report for {{ name }}

| row | owner | score |
| --- | --- | --- |
{% for i in range(rows) %}| {{ i }} | {{ name }} | {{ (i * 7 + seed) % 13 }} |
{% endfor %}
"""


def write_configs(d: Path) -> None:
    (d / "report.md.j2").write_text(TEMPLATE)
    for config_id, cache in (("cached", "1h"), ("uncached", "off")):
        doc = {"id": config_id, "generator": "jinja2", "template_file": "report.md.j2", "cache": cache}
        (d / f"{config_id}.json").write_text(json.dumps(doc))


class Outcomes:
    def __init__(self) -> None:
        self.waiting: set[str] = set()
        self.cached = 0
        self.errors = 0
        self.done = asyncio.Event()

    async def on_msg(self, msg) -> None:
        data = decode(msg.headers, msg.data).data
        if data.request_id in self.waiting:
            self.waiting.discard(data.request_id)
            self.cached += bool(data.cached)
            self.errors += data.status != "success"
            if not self.waiting:
                self.done.set()


async def run_path(pub: Publisher, outcomes: Outcomes, config_id: str, n: int, rows: int, same: bool) -> dict:
    events = [
        new_event(
            GENERATION_REQUESTED,
            GenerationRequested(
                content_config_id=config_id, context={"name": "Ada", "rows": rows, "seed": 0 if same else i}
            ),
            source="chora://bench",
        )
        for i in range(n)
    ]
    outcomes.waiting, outcomes.cached, outcomes.errors = {e.id for e in events}, 0, 0
    outcomes.done.clear()
    t0 = time.perf_counter()
    for i in range(0, n, 1000):  # pipelined, at most 1000 awaiting their PubAck
        await pub.publish_many(events[i : i + 1000])
    await asyncio.wait_for(outcomes.done.wait(), max(120.0, n / 50))
    seconds = time.perf_counter() - t0
    return {
        "requests": n,
        "per_s": round(n / seconds),
        "seconds": round(seconds, 2),
        "cached_outcomes": outcomes.cached,
        "errors": outcomes.errors,
    }


async def main(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="chora-bench-cache-") as tmp:
        configs = Path(tmp) / "configs"
        configs.mkdir()
        write_configs(configs)
        settings = Settings(
            home=Path(tmp) / "var",
            prefix="benchcache",
            nats_port=0,
            nats_http_port=0,
            metrics_port=0,
            configs_dir=configs,
            nats=NatsSettings(url=None),
        )
        async with running_stack(settings, ["generator"]) as (stack, nc):
            pub = Publisher(nc.jetstream(), settings.prefix)
            outcomes = Outcomes()
            await nc.subscribe(subject_for(CONTENT_GENERATED, settings.prefix), cb=outcomes.on_msg)
            await run_path(pub, outcomes, "uncached", 200, args.rows, same=False)  # warm-up
            off = await run_path(pub, outcomes, "uncached", args.requests, args.rows, same=False)
            miss = await run_path(pub, outcomes, "cached", args.requests, args.rows, same=False)
            await run_path(pub, outcomes, "cached", 1, args.rows, same=True)  # the one entry of the hit path
            hit = await run_path(pub, outcomes, "cached", args.requests, args.rows, same=True)
            rss = _rss_mb(stack.children["generator"].pid)
        return {
            "machine": _machine(),
            "template_rows": args.rows,
            "content_bytes": len(TEMPLATE) + args.rows * 20,  # about
            "paths": {"off": off, "miss": miss, "hit": hit},
            "hit_vs_off": round(hit["per_s"] / off["per_s"], 2),
            "miss_vs_off": round(miss["per_s"] / off["per_s"], 2),
            "generator_rss_mb": round(rss or 0, 1),
        }


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=5000, help="requests per path")
    ap.add_argument("--rows", type=int, default=200, help="rows of the rendered table (the render's cost)")
    print(json.dumps(asyncio.run(main(ap.parse_args())), indent=2))
