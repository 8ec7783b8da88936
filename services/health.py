"""Liveness and readiness of one service process: ``/healthz`` and ``/readyz``.

The runtime (:func:`services.runtime.run_service`) keeps one :class:`Health` per
process and serves it next to ``/metrics`` on the metrics port; the discovery
endpoint ``<prefix>.svc.<service>.<id>.health`` answers the same readiness.

- ``GET /healthz`` (alive): 200 while the process's event loop runs, i.e. it
  turned within the last ``stall_s`` seconds (a heartbeat task stamps it); 503
  when the loop is stuck. An orchestrator restarts a process that is not alive.
- ``GET /readyz`` (ready): 200 only when the service is connected to NATS, every
  one of its consumer loops is bound (the server answered its pull requests
  within the last few heartbeats) and it is not draining; 503 otherwise, with a
  short JSON reason. An orchestrator sends no work to (and a start-up order waits
  for) a process that is not ready.

Bodies are JSON: ``{"status": "ready", "checks": {...}}`` or ``{"status":
"not ready", "reason": "...", "checks": {...}}``. They are read from the HTTP
server's thread: every check only reads plain attributes.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Callable, Iterable, Protocol

STALL_S = 30.0  # the event loop did not turn for this long: the process is stuck, not alive
TICK_S = 1.0


class Bindable(Protocol):
    """What readiness asks of a consumer loop (bus.consumer.ConsumerLoop)."""

    @property
    def bound(self) -> bool: ...


class Health:
    def __init__(self, service: str, *, stall_s: float = STALL_S, clock: Callable[[], float] = time.monotonic):
        self.service = service
        self.stall_s = stall_s
        self.clock = clock
        self.started = False  # the app started and its consumer loops run
        self.draining = False
        self._connected: Callable[[], bool] = lambda: False
        self._loops: dict[str, Bindable] = {}
        self._tick = clock()
        self._ticker: asyncio.Task | None = None

    # ------------------------------------------------------------------ wiring
    def watch(self, connected: Callable[[], bool], loops: Iterable[tuple[str, Bindable]]) -> None:
        self._connected = connected
        self._loops = dict(loops)

    def start_ticking(self) -> None:
        """Stamp the event loop's heartbeat every second (call on the loop)."""

        async def tick() -> None:
            while True:
                self._tick = self.clock()
                await asyncio.sleep(TICK_S)

        self._tick = self.clock()
        self._ticker = asyncio.get_running_loop().create_task(tick())

    def stop_ticking(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None

    # ------------------------------------------------------------------ verdicts
    def liveness(self) -> tuple[bool, dict[str, Any]]:
        stalled = self.clock() - self._tick
        if stalled > self.stall_s:
            return False, {"status": "not alive", "reason": f"the event loop has not run for {stalled:.0f}s"}
        return True, {"status": "alive"}

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        connected = bool(self._connected())
        consumers = {name: "bound" if loop.bound else "unbound" for name, loop in self._loops.items()}
        checks: dict[str, Any] = {
            "nats": "connected" if connected else "disconnected",
            "consumers": consumers,
            "draining": self.draining,
        }
        reason = None
        if self.draining:
            reason = "draining"
        elif not self.started:
            reason = "starting"
        elif not connected:
            reason = "not connected to NATS"
        else:
            unbound = sorted(name for name, state in consumers.items() if state != "bound")
            if unbound:
                reason = "consumer not bound: " + ", ".join(unbound)
        if reason:
            return False, {"service": self.service, "status": "not ready", "reason": reason, "checks": checks}
        return True, {"service": self.service, "status": "ready", "checks": checks}

    def ready_doc(self) -> dict[str, Any]:
        """The readiness as one document (for the discovery health endpoint)."""
        ok, doc = self.readiness()
        return {"ready": ok, **doc}

    # ------------------------------------------------------------------ HTTP
    def wsgi(self, app: Callable) -> Callable:
        """``app`` (the /metrics WSGI app) with /healthz and /readyz in front of it."""
        routes = {"/healthz": self.liveness, "/readyz": self.readiness}

        def health_app(environ: dict, start_response: Callable) -> Any:
            check = routes.get(environ.get("PATH_INFO", ""))
            if check is None:
                return app(environ, start_response)
            if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
                start_response("405 Method Not Allowed", [("Allow", "GET, HEAD"), ("Content-Length", "0")])
                return [b""]
            ok, doc = check()
            body = json.dumps(doc).encode()
            start_response(
                "200 OK" if ok else "503 Service Unavailable",
                [
                    ("Content-Type", "application/json"),
                    ("Content-Length", str(len(body))),
                    ("Cache-Control", "no-store"),
                ],
            )
            return [b"" if environ.get("REQUEST_METHOD") == "HEAD" else body]

        return health_app
