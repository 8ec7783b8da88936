"""`chora up`: the whole stack on one machine.

Starts the embedded nats-server (unless NATS_URL points elsewhere), provisions
the topology, runs every service as its own process (so a service can die and
be restarted alone, and services use both cores), restarts a service that
dies, prints where everything is, and on Ctrl-C or SIGTERM drains the
services and then stops the server.

Every service serves its own ``/metrics``: telemetry on ``CHORA_METRICS_PORT``
(9464), the others on the ports after it (generator +1, validator +2,
assembler +3, notifier +4), or each on a free port when it is 0. The stack
keeps ``<home>/run/prometheus-targets.json`` (Prometheus file_sd, with a
``service`` label per target) up to date across restarts, which
dashboards/prometheus.yml reads.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from typing import Any
from pathlib import Path

from bus.connection import connect
from bus.server import EmbeddedServer, ServerError
from bus.topology import Topology, provision, unread_consumers
from services.gateway.security import hash_key, new_key, write_keys
from services.gateway.settings import GatewaySettings
from services.runtime import SERVICES, start_error_file
from services.settings import Settings

RESTART_DELAY_S = 1.0
LOG_TAIL_LINES = 10
# where each service's /metrics goes, after CHORA_METRICS_PORT
METRICS_PORT_ORDER = ("telemetry", "generator", "validator", "assembler", "notifier")


def metrics_port(base: int, name: str) -> int:
    """The /metrics port of ``name`` under `chora up`: 0 (a free one) and negative (none) as is."""
    if base <= 0:
        return base
    order = list(METRICS_PORT_ORDER) + sorted(set(SERVICES) - set(METRICS_PORT_ORDER))
    return base + order.index(name)


def prometheus_targets(infos: dict[str, dict]) -> list[dict]:
    """file_sd target groups from the services' readiness facts: one per service with a
    metrics URL, labelled ``service`` (a wildcard bind address becomes 127.0.0.1)."""
    groups = []
    for name, info in sorted(infos.items()):
        url = info.get("metrics_url")
        if not url:
            continue
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or "127.0.0.1"
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1"
        target = f"[{host}]:{parts.port}" if ":" in host else f"{host}:{parts.port}"
        groups.append({"targets": [target], "labels": {"service": name}})
    return groups


def write_prometheus_targets(path: Path, infos: dict[str, dict]) -> None:
    """Replace ``path`` atomically (Prometheus watches it and must never read half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(prometheus_targets(infos), indent=2) + "\n")
    os.replace(tmp, path)


def _port_free(host: str, port: int) -> bool:
    if port == 0:
        return True
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def gateway_key(settings: Settings) -> tuple[str, Path]:
    """The local gateway API key (admin scope) of this CHORA_HOME, made on first start: the key
    in ``run/gateway.key`` (mode 0600) and its SHA-256 in ``run/gateway-keys.json``, the keys
    file the gateway reads. Returns (key, keys file)."""
    run = settings.home / "run"
    key_file, keys_file = run / "gateway.key", run / "gateway-keys.json"
    run.mkdir(parents=True, exist_ok=True)
    try:
        key = key_file.read_text().strip()
    except OSError:
        key = ""
    if not key:
        key = new_key()
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key + "\n")
    os.chmod(key_file, 0o600)
    write_keys(keys_file, [{"name": "local", "key_sha256": hash_key(key), "scopes": ["admin"]}])
    return key, keys_file


