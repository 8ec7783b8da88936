"""End-to-end benchmark: request published -> its outcome's line in the JSONL.

Starts the real stack (embedded nats-server and every service as its own
process, exactly as `chora up` does) in a temp dir, then measures, up to the
``--until`` event (content_validated by default, the last stage of a request):

  (a) throughput at saturation: N requests published as fast as JetStream
      takes them; time from the first publish to the N-th outcome line written
      to the telemetry JSONL (the sink's timestamp of the line; the file is read
      every 50 ms, so the reader takes little CPU from the stack), and the CPU
      every process spent meanwhile, this one (publisher and reader) included;
  (b) latency at a fixed offered rate (default 200/s), started only once every
      consumer of the stream is idle (nothing pending, nothing unacknowledged),
      so it does not measure the saturation run's backlog: for each request,
      the time from just before its publish to its outcome line written to the
      JSONL (the line's own timestamp, the peers' end point; the file is read
      every 50 ms here too); p50/p95/p99;
  (c) the telemetry sink's resident memory after all of it.

Prints one JSON object. Usage: python -m bench.e2e [--requests N] [--rate R] [--seconds S]
`make bench` (bench.compare) runs it next to the FastStream peer and plain nats-py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path

import msgspec

from bench.stack import running_stack
from bus.publisher import Publisher
from bus.settings import NatsSettings
from services.settings import Settings
from contracts.catalogue import CONTENT_GENERATED, CONTENT_VALIDATED, GENERATION_REQUESTED
from contracts.envelope import new_event
from contracts.events import GenerationRequested


class _Line(msgspec.Struct):
    event_type: str
    request_id: str | None = None
    timestamp: str | None = None  # when the sink wrote the line
    event_time: str | None = None  # when its producer made the outcome (the --until event)


_decode_line = msgspec.json.Decoder(_Line).decode


class JsonlFollower:
    """Reads new complete lines of the JSONL; records, for the first ``event_type`` line of
    each request id, when its outcome was made and when the sink wrote the line."""

    def __init__(self, path: Path, event_type: str = CONTENT_VALIDATED):
        self.path = path
        self.event_type = event_type
        self.marker = event_type.encode()
        self.pos = 0
        self.buf = b""
        self.wall: dict[str, tuple[float, float]] = {}  # id -> (outcome made, line written)

    def poll(self) -> int:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.pos)
                chunk = f.read()
        except FileNotFoundError:
            return 0
        if not chunk:
            return 0
        self.pos += len(chunk)
        data = self.buf + chunk
        *lines, self.buf = data.split(b"\n")
        n = 0
        for ln in lines:
            if self.marker not in ln:
                continue
            rec = _decode_line(ln)
            if rec.event_type == self.event_type and rec.request_id and rec.request_id not in self.wall:
                self.wall[rec.request_id] = (_ts(rec.event_time), _ts(rec.timestamp))
                n += 1
        return n

    async def wait_for(self, ids: set[str], timeout: float, every: float = 0.05) -> None:
        """Until every id's line was read, reading the file every ``every`` seconds (not after
        each of the sink's writes: a reader woken that often competes with the stack for CPU)."""
        deadline = time.perf_counter() + timeout
        while not ids.issubset(self.wall.keys()):
            left = deadline - time.perf_counter()
            if left <= 0:
                missing = len(ids - self.wall.keys())
                raise TimeoutError(f"{missing} of {len(ids)} outcomes missing after {timeout}s")
            await asyncio.sleep(min(left, every))
            self.poll()


def _ts(rfc3339: str | None) -> float:
    if not rfc3339:
        return float("nan")
    return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


def _pcts(values: list[float]) -> dict:
    q = statistics.quantiles(sorted(values), n=100, method="inclusive")
    return {"p50_ms": round(q[49], 3), "p95_ms": round(q[94], 3), "p99_ms": round(q[98], 3)}


