"""A stack of real processes for fault tests: nats-server and each service as its
own OS process, so kill -9 means kill -9. Reads outcomes from the JSONL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

from bus.server import EmbeddedServer
from tests.conftest import ROOT, child_env

SERVICES = ("generator", "validator", "assembler", "telemetry", "notifier")


class ProcStack:
    def __init__(
        self, tmp: Path, server: EmbeddedServer | None = None, *, urls: str | None = None, extra_env: dict | None = None
    ):
        self.tmp = tmp
        self.home = tmp / "var"
        self.server = server
        self.url = urls or (server.url if server else None)
        self.prefix = "f" + uuid.uuid4().hex[:8]
        self.procs: dict[str, list[subprocess.Popen]] = {}
        self._pos = 0
        self._counts: Counter = Counter()
        self.env = child_env(
            NATS_URL=self.url,
            CHORA_HOME=str(self.home),
            CHORA_PREFIX=self.prefix,
            CHORA_CONFIGS_DIR=str(ROOT / "examples" / "configs"),
            CHORA_METRICS_PORT="0",
            **(extra_env or {}),
        )

    @property
    def jsonl(self) -> Path:
        return self.home / "telemetry" / "events.jsonl"

    def spawn(self, name: str, timeout: float = 30.0) -> subprocess.Popen:
        (self.home / "logs").mkdir(parents=True, exist_ok=True)
        log = open(self.home / "logs" / f"{name}.log", "ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "chora", "service", "run", name],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        ready = self.home / "run" / f"{name}.{proc.pid}.json"
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{name} exited {proc.returncode}: " + (self.home / "logs" / f"{name}.log").read_text()[-2000:]
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} not ready in {timeout}s")
            time.sleep(0.02)  # polling a readiness file written by the child
        self.procs.setdefault(name, []).append(proc)
        return proc

    def kill9(self, name: str) -> None:
        proc = self.procs[name].pop(0)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()

    def terminate(self, name: str, timeout: float = 60.0) -> int:
        proc = self.procs[name].pop(0)
        proc.send_signal(signal.SIGTERM)
        return proc.wait(timeout)

    def stop_all(self) -> None:
        for procs in self.procs.values():
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
        for procs in self.procs.values():
            for p in procs:
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self.procs.clear()

    # ------------------------------------------------------------------ reading the JSONL
    def lines(self) -> list[dict]:
        if not self.jsonl.exists():
            return []
        out = []
        with open(self.jsonl, "rb") as f:
            for raw in f:
                if raw.endswith(b"\n"):
                    out.append(json.loads(raw))
        return out

    def count(self, event_type: str, batch_id: str | None = None) -> int:
        """Lines of ``event_type`` (for one batch: by origin or batch_id), read incrementally
        so that polling costs only the new lines."""
        if self.jsonl.exists():
            with open(self.jsonl, "rb") as f:
                f.seek(self._pos)
                chunk = f.read()
            end = chunk.rfind(b"\n") + 1
            self._pos += end
            for raw in chunk[:end].splitlines():
                rec = json.loads(raw)
                key = (rec.get("origin") or {}).get("id") or rec.get("batch_id")
                self._counts[(rec["event_type"], None)] += 1
                if key:
                    self._counts[(rec["event_type"], key)] += 1
        return self._counts[(event_type, batch_id)]


def batch_report(lines: list[dict], batch_id: str) -> dict:
    """Per-event-type counts for one batch, and the duplicates."""
    ids = Counter(rec["event_id"] for rec in lines)
    outcomes = [
        r
        for r in lines
        if r["event_type"] == "chora.content_generated" and (r.get("origin") or {}).get("id") == batch_id
    ]
    requests = [
        r
        for r in lines
        if r["event_type"] == "chora.generation.requested" and (r.get("origin") or {}).get("id") == batch_id
    ]
    completed = [r for r in lines if r["event_type"] == "chora.batch_completed" and r.get("batch_id") == batch_id]
    keys = Counter(r["origin"]["key"] for r in outcomes)
    return {
        "duplicate_lines": sum(c - 1 for c in ids.values() if c > 1),
        "requests": len(requests),
        "outcomes": len(outcomes),
        "distinct_items": len(keys),
        "items_twice": sum(1 for c in keys.values() if c > 1),
        "completed": completed,
    }


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    """Three nats-servers on loopback from deploy/nats/cluster/node-N.conf, each with its
    own store dir; ports are picked free and given on the command line."""

    def __init__(self, tmp: Path, size: int = 3):
        cports = [free_port() for _ in range(size)]
        routes = ",".join(f"nats://127.0.0.1:{p}" for p in cports)
        self.nodes = [
            EmbeddedServer(
                tmp / f"n{i + 1}" / "store",
                config=ROOT / "deploy" / "nats" / "cluster" / f"node-{i + 1}.conf",
                http_port=None,
                extra_args=["--cluster", f"nats://127.0.0.1:{cports[i]}", "--routes", routes],
                log_path=tmp / f"n{i + 1}" / "nats-server.log",
            )
            for i in range(size)
        ]

    def start(self) -> "LocalCluster":
        for n in self.nodes:
            n.start()
        return self

    @property
    def urls(self) -> str:
        return ",".join(n.url for n in self.nodes if n.url)

    def node(self, server_name: str) -> EmbeddedServer:
        return self.nodes[int(server_name.rsplit("n", 1)[1]) - 1]

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()


async def js_ready(urls: str) -> bool:
    """JetStream answers on (one of) ``urls``: a cluster has elected its meta leader."""
    import nats

    try:
        nc = await nats.connect(urls.split(","), connect_timeout=2, max_reconnect_attempts=1)
    except Exception:
        return False
    try:
        await nc.jetstream().account_info()
        return True
    except Exception:
        return False
    finally:
        await nc.close()
