"""What one wake-up costs on this machine: the floor under every latency figure.

A request through chora wakes a process about ten times on its way to its
content_validated line: nats-server, the generator, a render worker, the generator
again, nats-server, the validator, nats-server, the sink. At 200 req/s every one of
those processes sleeps between requests, so each hop pays a wake-up from idle. This
measures that price, with nothing of chora in the way:

  (a) a round trip through a pipe between two Python processes: back to back, and
      with ``--gap-ms`` of idle before each one (as at 200 req/s: 5 ms);
  (b) the CPU the woken process spends per wake-up, from the scheduler's own count
      (``/proc/PID/schedstat``), for a process that only reads a byte and writes it back;
  (c) a PING/PONG round trip to a nats-server (the embedded binary, a server of its
      own), back to back and after the same idle gap.

Prints one JSON object; `make bench` prints it under its table.
Usage: python -m bench.wakeup [--rounds N] [--gap-ms G]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import tempfile
import time
from pathlib import Path

from bench.e2e import _pcts
from bus.server import EmbeddedServer


def _echo(inp: int, out: int) -> None:
    while True:
        b = os.read(inp, 64)
        if not b:
            return
        os.write(out, b)


def _run_ns(pid: int) -> int | None:
    """Nanoseconds the process has run on a CPU (every thread), as the scheduler counts them;
    None where there is no /proc/PID/schedstat (not Linux)."""
    try:
        return sum(int((t / "schedstat").read_text().split()[0]) for t in Path(f"/proc/{pid}/task").iterdir())
    except (OSError, ValueError, IndexError):
        return None


def pipe(rounds: int, gap_s: float) -> dict:
    """Pipe round trips to an echoing child process, back to back and after ``gap_s`` idle."""
    child_in, to_child = os.pipe()  # (read end, write end)
    from_child, child_out = os.pipe()
    proc = multiprocessing.get_context("fork").Process(target=_echo, args=(child_in, child_out), daemon=True)
    proc.start()
    assert proc.pid is not None
    res: dict = {}
    try:
        for name, gap in (("back_to_back", 0.0), ("after_idle", gap_s)):
            ms: list[float] = []
            run0 = _run_ns(proc.pid)
            for _ in range(rounds):
                if gap:
                    time.sleep(gap)
                t = time.perf_counter()
                os.write(to_child, b"x")
                os.read(from_child, 64)
                ms.append((time.perf_counter() - t) * 1e3)
            run1 = _run_ns(proc.pid)
            cpu = None if run0 is None or run1 is None else round((run1 - run0) / rounds / 1e3, 1)
            res[name] = {**_pcts(ms), "child_cpu_us_per_wakeup": cpu}
    finally:
        os.close(to_child)
        proc.join(5)
        for fd in (child_in, child_out, from_child):
            os.close(fd)
    return res


def nats_ping(rounds: int, gap_s: float) -> dict:
    """PING/PONG round trips to a nats-server of its own, back to back and after ``gap_s`` idle."""
    with tempfile.TemporaryDirectory(prefix="chora-wakeup-") as tmp:
        server = EmbeddedServer(Path(tmp) / "store", config=None, http_port=None).start()
        try:
            assert server.url is not None
            host, port = server.url.split("://", 1)[1].rsplit(":", 1)
            with socket.create_connection((host, int(port)), timeout=10) as c:
                c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                c.recv(4096)  # INFO
                c.sendall(b'CONNECT {"verbose":false,"pedantic":false}\r\nPING\r\n')
                _pong(c)
                res: dict = {}
                for name, gap in (("back_to_back", 0.0), ("after_idle", gap_s)):
                    ms: list[float] = []
                    for _ in range(rounds):
                        if gap:
                            time.sleep(gap)
                        t = time.perf_counter()
                        c.sendall(b"PING\r\n")
                        _pong(c)
                        ms.append((time.perf_counter() - t) * 1e3)
                    res[name] = _pcts(ms)
                return res
        finally:
            server.stop()


def _pong(c: socket.socket) -> None:
    """Read up to our PONG. The server may send a PING of its own meanwhile (its first PING,
    which measures the round trip, comes a second or two after CONNECT, sometimes in the same
    read as our PONG): answered, or it would count us as a stale client."""
    got = b""
    while True:
        chunk = c.recv(64)
        if not chunk:
            raise ConnectionError("nats-server closed the connection")
        got += chunk
        *lines, got = got.split(b"\r\n")
        for line in lines:
            if line == b"PING":
                c.sendall(b"PONG\r\n")
        if b"PONG" in lines:
            return


def main(rounds: int = 2000, gap_ms: float = 5.0) -> dict:
    gap = gap_ms / 1e3
    return {
        "machine": {"cpus": os.cpu_count(), "load": "/".join(f"{x:.2f}" for x in os.getloadavg())},
        "rounds": rounds,
        "idle_gap_ms": gap_ms,
        "pipe_round_trip": pipe(rounds, gap),
        "nats_ping_round_trip": nats_ping(rounds, gap),
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2000, help="round trips of each kind")
    ap.add_argument("--gap-ms", type=float, default=5.0, help="idle before each round trip of the 'after idle' runs")
    args = ap.parse_args()
    print(json.dumps(main(args.rounds, args.gap_ms)))