class Stack:
    def __init__(self, settings: Settings, services: list[str] | None = None, *, out=None):
        self.settings = settings
        self.gateway = GatewaySettings()
        self.gateway_key: str | None = None  # the local key `chora up` made, when the gateway uses it
        self.gateway_keys_file: Path | None = None
        self.out = out or sys.stdout  # where the banner and progress go
        self.services = services or list(SERVICES)
        self.server: EmbeddedServer | None = None
        self.url = settings.nats.url
        self.children: dict[str, subprocess.Popen] = {}
        self.info: dict[str, dict] = {}
        self.logs = settings.home / "logs"
        self.restarted: dict[str, subprocess.Popen] = {}  # not ready yet since their restart
        self.log_start: dict[int, int] = {}  # pid -> size of its log when it was spawned

    # ------------------------------------------------------------------ pieces
    def check_not_running(self) -> None:
        """One stack per CHORA_HOME: a live `chora up` recorded in stack.json is said so plainly
        (rather than as the port collision a second stack would run into)."""
        running = running_stack(self.settings)
        if running is not None:
            raise SystemExit(
                f"chora: a stack is already running here (pid {running.get('pid')}, NATS at {running.get('nats_url')}; "
                f"see {self.settings.stack_file}). Use it, stop it (Ctrl-C in its terminal, or kill {running.get('pid')}), "
                "or start another one with its own CHORA_HOME and ports."
            )

    def check_metrics_ports(self) -> None:
        s = self.settings
        for name in self.services:
            port = metrics_port(s.metrics_port, name)
            if port > 0 and not _port_free(s.metrics_host, port):
                raise SystemExit(
                    f"port {port} on {s.metrics_host} (/metrics of {name}) is in use. Set CHORA_METRICS_PORT "
                    "to another base port (the services use it and the four after it), 0 for free ports, "
                    "or -1 for no metrics endpoints."
                )

    def check_gateway_port(self) -> None:
        g = self.gateway
        if "gateway" in self.services and g.port > 0 and not _port_free(g.host, g.port):
            raise SystemExit(
                f"port {g.port} on {g.host} (the gateway) is in use. Set CHORA_GATEWAY_PORT to another port "
                "(0 picks a free one)."
            )

    def prepare_gateway(self) -> None:
        """Auth on: the keys file the operator named, else a local key made on first start."""
        if "gateway" not in self.services or not self.gateway.auth:
            return
        if self.gateway.keys_file is not None:
            self.gateway_keys_file = self.gateway.keys_file
            return
        self.gateway_key, self.gateway_keys_file = gateway_key(self.settings)

    def start_server(self) -> None:
        s = self.settings
        for port in (s.nats_port, s.nats_http_port):
            if not _port_free("127.0.0.1", port):
                raise SystemExit(
                    f"port {port} on 127.0.0.1 is in use. Set CHORA_NATS_PORT=0 and CHORA_NATS_HTTP_PORT=0 "
                    "for free ports, or NATS_URL to use a server that is already running."
                )
        self.server = EmbeddedServer(
            s.home / "nats", port=s.nats_port, http_port=s.nats_http_port, log_path=self.logs / "nats-server.log"
        )
        try:
            self.server.start()
        except ServerError as e:
            raise SystemExit(str(e)) from None
        self.url = self.server.url

    async def provision(self) -> None:
        nc = await connect(self.settings.nats, self.url, name="chora-up")
        try:
            topo = Topology.from_settings(self.settings)
            await provision(nc.jetstream(), topo, retire=unread_consumers(self.settings.callback_allow))
        finally:
            await nc.close()

    def child_env(self, name: str) -> dict[str, str]:
        env = dict(os.environ)
        env["NATS_URL"] = self.url or ""
        env["CHORA_HOME"] = str(self.settings.home.resolve())
        env["CHORA_PREFIX"] = self.settings.prefix
        env["CHORA_CONFIGS_DIR"] = str(self.settings.configs_dir.resolve())
        env["CHORA_METRICS_HOST"] = self.settings.metrics_host
        if self.server is not None and self.server.monitor_url:
            env["CHORA_NATS_MONITOR_URL"] = self.server.monitor_url  # the NATS server panels
        env["CHORA_METRICS_PORT"] = str(metrics_port(self.settings.metrics_port, name))
        if name == "gateway" and self.gateway_keys_file is not None:
            env["CHORA_GATEWAY_KEYS_FILE"] = str(self.gateway_keys_file.resolve())
        return env

    @property
    def targets_file(self) -> Path:
        return self.settings.home / "run" / "prometheus-targets.json"

    def spawn(self, name: str) -> subprocess.Popen:
        self.logs.mkdir(parents=True, exist_ok=True)
        log = open(self.logs / f"{name}.log", "ab")
        offset = log.tell()
        proc = subprocess.Popen(
            [sys.executable, "-m", "chora", "service", "run", name],
            env=self.child_env(name),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches us; we drain the children in order
        )
        log.close()
        self.children[name] = proc
        self.log_start[proc.pid] = offset
        start_error_file(self.settings, name, proc.pid).unlink(missing_ok=True)  # an old process's, same pid
        return proc

    def why_exited(self, name: str, proc: subprocess.Popen) -> str:
        """Why ``proc`` ended: the reason it left when it could not start, else the last lines
        it wrote to its log."""
        path = start_error_file(self.settings, name, proc.pid)
        try:
            reason = path.read_text().strip()
            path.unlink()
        except OSError:
            try:
                with open(self.logs / f"{name}.log", "rb") as f:
                    f.seek(self.log_start.get(proc.pid, 0))
                    lines = f.read().decode("utf-8", "replace").splitlines()[-LOG_TAIL_LINES:]
            except OSError:
                lines = []
            reason = "\n".join(lines) or "(it wrote nothing)"
        reason = "\n".join("  " + line for line in reason.splitlines())
        return f"service {name} exited with {proc.returncode}:\n{reason}\n(log: {self.logs / (name + '.log')})"

    async def wait_ready(self, name: str, proc: subprocess.Popen, timeout: float = 30.0) -> dict:
        path = self.settings.home / "run" / f"{name}.{proc.pid}.json"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit("chora: " + self.why_exited(name, proc))
            if path.exists():
                try:
                    return json.loads(path.read_text())
                except json.JSONDecodeError:
                    pass  # being written
            await asyncio.sleep(0.05)
        raise SystemExit(f"service {name} not ready after {timeout}s; see {self.logs / (name + '.log')}")

    def stop_children(self, timeout: float = 30.0) -> None:
        for proc in self.children.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for name, proc in self.children.items():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                print(f"service {name} did not drain in {timeout}s; killing it", file=sys.stderr)
                proc.kill()
                proc.wait()

    # ------------------------------------------------------------------ lifecycle
    async def run(self, stop: asyncio.Event) -> None:
        s = self.settings
        s.home.mkdir(parents=True, exist_ok=True)
        self.check_not_running()
        self.check_metrics_ports()
        self.check_gateway_port()
        self.prepare_gateway()
        if not self.url:
            self.start_server()
        try:
            await self.provision()
            for name in self.services:
                self.info[name] = await self.wait_ready(name, self.spawn(name))
            write_prometheus_targets(self.targets_file, self.info)
            self.announce()
            await self.supervise(stop)
        finally:
            print("chora: draining services ...", file=self.out, flush=True)
            self.stop_children()
            if self.server:
                self.server.stop()
            s.stack_file.unlink(missing_ok=True)
            self.targets_file.unlink(missing_ok=True)
            print("chora: stopped", file=self.out, flush=True)

    def announce(self, quiet: bool = False) -> None:
        s = self.settings
        stack: dict[str, Any] = {
            "pid": os.getpid(),
            "nats_url": self.url,
            "nats_monitor_url": self.server.monitor_url if self.server else None,
            "embedded": self.server is not None,
            "prefix": s.prefix,
            "metrics_url": self.info.get("telemetry", {}).get("metrics_url"),
            "metrics_urls": {n: i.get("metrics_url") for n, i in self.info.items()},
            "prometheus_targets": str(self.targets_file.resolve()),
            "jsonl_path": str(s.jsonl_path.resolve()),
            "configs_dir": str(s.configs_dir.resolve()),
            "logs_dir": str(self.logs.resolve()),
            "services": {n: p.pid for n, p in self.children.items()},
            "gateway_url": self.info.get("gateway", {}).get("gateway_url"),
            "gateway_keys_file": str(self.gateway_keys_file.resolve()) if self.gateway_keys_file else None,
        }
        s.stack_file.parent.mkdir(parents=True, exist_ok=True)
        s.stack_file.write_text(json.dumps(stack, indent=2))
        if quiet:
            return
        lines = ["chora is up"]
        for key in (
            "nats_url",
            "nats_monitor_url",
            "metrics_url",
            "gateway_url",
            "prometheus_targets",
            "jsonl_path",
            "configs_dir",
            "logs_dir",
        ):
            if stack[key]:
                lines.append(f"  {key:18} {stack[key]}")
        if self.gateway_key and stack["gateway_url"]:
            lines.append(f"  {'gateway_key':18} {self.gateway_key}    (Authorization: Bearer <key>)")
        lines.append(f"  services           {', '.join(f'{n} (pid {p})' for n, p in stack['services'].items())}")
        lines.append("Try: .venv/bin/chora generate hello-world    (Ctrl-C here stops everything)")
        print("\n".join(lines), file=self.out, flush=True)

    async def supervise(self, stop: asyncio.Event) -> None:
        """Restart a service that dies; return when asked to stop."""
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), 0.5)
            except asyncio.TimeoutError:
                pass
            if stop.is_set():
                return
            for name, proc in list(self.children.items()):
                if proc.poll() is not None:
                    print(
                        f"chora: {self.why_exited(name, proc)}\nchora: restarting {name}", file=sys.stderr, flush=True
                    )
                    await asyncio.sleep(RESTART_DELAY_S)
                    self.restarted[name] = self.spawn(name)
            self.note_restarts()

    def note_restarts(self) -> None:
        """Take in the readiness facts of restarted services (a free metrics port changes)."""
        changed = False
        for name, proc in list(self.restarted.items()):
            if proc.poll() is not None:
                del self.restarted[name]  # died again: supervise restarts it
                continue
            path = self.settings.home / "run" / f"{name}.{proc.pid}.json"
            try:
                self.info[name] = json.loads(path.read_text())
            except (OSError, ValueError):
                continue  # not ready yet
            del self.restarted[name]
            changed = True
        if changed:
            write_prometheus_targets(self.targets_file, self.info)
            self.announce(quiet=True)


async def up(settings: Settings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await Stack(settings).run(stop)


def _alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def running_stack(settings: Settings) -> dict | None:
    """What stack.json says of the `chora up` running for this CHORA_HOME, or None when there
    is none (no file, or a stale one left by a stack that was killed)."""
    try:
        stack = json.loads(Path(settings.stack_file).read_text())
    except (OSError, ValueError):
        return None
    return stack if isinstance(stack, dict) and _alive(stack.get("pid")) else None


def stack_url(settings: Settings) -> str | None:
    """The NATS URL to use from the CLI: NATS_URL, else the running `chora up`."""
    if settings.nats.url:
        return settings.nats.url
    try:
        return json.loads(Path(settings.stack_file).read_text())["nats_url"]
    except (OSError, ValueError, KeyError):
        return None