def _request(i: int, bench_run: str):
    return new_event(
        GENERATION_REQUESTED,
        GenerationRequested(content_config_id="hello-world", context={"name": f"user-{i}"}),
        source="chora://bench",
        trace_id=bench_run,
    )


def _rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _descendants(pid: int) -> list[int]:
    """``pid`` and every process under it (the generator's render workers and forkserver)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _pids(stack) -> dict[str, list[int]]:
    """The processes of each part of the stack: a service with its descendants (the render
    workers do the generator's renders: their CPU is the generator's), nats-server and the
    benchmark's own."""
    pids = {name: _descendants(p.pid) for name, p in stack.children.items()}
    if stack.server is not None and stack.server.pid is not None:
        pids["nats-server"] = [stack.server.pid]
    # this process: the publisher of the requests and the reader of the JSONL (a peer's CPU
    # includes its own publisher: so does the total here)
    pids["bench"] = [os.getpid()]
    return pids


async def wait_idle(js, stream: str, timeout: float = 300.0) -> float:
    """Wait until every consumer of ``stream`` that a service reads has nothing pending and
    nothing awaiting its ack; return how long that took. The latency run starts only then:
    otherwise it measures the backlog the saturation run left behind. A durable that has
    delivered nothing (``--services`` left out the service that reads it) is not waited for."""
    t0 = said = time.perf_counter()
    busy: list[str] = []
    while time.perf_counter() - t0 < timeout:
        infos = await js.consumers_info(stream)
        busy = [
            f"{c.name} ({c.num_pending} pending, {c.num_ack_pending} unacked)"
            for c in infos
            if (c.num_pending or c.num_ack_pending) and c.delivered is not None and c.delivered.consumer_seq
        ]
        if not busy:
            return time.perf_counter() - t0
        if time.perf_counter() - said >= 10:
            said = time.perf_counter()
            print(f"waiting for idle consumers: {', '.join(busy)}", file=sys.stderr, flush=True)
        await asyncio.sleep(0.1)
    raise TimeoutError(f"consumers still busy after {timeout}s: {', '.join(busy)}")


def _machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "system": platform.platform()}


async def saturation(pub: Publisher, follower: JsonlFollower, n: int, run: str, pids: dict[str, list[int]]) -> dict:
    cpu0 = {name: sum(_cpu_s(p) for p in procs) for name, procs in pids.items()}
    events = [_request(i, run) for i in range(n)]
    ids = {e.id for e in events}
    t0_wall, t0 = time.time(), time.perf_counter()
    window = 2000
    for i in range(0, n, window):  # pipelined publishes, at most `window` awaiting their PubAck
        await pub.publish_many(events[i : i + window])
    published = time.perf_counter()
    # The end is the N-th outcome line as the sink wrote it (its own timestamp, the peers' end
    # point too), so the file is read only every 50 ms instead of after each of the sink's writes:
    # a reader woken for every write took about a tenth of the stack's CPU.
    await follower.wait_for(ids, timeout=max(120.0, n / 200))
    last = max(follower.wall[i][1] for i in ids)
    cpu = {name: (sum(_cpu_s(p) for p in procs) - cpu0[name]) * 1000 / n for name, procs in pids.items()}
    return {
        "requests": n,
        "publish_rate_per_s": round(n / (published - t0)),
        "end_to_end_per_s": round(n / (last - t0_wall)),
        "seconds": round(last - t0_wall, 2),
        # CPU per request of each process, from the first publish to the last outcome line (a
        # service still draining a backlog then, e.g. the sink, is counted only so far)
        "cpu_ms_per_request": {k: round(v, 3) for k, v in sorted(cpu.items())},
    }


