"""A stack of real processes for fault tests: nats-server and each service as its
own OS process, so kill -9 means kill -9. Reads outcomes from the JSONL.

Every service does real work: the notifier has a subscription (``CHORA_NOTIFIER_CONFIG``)
to the batch's facts, delivered to a real HTTP receiver on 127.0.0.1 that the test runs
(:class:`tests.webhook.Webhook`), and the validator checks every outcome against the
config's rules."""

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

from bus.server import EmbeddedServer, ServerError
from contracts.catalogue import BATCH_COMPLETED, CONTENT_GENERATED, CONTENT_VALIDATED, GENERATION_REQUESTED
from tests.conftest import ROOT, child_env, example_configs, wait_for
from tests.webhook import Webhook

SERVICES = ("generator", "validator", "assembler", "telemetry", "notifier")

# The tests' own named waits, and a pytest timeout above their sum (pyproject's 120 s would
# cut them off anonymously): a stuck fault test fails saying what it was waiting for.
BATCH_WAIT_S = 240
DRAIN_WAIT_S = 120
TEST_TIMEOUT_S = 600

# The webhook subscription of the fault stack: event-type patterns only (no filters), one
# delivery per item (its validation: the last fact of an item) and one for the completion.
# Subscribing content_generated too would double the notifier's share of a fault test's time
# (it delivers a few hundred events/s on the shared 2-core VM) and test nothing more.
HOOK_NAME = "faults"
HOOK_EVENTS = (CONTENT_VALIDATED, BATCH_COMPLETED)
HOOK_SECRET_ENV = "FAULTS_HOOK_SECRET"
HOOK_SECRET = "fault-stack-hook-secret"


class ProcStack:
    def __init__(
        self,
        tmp: Path,
        server: EmbeddedServer | None = None,
        *,
        hook: Webhook | None = None,
        urls: str | None = None,
        extra_env: dict | None = None,
    ):
        self.tmp = tmp
        self.hook = hook
        self.home = tmp / "var"
        self.server = server
        self.url = urls or (server.url if server else None)
        self.prefix = "f" + uuid.uuid4().hex[:8]
        self.procs: dict[str, list[subprocess.Popen]] = {}
        self._pos = 0
        self._counts: Counter = Counter()
        # the notifier delivers to ``hook`` (a stack without a hook runs no notifier)
        notifier_env: dict[str, str] = {}
        if hook is not None:
            notifier_config = tmp / "notifier.json"
            notifier_config.write_text(
                json.dumps(
                    {
                        "subscriptions": [
                            {
                                "name": HOOK_NAME,
                                "events": list(HOOK_EVENTS),
                                "url": hook.url,
                                "secret_env": HOOK_SECRET_ENV,
                                # a timeout and a circuit that a CPU-starved machine does not trip
                                # (under two CPU hogs 2 s timeouts opened the circuit for its
                                # default 30 s, again and again)
                                "timeout_s": 10.0,
                                "max_in_flight": 64,
                                "circuit": {"reset_timeout_s": 5.0},
                            },
                        ]
                    }
                )
            )
            notifier_env = {"CHORA_NOTIFIER_CONFIG": str(notifier_config), HOOK_SECRET_ENV: HOOK_SECRET}
        self.env = child_env(
            NATS_URL=self.url,
            CHORA_HOME=str(self.home),
            CHORA_PREFIX=self.prefix,
            CHORA_CONFIGS_DIR=str(example_configs()),
            CHORA_METRICS_PORT="0",
            **notifier_env,
            **(extra_env or {}),
        )

    @property
    def jsonl(self) -> Path:
        return self.home / "telemetry" / "events.jsonl"

    def spawn(self, *names: str, timeout: float = 60.0) -> list[subprocess.Popen]:
        """Start a process for each of ``names`` (all at once), then wait until each is ready."""
        (self.home / "logs").mkdir(parents=True, exist_ok=True)
        started = []
        for name in names:
            env = self.env
            if name == "telemetry":
                # every telemetry instance mirrors the whole stream into a file of its own: the
                # first one running writes self.jsonl, a second one running at the same time another
                running = [
                    p for p in self.procs.get(name, []) + [p for n, p in started if n == name] if p.poll() is None
                ]
                if running:
                    env = {
                        **env,
                        "CHORA_TELEMETRY_PATH": str(self.home / f"telemetry-{len(running) + 1}" / "events.jsonl"),
                    }
            with open(self.home / "logs" / f"{name}.log", "ab") as log:
                started.append(
                    (
                        name,
                        subprocess.Popen(
                            [sys.executable, "-m", "chora", "service", "run", name],
                            env=env,
                            stdout=log,
                            stderr=subprocess.STDOUT,
                            start_new_session=True,
                        ),
                    )
                )
        deadline = time.monotonic() + timeout
        for name, proc in started:
            ready = self.home / "run" / f"{name}.{proc.pid}.json"
            while not ready.exists():
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"{name} exited {proc.returncode}: " + (self.home / "logs" / f"{name}.log").read_text()[-2000:]
                    )
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} not ready in {timeout}s")
                time.sleep(0.02)  # polling a readiness file written by the child
            self.procs.setdefault(name, []).append(proc)
        return [proc for _, proc in started]

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


