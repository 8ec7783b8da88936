"""The telemetry sink alone, against the nats-py receive ceiling, in one run.

Starts an embedded nats-server in a temp dir, pre-fills the events stream with N
content_generated events (a rendered text of a few hundred characters, as a hello-world
config gives: the body and headers the generator publishes), then measures, one after
the other on the same stream:

  (a) the ceiling: a durable push consumer in this process (nats-py, flow control,
      AckPolicy.NONE) whose callback only counts, until it has seen N messages;
  (b) the sink: `chora service run telemetry` as its own process (the real service)
      until the JSONL holds N lines. Its rate is counted from its first line (process
      start, imports and connecting are reported apart), its peak RSS is VmHWM from
      /proc; then the file is checked: every stream sequence 1..N exactly once.

Prints a table and one JSON object (with the load average: the machine may be shared;
compare ratios of the same run), and the best of each over the rounds (the VM runs in
speed phases). Usage: python -m bench.sink [--events N] [--repeat R]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgspec
import nats
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from bus.server import EmbeddedServer
from bus.settings import BusSettings
from bus.topology import Topology, provision
from contracts.catalogue import CONTENT_GENERATED, GENERATION_REQUESTED
from contracts.envelope import encode_binary, new_event
from contracts.events import ContentGenerated, GenerationRequested

PREFIX = "bench"
_TEXT = "Hello, {name}! Welcome to chora-compose. " * 8


class _Seq(msgspec.Struct):
    seq: int


def _events(n: int) -> list[tuple[str, dict[str, str], bytes]]:
    out = []
    subject = f"{PREFIX}.content_generated.standalone"
    for i in range(n):
        cause = new_event(
            GENERATION_REQUESTED,
            GenerationRequested(content_config_id="welcome", context={"name": f"user-{i}"}),
            source="bench",
        )
        text = _TEXT.format(name=f"user-{i}")
        ev = new_event(
            CONTENT_GENERATED,
            ContentGenerated(
                request_id=cause.id,
                content_config_id="welcome",
                status="success",
                generator_type="jinja2",
                duration_ms=0.42,
                content=text,
                content_hash="sha256:" + hashlib.sha256(text.encode()).hexdigest(),
                content_length=len(text),
            ),
            source="chora/generator",
            cause=cause,
        )
        headers, body = encode_binary(ev)
        out.append((subject, headers, body))
    return out


async def _prefill(js, events) -> None:
    window = 2000
    for i in range(0, len(events), window):
        futs = [await js.publish_async(s, b, headers=h) for s, h, b in events[i : i + window]]
        await asyncio.gather(*futs)


async def _ceiling(js, stream: str, n: int, name: str) -> tuple[float, float]:
    """(seconds, CPU seconds of this process) a count-only durable push consumer takes to
    receive ``n`` messages."""
    done = asyncio.Event()
    count = 0
    t0 = c0 = 0.0

    async def cb(msg) -> None:
        nonlocal count, t0, c0
        if count == 0:
            t0, c0 = time.perf_counter(), time.process_time()
        count += 1
        if count == n:
            done.set()

    cfg = ConsumerConfig(
        durable_name=name,
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.NONE,
        flow_control=True,
        idle_heartbeat=2.0,
    )
    sub = await js.subscribe(
        f"{PREFIX}.>", stream=stream, durable=name, config=cfg, cb=cb, manual_ack=True, flow_control=True
    )
    await asyncio.wait_for(done.wait(), 300)
    secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    await sub.unsubscribe()
    await js.delete_consumer(stream, name)
    scale = n / max(1, n - 1)  # the clocks started at the first message
    return secs * scale, cpu * scale


def _status_kb(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _sink_run(url: str, home: Path, n: int, profile: str | None = None) -> dict:
    """Run the telemetry service until its JSONL holds ``n`` lines."""
    jsonl = home / "telemetry" / "events.jsonl"
    env = dict(os.environ)
    env.update(
        NATS_URL=url,
        CHORA_HOME=str(home),
        CHORA_PREFIX=PREFIX,
        CHORA_METRICS_PORT="0",
        CHORA_MONITOR_INTERVAL_S="60",
    )
    home.mkdir(parents=True, exist_ok=True)
    t_spawn = time.perf_counter()
    cmd = [sys.executable, "-m", "chora", "service", "run", "telemetry"]
    if profile:  # py-spy (a dev dependency) samples the process; collapsed stacks in ``profile``
        spy = Path(sys.executable).with_name("py-spy")
        cmd = [str(spy), "record", "--format", "raw", "--rate", "250", "--nonblocking", "-o", profile, "--", *cmd]
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(home / "telemetry.log", "wb"),
    )
    t_first = None
    lines = 0
    pos = 0
    peak_kb = 0
    try:
        while lines < n:
            if proc.poll() is not None:
                raise RuntimeError(f"telemetry exited with {proc.returncode}; see {home / 'telemetry.log'}")
            try:
                with open(jsonl, "rb") as f:
                    f.seek(pos)
                    chunk = f.read()
            except FileNotFoundError:
                chunk = b""
            if chunk:
                cut = chunk.rfind(b"\n") + 1
                got = chunk[:cut].count(b"\n")
                if got and t_first is None:
                    t_first = time.perf_counter()
                    cpu_first = _cpu_s(proc.pid)
                    first_lines = got
                lines += got
                pos += cut
            peak_kb = max(peak_kb, _status_kb(proc.pid, "VmHWM"))
            time.sleep(0.005)
        t_end = time.perf_counter()
        peak_kb = max(peak_kb, _status_kb(proc.pid, "VmHWM"))
        cpu = _cpu_s(proc.pid)
    finally:
        proc.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT; the service drains on it
        proc.wait(60)
    assert t_first is not None
    seqs = [msgspec.json.decode(x, type=_Seq).seq for x in jsonl.read_bytes().splitlines()]
    exactly_once = sorted(seqs) == list(range(1, n + 1))
    return {
        "events_per_s": round((n - first_lines) / max(1e-9, t_end - t_first)),
        "seconds": round(t_end - t_first, 3),
        "start_s": round(t_first - t_spawn, 3),
        "total_s": round(t_end - t_spawn, 3),
        "peak_rss_mb": round(peak_kb / 1024, 1),
        "cpu_s": round(cpu, 2),
        "cpu_us_per_event": round((cpu - cpu_first) / max(1, n - first_lines) * 1e6, 1),
        "lines": len(seqs),
        "exactly_once": exactly_once,
    }


def _cpu_s(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


async def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=1, help="measure ceiling and sink this many times (alternating)")
    ap.add_argument("--profile", help="record the sink with py-spy into this file (collapsed stacks)")
    args = ap.parse_args(argv)
    n = args.events
    with tempfile.TemporaryDirectory(prefix="chora-bench-sink-") as tmp:
        server = EmbeddedServer(Path(tmp) / "store").start()
        try:
            assert server.url is not None
            nc = await nats.connect(server.url)
            js = nc.jetstream(timeout=10)
            topo = Topology.from_settings(BusSettings(prefix=PREFIX))
            await provision(js, topo, consumers=[])
            events = _events(n)
            t = time.perf_counter()
            await _prefill(js, events)
            prefill_s = time.perf_counter() - t
            body = len(events[0][2])
            head = sum(len(k) + len(v) + 4 for k, v in events[0][1].items())
            del events
            rounds = []
            for r in range(args.repeat):
                load = _load()
                secs, cpu = await _ceiling(js, topo.events_stream, n, f"bench-ceiling-{r}")
                ceiling, ceiling_cpu_us = n / secs, cpu / n * 1e6
                sink = _sink_run(server.url, Path(tmp) / f"home-{r}", n, args.profile)
                rounds.append(
                    {
                        "load_before": load,
                        "ceiling_msgs_per_s": round(ceiling),
                        "ceiling_cpu_us_per_msg": round(ceiling_cpu_us, 1),
                        "sink": sink,
                        "ratio": round(sink["events_per_s"] / ceiling, 3),
                        # CPU per message, ceiling / sink: what the ratio would be with a core each
                        "cpu_ratio": round(ceiling_cpu_us / max(0.1, sink["cpu_us_per_event"]), 3),
                        "load_after": _load(),
                    }
                )
            await nc.close()
        finally:
            server.stop()
    # This VM runs in phases (the same ceiling measured 21,000 and 32,000 msg/s a minute apart),
    # so one round's ratio says as much about the phase as about the sink: the best of each
    # over the alternating rounds compares the two at the machine's best.
    best_ceiling = max(r["ceiling_msgs_per_s"] for r in rounds)
    best_sink = max(r["sink"]["events_per_s"] for r in rounds)
    result = {
        "events": n,
        "body_bytes": body,
        "header_bytes": head,
        "prefill_s": round(prefill_s, 2),
        "rounds": rounds,
        "best": {
            "ceiling_msgs_per_s": best_ceiling,
            "sink_events_per_s": best_sink,
            "ratio": round(best_sink / best_ceiling, 3),
            "peak_rss_mb": max(r["sink"]["peak_rss_mb"] for r in rounds),
            "exactly_once": all(r["sink"]["exactly_once"] for r in rounds),
        },
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }
    print(f"sink alone, {n} pre-filled content_generated events ({body} B body, ~{head} B headers)")
    print(
        "| round | load (1/5/15 min) | ceiling msg/s | sink events/s | ratio | CPU us/msg ceiling / sink | CPU ratio "
        "| start s | peak RSS MB | once |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for i, r in enumerate(rounds):
        s = r["sink"]
        print(
            f"| {i + 1} | {r['load_before']} | {r['ceiling_msgs_per_s']:,} | {s['events_per_s']:,} | "
            f"{r['ratio']:.0%} | {r['ceiling_cpu_us_per_msg']} / {s['cpu_us_per_event']} | {r['cpu_ratio']:.0%} "
            f"| {s['start_s']} | {s['peak_rss_mb']} | {s['exactly_once']} |"
        )
    b = result["best"]
    print(
        f"| best of {len(rounds)} | | {b['ceiling_msgs_per_s']:,} | {b['sink_events_per_s']:,} | {b['ratio']:.0%} "
        f"| | | | {b['peak_rss_mb']} | {b['exactly_once']} |"
    )
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    asyncio.run(main())