async def fixed_rate(pub: Publisher, follower: JsonlFollower, rate: float, seconds: float, run: str) -> dict:
    n = int(rate * seconds)
    sent_wall: dict[str, float] = {}
    start = time.perf_counter()
    stop = asyncio.Event()

    async def reader():  # the file every 50 ms, not after each of the sink's writes (see below)
        while not stop.is_set():
            await asyncio.sleep(0.05)
            follower.poll()

    rtask = asyncio.create_task(reader())
    for i in range(n):
        due = start + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        ev = _request(i, run)
        sent_wall[ev.id] = time.time()
        asyncio.ensure_future(pub.publish(ev))
    stop.set()
    await rtask
    await follower.wait_for(set(sent_wall), timeout=60)
    made, written = zip(*(follower.wall[i] for i in sent_wall))
    starts = list(sent_wall.values())
    # A request ends when the sink writes its outcome's line: the line's own timestamp (the sink's
    # clock, the same machine's), the peers' end point too (their sink's handler takes the time).
    # Until 2026-11-29 it ended when this process, woken by inotify for each of the sink's writes
    # (three per request), read the line: that wake-up added its own 0.6 / 2.2 ms (p50 / p99),
    # and the reader's 600 wake-ups a second competed for the two cores with the stack measured.
    lat = sorted((w - s) * 1000 for w, s in zip(written, starts))
    return {
        "offered_per_s": rate,
        "requests": n,
        **_pcts(lat),
        "max_ms": round(lat[-1], 3),
        # where the time goes (wall clocks of one machine): publish -> the outcome was made (by the
        # generator or the validator, as --until says) -> the sink wrote its line
        "stages": {
            "publish_to_outcome": _pcts([(m - s) * 1000 for m, s in zip(made, starts)]),
            "outcome_to_line": _pcts([(w - m) * 1000 for w, m in zip(written, made)]),
        },
    }


async def main(args: argparse.Namespace) -> dict:
    # The follower reads one file: no size rotation in the sink (rotation is tested elsewhere).
    # The services are child processes and take their settings from the environment.
    os.environ["CHORA_TELEMETRY_ROTATE_BYTES"] = "0"
    with tempfile.TemporaryDirectory(prefix="chora-bench-") as tmp:
        settings = Settings(
            home=Path(tmp) / "var",
            prefix="bench",
            nats_port=0,
            nats_http_port=0,
            metrics_port=0,
            configs_dir=Path(__file__).resolve().parent.parent / "examples" / "configs",
            nats=NatsSettings(url=None),
        )
        async with running_stack(settings, args.services.split(",") if args.services else None) as (stack, nc):
            pub = Publisher(nc.jetstream(), settings.prefix)
            follower = JsonlFollower(settings.jsonl_path, args.until)
            run = uuid.uuid4().hex
            await fixed_rate(pub, follower, args.rate, 2, run)  # warm-up: imports, caches, connections
            await wait_idle(nc.jetstream(), settings.stream_name)
            sat = await saturation(pub, follower, args.requests, run, _pids(stack))
            idle_s = await wait_idle(nc.jetstream(), settings.stream_name)
            lat = await fixed_rate(pub, follower, args.rate, args.seconds, run)
            events = sum(1 for _ in open(settings.jsonl_path, "rb"))
            sink_rss = _rss_mb(stack.children["telemetry"].pid)
            gen_rss = _rss_mb(stack.children["generator"].pid)
            services = sorted(stack.children)
        return {
            "machine": _machine(),
            "services": services,
            "until": args.until,
            "saturation": sat,
            "seconds_to_idle": round(idle_s, 2),
            "latency": lat,
            "sink": {"events_in_jsonl": events, "rss_mb": round(sink_rss or 0, 1)},
            "generator": {"rss_mb": round(gen_rss or 0, 1)},
        }


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=50_000, help="requests for the saturation run")
    ap.add_argument("--rate", type=float, default=200.0, help="offered rate for the latency run")
    ap.add_argument("--seconds", type=float, default=15.0, help="length of the latency run")
    ap.add_argument("--services", default="", help="comma-separated services to run (default: all of them)")
    ap.add_argument(
        "--until",
        default=CONTENT_VALIDATED,
        choices=(CONTENT_VALIDATED, CONTENT_GENERATED),
        help="the outcome whose JSONL line ends a request's measurement",
    )
    print(json.dumps(asyncio.run(main(ap.parse_args())), indent=2))