def batch_report(lines: list[dict], batch_id: str, items: int, hook_keys: Counter) -> dict:
    """What the JSONL and the webhook receiver hold for one batch: per stage (request,
    outcome, validation, the webhook POST of the validation), the items missing and the
    items seen twice; the duplicate lines; the completions; the webhook keys that were
    expected, missing, unexpected or POSTed again (a retry or a redelivery repeats its key)."""
    ids = Counter(rec["event_id"] for rec in lines)
    mine = [r for r in lines if (r.get("origin") or {}).get("id") == batch_id]
    completed = [r for r in lines if r["event_type"] == BATCH_COMPLETED and r.get("batch_id") == batch_id]
    item_of = {r["event_id"]: (r["event_type"], r["origin"]["key"]) for r in mine}
    hooked = [item_of[k.rsplit(":", 1)[0]] for k in hook_keys if k and k.rsplit(":", 1)[0] in item_of]
    stages = {
        "request": [r["origin"]["key"] for r in mine if r["event_type"] == GENERATION_REQUESTED],
        "content_generated": [r["origin"]["key"] for r in mine if r["event_type"] == CONTENT_GENERATED],
        "content_validated": [r["origin"]["key"] for r in mine if r["event_type"] == CONTENT_VALIDATED],
        "webhook content_validated": [key for t, key in hooked if t == CONTENT_VALIDATED],
    }
    wanted = {str(i) for i in range(items)}
    complete = wanted.intersection(*map(set, stages.values()))
    repeated = {key for keys in stages.values() for key, c in Counter(keys).items() if c > 1}
    expected_keys = {f"{r['event_id']}:{HOOK_NAME}" for r in mine + completed if r["event_type"] in HOOK_EVENTS}
    return {
        "duplicate_lines": sum(c - 1 for c in ids.values() if c > 1),
        "lost": {stage: len(wanted - set(keys)) for stage, keys in stages.items()},
        "twice": {stage: sum(1 for c in Counter(keys).values() if c > 1) for stage, keys in stages.items()},
        "items_lost": len(wanted - complete),
        "items_twice": len(repeated),
        "invalid": sum(1 for r in mine if r["event_type"] == CONTENT_VALIDATED and not r.get("valid")),
        "completed": completed,
        "hook_expected": len(expected_keys),
        "hook_missing": len(expected_keys - set(hook_keys)),
        "hook_unexpected": len(set(hook_keys) - expected_keys),
        "hook_posts": sum(hook_keys.values()),
        "hook_repeated": sum(c - 1 for c in hook_keys.values() if c > 1),
        "notifications": Counter(r["event_type"] for r in lines if r["event_type"].startswith("chora.notification_")),
    }


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    """Three nats-servers on loopback from deploy/nats/cluster/node-N.conf, each with its
    own store dir; ports (client, cluster, monitor) are picked free and given on the command line.

    The route ports must be known to every node before any starts, so they are picked free
    and then bound by the servers: another process (a test on the other xdist worker) may
    take one in between. A node that then cannot listen on its route port makes start()
    pick new ports and start the whole cluster again, in a fresh directory, up to
    ``attempts`` times."""

    def __init__(self, tmp: Path, size: int = 3, attempts: int = 3):
        self.tmp, self.size, self.attempts = tmp, size, attempts
        self.nodes = self._nodes(tmp)

    def _nodes(self, base: Path) -> list[EmbeddedServer]:
        cports = [free_port() for _ in range(self.size)]
        routes = ",".join(f"nats://127.0.0.1:{p}" for p in cports)
        return [
            EmbeddedServer(
                base / f"n{i + 1}" / "store",
                config=ROOT / "deploy" / "nats" / "cluster" / f"node-{i + 1}.conf",
                http_port=0,  # a free monitor port, not the file's fixed one (another run may hold it)
                extra_args=["--cluster", f"nats://127.0.0.1:{cports[i]}", "--routes", routes],
                log_path=base / f"n{i + 1}" / "nats-server.log",
            )
            for i in range(self.size)
        ]

    def start(self) -> "LocalCluster":
        attempt = 1
        while True:
            try:
                for n in self.nodes:
                    n.start()
                return self
            except ServerError as e:
                self.stop()
                if "address already in use" not in str(e) or attempt >= self.attempts:
                    raise
                self.nodes = self._nodes(self.tmp / f"retry-{attempt}")
                attempt += 1

    @property
    def urls(self) -> str:
        return ",".join(n.url for n in self.nodes if n.url)

    def node(self, server_name: str) -> EmbeddedServer:
        return self.nodes[int(server_name.rsplit("n", 1)[1]) - 1]

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()


