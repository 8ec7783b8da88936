"""`make bench`: the project, the FastStream peer and plain nats-py, in one run, same N.

1. the project (bench.e2e): all five services, each request measured to its
   content_validated line; the latency run starts once every consumer is idle;
2. the FastStream peer (../shared/bench/faststream_peer.py, in its own venv, see the
   Makefile), pull and push mode, each on a nats-server of its own;
3. plain nats-py in one process (bench.raw_peer), on a nats-server of its own;
4. what a wake-up costs on this machine (bench.wakeup), the floor under every latency
   figure: it is printed under the table.

Prints one table with the ratios (and, with --json FILE, everything as JSON).
The machine's load (`uptime`) is read before each part: on a shared machine the
ratios of one run are what to compare, not the absolute figures.

Usage: python -m bench.compare [--requests N] [--rate R] [--peer-python PY] [--peer-script FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import e2e, wakeup
from bus.server import EmbeddedServer

ROOT = Path(__file__).resolve().parent.parent


def load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def run_peer(cmd: list[str], env: dict[str, str], n: int, rate: float) -> dict:
    """One peer on a nats-server of its own; its one JSON line, plus the CPU time the peer and
    its server spent over the whole run (start-up, saturation and latency runs) per request."""
    with tempfile.TemporaryDirectory(prefix="chora-peer-") as tmp:
        server = EmbeddedServer(Path(tmp) / "store", config=None, http_port=None).start()
        try:
            assert server.url is not None and server.pid is not None
            server_cpu0 = e2e._cpu_s(server.pid)
            _children_cpu_since_last()
            proc = subprocess.Popen(
                [*cmd, server.url, str(n), str(rate)],
                env={**os.environ, **env},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            out, err = proc.communicate(timeout=1800)
            peer_cpu = _children_cpu_since_last()  # the peer only: its server is not waited for yet
            server_cpu = e2e._cpu_s(server.pid) - server_cpu0
        finally:
            server.stop()
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-2000:]}")
    res = json.loads(lines[-1])
    total = n + int(rate * 5)  # the peers' latency run is 5 s at `rate`
    res["cpu_ms_per_request"] = round((peer_cpu + server_cpu) * 1000 / total, 3)
    return res


_children_cpu = [0.0]


def _children_cpu_since_last() -> float:
    """CPU seconds of the child processes waited for since the last call (the peer just run)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    now = r.ru_utime + r.ru_stime
    spent, _children_cpu[0] = now - _children_cpu[0], now
    return spent


def table(rows: dict[str, dict], n: int, rate: float) -> str:
    """One markdown table; the last two columns are project / best peer and project / plain
    nats-py for each line (above 1 is better for throughput, below 1 for latency and CPU)."""
    proj = rows["project"]
    peers = [v for k, v in rows.items() if k.startswith("faststream")]
    best = max(peers, key=lambda r: r["throughput_rps"]) if peers else None
    raw = rows.get("raw nats-py")
    cols = list(rows)

    def ratio(key: str, other: dict | None) -> str:
        return f"{proj[key] / other[key]:.2f}x" if other and other[key] else "-"

    def line(label: str, cell, key: str, bold: bool = False) -> str:
        r1 = ratio(key, best)
        return (
            f"| {label} | "
            + " | ".join(cell(rows[c]) for c in cols)
            + (f" | **{r1}**" if bold else f" | {r1}")
            + f" | {ratio(key, raw)} |"
        )

    return "\n".join(
        [
            f"N = {n:,} requests at saturation; latency at {rate:g} req/s offered; "
            "load average (1/5/15 min) before each part",
            "",
            "| | " + " | ".join(cols) + " | project / best peer | project / raw nats-py |",
            "|---" * (len(cols) + 3) + "|",
            line(
                "throughput, req/s (to content_validated)",
                lambda r: f"{r['throughput_rps']:,.0f}",
                "throughput_rps",
                True,
            ),
            line(
                f"p50 / p95 / p99 ms at {rate:g} req/s (ratio: p99)",
                lambda r: f"{r['p50_ms']:,.1f} / {r['p95_ms']:,.1f} / {r['p99_ms']:,.1f}",
                "p99_ms",
            ),
            line("CPU ms per request, every process", lambda r: f"{r['cpu_ms_per_request']:.2f}", "cpu_ms_per_request"),
            "| load before | " + " | ".join(rows[c]["load"] for c in cols) + " | | |",
        ]
    )


