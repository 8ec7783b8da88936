"""services.health without a server: the verdicts of /healthz and /readyz from their inputs."""

from __future__ import annotations

from services.health import Health


class Loop:
    def __init__(self, bound: bool):
        self.bound = bound


def test_healthz_fails_when_the_event_loop_has_not_turned_for_stall_s():
    now = [100.0]
    h = Health("generator", stall_s=30, clock=lambda: now[0])
    assert h.liveness() == (True, {"status": "alive"})
    now[0] += 31  # nothing stamped the heartbeat since
    ok, doc = h.liveness()
    assert not ok and doc["reason"] == "the event loop has not run for 31s"


def test_readyz_names_the_first_reason_it_is_not_ready():
    h = Health("assembler")
    loops = {"assembler": Loop(True), "assembler-completions": Loop(False)}
    connected = [True]
    h.watch(lambda: connected[0], loops.items())
    assert h.readiness()[1]["reason"] == "starting"
    h.started = True
    assert h.readiness()[1]["reason"] == "consumer not bound: assembler-completions"
    loops["assembler-completions"].bound = True
    ok, doc = h.readiness()
    assert ok and doc["status"] == "ready" and h.ready_doc()["ready"] is True
    connected[0] = False
    assert h.readiness() == (
        False,
        {
            "service": "assembler",
            "status": "not ready",
            "reason": "not connected to NATS",
            "checks": {
                "nats": "disconnected",
                "consumers": {"assembler": "bound", "assembler-completions": "bound"},
                "draining": False,
            },
        },
    )
    h.draining = True
    assert h.readiness()[1]["reason"] == "draining"


def test_the_wsgi_wrapper_answers_health_paths_and_passes_the_rest_on():
    h = Health("telemetry")
    seen = []

    def metrics(environ, start_response):
        start_response("200 OK", [])
        return [b"metrics"]

    app = h.wsgi(metrics)

    def call(path: str, method: str = "GET"):
        def start_response(status, headers):
            seen.append(status)

        body = b"".join(app({"PATH_INFO": path, "REQUEST_METHOD": method}, start_response))
        return seen[-1], body

    assert call("/metrics") == ("200 OK", b"metrics")
    status, body = call("/readyz")
    assert status == "503 Service Unavailable" and b'"reason": "starting"' in body
    assert call("/healthz")[0] == "200 OK"
    assert call("/healthz", "POST")[0] == "405 Method Not Allowed"