def last_mirrored_seq(path: Path) -> int:
    """The stream sequence of the last whole line in a telemetry JSONL file (0 if none)."""
    if not path.exists():
        return 0
    with open(path, "rb") as f:
        f.seek(max(0, f.seek(0, 2) - 65536))
        lines = [x for x in f.read().split(b"\n")[:-1] if x.strip()]  # the last one may be half written
    return json.loads(lines[-1])["seq"] if lines else 0


async def undrained(stack: ProcStack) -> dict[str, tuple[int, int]] | None:
    """The durable consumers (the webhook subscription's too) that still have messages
    pending or unacknowledged, as name -> (pending, ack pending), and the telemetry sink
    as "telemetry-sink" -> (events not yet in its JSONL, 0) while it trails the stream's
    last sequence (it reads without a durable); None if unreadable."""
    import nats

    nc = await nats.connect(stack.url.split(","))
    try:
        js = nc.jetstream()
        stream = f"{stack.prefix.upper()}_EVENTS"
        infos = await js.consumers_info(stream)
        left = {
            c.name: (c.num_pending, c.num_ack_pending)
            for c in infos
            if c.config.durable_name and (c.num_pending or c.num_ack_pending)  # not the sinks' ephemeral readers
        }
        behind = (await js.stream_info(stream)).state.last_seq - last_mirrored_seq(stack.jsonl)
        if behind > 0:
            left["telemetry-sink"] = (behind, 0)
        return left
    except Exception:
        return None
    finally:
        await nc.close()


async def wait_drained(stack: ProcStack, timeout: float, what: str = "every consumer drained") -> None:
    """Wait until :func:`undrained` reports nothing left (polled 5 times a second, each poll a
    new connection, so a time taken after it is +-0.2 s); fail with what was still left."""
    left: dict | None = None

    async def drained() -> bool:
        nonlocal left
        left = await undrained(stack)
        return left == {}

    try:
        await wait_for(drained, timeout, what, 0.2)
    except AssertionError as e:
        raise AssertionError(f"{e}; still (pending, ack pending): {left}") from None


async def dead_letters(stack: ProcStack) -> int:
    """Messages in the stack's dead-letter stream."""
    import nats

    nc = await nats.connect(stack.url.split(","))
    try:
        return (await nc.jetstream().stream_info(f"{stack.prefix.upper()}_DLQ")).state.messages
    finally:
        await nc.close()


async def batch_state(stack: ProcStack, batch_id: str) -> dict | None:
    """The assembler's record of the batch (done, closed, finished), read from the KV bucket."""
    import nats

    from bus.settings import NatsSettings
    from services.assembler.status import read_batch_status
    from services.settings import Settings

    nc = await nats.connect(stack.url.split(","))
    try:
        return await read_batch_status(nc, Settings(prefix=stack.prefix, nats=NatsSettings(url=stack.url)), batch_id)
    finally:
        await nc.close()


def instance_metrics(stack: ProcStack, name: str) -> list[str]:
    """The /metrics URL of each running instance of ``name`` (from its readiness file)."""
    return [json.loads(f.read_text())["metrics_url"] for f in sorted((stack.home / "run").glob(f"{name}.*.json"))]


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