def wake_line(w: dict) -> str:
    """bench.wakeup's figures in one sentence, under the table."""
    pipe, ping = w["pipe_round_trip"], w["nats_ping_round_trip"]

    def rt(r: dict) -> str:
        return f"{r['p50_ms']:.2f} / {r['p99_ms']:.2f} ms"

    cpu = pipe["after_idle"]["child_cpu_us_per_wakeup"]  # None where /proc has no schedstat
    return (
        f"This machine ({w['machine']['cpus']} CPUs, load {w['machine']['load']}), one hop after "
        f"{w['idle_gap_ms']:g} ms idle, p50 / p99: pipe round trip between two processes "
        f"{rt(pipe['after_idle'])} (back to back {rt(pipe['back_to_back'])}), "
        f"PING to nats-server {rt(ping['after_idle'])} (back to back {rt(ping['back_to_back'])})"
        + ("." if cpu is None else f"; the woken process spends {cpu:g} us of CPU per wake-up.")
    )


async def project(args: argparse.Namespace) -> dict:
    ns = argparse.Namespace(
        requests=args.requests,
        rate=args.rate,
        seconds=args.seconds,
        services="",
        until=e2e.CONTENT_VALIDATED,
    )
    return await e2e.main(ns)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=20_000, help="N: requests of every saturation run")
    ap.add_argument("--rate", type=float, default=200.0, help="offered rate of every latency run")
    ap.add_argument("--seconds", type=float, default=10.0, help="length of the project's latency run")
    ap.add_argument("--peer-python", default=str(ROOT / ".venv-peer" / "bin" / "python"))
    ap.add_argument("--peer-script", default=str(ROOT.parent / "shared" / "bench" / "faststream_peer.py"))
    ap.add_argument("--skip", default="", help="comma-separated parts to leave out: project,pull,push,raw,wakeup")
    ap.add_argument("--json", help="also write every figure to this file")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    rows: dict[str, dict] = {}
    detail: dict[str, dict] = {}
    if "project" not in skip:
        before = load()
        res = asyncio.run(project(args))
        detail["project"] = res
        lat = res["latency"]
        rows["project"] = {
            "throughput_rps": res["saturation"]["end_to_end_per_s"],
            "p50_ms": lat["p50_ms"],
            "p95_ms": lat["p95_ms"],
            "p99_ms": lat["p99_ms"],
            "cpu_ms_per_request": round(sum(res["saturation"]["cpu_ms_per_request"].values()), 3),
            "load": before,
        }
        print(json.dumps(res), file=sys.stderr)
    have_peer = Path(args.peer_python).exists() and Path(args.peer_script).exists()
    if not have_peer:
        print(f"no FastStream peer ({args.peer_python}, {args.peer_script}): `make bench` installs it", file=sys.stderr)
    for mode, pull in (("pull", "1"), ("push", "0")):
        if have_peer and mode not in skip:
            before = load()
            res = run_peer([args.peer_python, args.peer_script], {"PEER_PULL": pull}, args.requests, args.rate)
            rows[f"faststream {mode}"] = {**res, "load": before}
            print(json.dumps(res), file=sys.stderr)
    if "raw" not in skip:
        before = load()
        res = run_peer([sys.executable, "-m", "bench.raw_peer"], {"PYTHONPATH": str(ROOT)}, args.requests, args.rate)
        rows["raw nats-py"] = {**res, "load": before}
        print(json.dumps(res), file=sys.stderr)
    if "wakeup" not in skip:
        try:
            detail["wakeup"] = wakeup.main(rounds=1000)
            print(json.dumps(detail["wakeup"]), file=sys.stderr)
        except Exception as e:  # a side measurement: the table above it stands without it
            print(f"the wake-up probe failed ({type(e).__name__}: {e}); no wake-up line", file=sys.stderr)
    print(table(rows, args.requests, args.rate) if "project" in rows else json.dumps(rows, indent=2))
    if "wakeup" in detail:
        print("\n" + wake_line(detail["wakeup"]))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "detail": detail}, indent=2))


if __name__ == "__main__":
    main()
