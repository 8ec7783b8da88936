"""Every service's own /metrics: the consumer-loop observer, the notifier's live
circuit state, and where `chora up` puts each endpoint for Prometheus."""

from __future__ import annotations

import json
import socket
import urllib.request
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry, Counter

from services.settings import Settings
from chora.up import Stack, metrics_port, prometheus_targets, write_prometheus_targets
from contracts.catalogue import CATALOGUE, CONTENT_GENERATED, CONTENT_VALIDATED, GENERATION_REQUESTED
from contracts.envelope import new_event
from contracts.events import ContentGenerated, ContentValidated
from services.metrics import MAX_LABEL_VALUES, OTHER, ServiceMetrics
from services.circuit import CircuitBreaker
from services.notifier.config import CircuitConfig
from services.notifier.metrics import NotifierMetrics
from tests.fakes import Clock


def generated(status: str):
    data = ContentGenerated(request_id="r", content_config_id="c", status=status)
    return new_event(CONTENT_GENERATED, data, source="test")


# ---------------------------------------------------------------------- ServiceMetrics
def test_consumed_and_published_by_type_and_outcome():
    m = ServiceMetrics(process=False)
    m.handled("generator", GENERATION_REQUESTED, "ack", 0.002)
    m.handled("generator", GENERATION_REQUESTED, "ack", 0.004)
    m.handled("generator", GENERATION_REQUESTED, "retry", 0.5)
    m.published("generator", [generated("success"), generated("error"), generated("success")])
    verdict = new_event(
        CONTENT_VALIDATED, ContentValidated(request_id="r", content_config_id="c", valid=True), source="t"
    )
    m.published("validator", [verdict])
    get = m.registry.get_sample_value
    assert (
        get(
            "chora_events_consumed_total",
            {"consumer": "generator", "event_type": GENERATION_REQUESTED, "outcome": "ack"},
        )
        == 2
    )
    assert (
        get(
            "chora_events_consumed_total",
            {"consumer": "generator", "event_type": GENERATION_REQUESTED, "outcome": "retry"},
        )
        == 1
    )
    assert (
        get(
            "chora_events_published_total",
            {"consumer": "generator", "event_type": CONTENT_GENERATED, "status": "success"},
        )
        == 2
    )
    assert (
        get(
            "chora_events_published_total",
            {"consumer": "generator", "event_type": CONTENT_GENERATED, "status": "error"},
        )
        == 1
    )
    assert (
        get("chora_events_published_total", {"consumer": "validator", "event_type": CONTENT_VALIDATED, "status": "ok"})
        == 1
    )
    assert get("chora_handler_duration_seconds_count", {"consumer": "generator"}) == 3
    assert get("chora_handler_duration_seconds_sum", {"consumer": "generator"}) == pytest.approx(0.506)
    assert get("chora_handler_duration_seconds_bucket", {"consumer": "generator", "le": "0.005"}) == 2


def test_a_consumers_series_start_at_zero():
    m = ServiceMetrics(process=False)
    m.consumer("validator", (CONTENT_GENERATED,))
    m.consumer("telemetry", None)  # every type
    get = m.registry.get_sample_value
    for outcome in ("ack", "retry", "dead"):
        assert (
            get(
                "chora_events_consumed_total",
                {"consumer": "validator", "event_type": CONTENT_GENERATED, "outcome": outcome},
            )
            == 0
        )
    assert get("chora_handler_duration_seconds_count", {"consumer": "validator"}) == 0
    for t in CATALOGUE:
        assert get("chora_events_consumed_total", {"consumer": "telemetry", "event_type": t, "outcome": "dead"}) == 0


def test_labels_stay_bounded():
    """A type comes from whoever published: only catalogue types become label values."""
    m = ServiceMetrics(process=False)
    for i in range(50):
        m.handled("generator", f"com.attacker.type-{i}", "dead", 0.001)
    m.handled("generator", "unknown", "dead", 0.001)  # what the loop reports for an undecodable message
    for i in range(MAX_LABEL_VALUES + 20):
        m.handled(f"consumer-{i}", GENERATION_REQUESTED, "ack", 0.001)
    get = m.registry.get_sample_value
    assert get("chora_events_consumed_total", {"consumer": "generator", "event_type": OTHER, "outcome": "dead"}) == 50
    assert (
        get("chora_events_consumed_total", {"consumer": "generator", "event_type": "unknown", "outcome": "dead"}) == 1
    )
    # "generator" took one of the 100 places: 99 more fit, 21 are counted as "other"
    assert (
        get("chora_events_consumed_total", {"consumer": OTHER, "event_type": GENERATION_REQUESTED, "outcome": "ack"})
        == 21
    )
    consumers = {s.labels["consumer"] for fam in m.registry.collect() for s in fam.samples if "consumer" in s.labels}
    assert len(consumers) == MAX_LABEL_VALUES + 1  # the first 100 and "other"


def test_build_info_and_process_figures():
    m = ServiceMetrics()
    assert m.registry.get_sample_value("process_resident_memory_bytes") > 0
    build = [s for fam in m.registry.collect() if fam.name == "chora_build_info" for s in fam.samples]
    assert len(build) == 1 and build[0].value == 1 and set(build[0].labels) == {"version", "python"}


def test_an_apps_registry_is_served_on_the_same_endpoint():
    app = CollectorRegistry()
    Counter("chora_app_things", "things", registry=app).inc(3)
    m = ServiceMetrics(process=False)
    m.include(app)
    port = m.serve("127.0.0.1", 0)
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert "chora_app_things_total 3.0" in text
        assert "chora_build_info" in text  # its own series next to the app's
        assert m.url == f"http://127.0.0.1:{port}/metrics"
    finally:
        m.stop()
    assert m.url is None
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)


# ---------------------------------------------------------------------- the notifier
def states(m: NotifierMetrics, sub: str) -> dict[str, float]:
    return {
        s: m.registry.get_sample_value("chora_webhook_circuit_state", {"subscription": sub, "state": s})
        for s in ("closed", "open", "half_open")
    }


def test_circuit_state_is_live_and_reading_it_moves_nothing():
    clock = Clock()
    m = NotifierMetrics()
    breaker = CircuitBreaker(
        CircuitConfig(failure_threshold=2, reset_timeout_s=30),
        clock=clock,
        on_transition=lambda a, b: m.transition("hook", a, b),
    )
    stats = {"delivered": 4, "failed": 1}
    m.watch({"hook": SimpleNamespace(circuit=breaker, stats=stats)})
    get = m.registry.get_sample_value
    assert states(m, "hook") == {"closed": 1, "open": 0, "half_open": 0}
    assert (
        get(
            "chora_webhook_circuit_transitions_total",
            {"subscription": "hook", "from_state": "closed", "to_state": "open"},
        )
        == 0
    )

    breaker.failure(breaker.acquire())
    assert get("chora_webhook_consecutive_failures", {"subscription": "hook"}) == 1
    breaker.failure(breaker.acquire())
    assert states(m, "hook") == {"closed": 0, "open": 1, "half_open": 0}
    assert (
        get(
            "chora_webhook_circuit_transitions_total",
            {"subscription": "hook", "from_state": "closed", "to_state": "open"},
        )
        == 1
    )

    # the reset timeout passes: a scrape shows half_open at once, without waiting for a delivery,
    # and without moving the breaker (that stays the event loop's business)
    clock.t += 30
    assert states(m, "hook") == {"closed": 0, "open": 0, "half_open": 1}
    assert breaker._state == "open" and breaker.transition_count == 1
    assert breaker.state == "half_open"  # the breaker's own read moves it
    breaker.success(breaker.acquire())
    assert states(m, "hook") == {"closed": 1, "open": 0, "half_open": 0}
    assert (
        get(
            "chora_webhook_circuit_transitions_total",
            {"subscription": "hook", "from_state": "half_open", "to_state": "closed"},
        )
        == 1
    )

    assert get("chora_notifier_events_total", {"subscription": "hook", "outcome": "delivered"}) == 4
    assert get("chora_notifier_events_total", {"subscription": "hook", "outcome": "deferred"}) == 0
    stats["delivered"] += 1
    assert get("chora_notifier_events_total", {"subscription": "hook", "outcome": "delivered"}) == 5


async def test_the_notifier_app_reports_its_subscriptions(tmp_path):
    from services.notifier.service import NotifierApp

    config = tmp_path / "notifier.yaml"
    config.write_text(
        json.dumps(
            {
                "subscriptions": [
                    {
                        "name": "a",
                        "events": ["chora.batch_completed"],
                        "url": "http://127.0.0.1:9/a",
                        "secret_env": "S",
                    },
                    {
                        "name": "b",
                        "events": ["chora.batch_completed"],
                        "url": "http://127.0.0.1:9/b",
                        "secret_env": "S",
                    },
                ]
            }
        )
    )
    app = NotifierApp(config, environ={"S": "secret"})
    await app.start()
    try:
        reg = app.metrics_registry
        for sub in ("a", "b"):
            assert reg.get_sample_value("chora_webhook_circuit_state", {"subscription": sub, "state": "closed"}) == 1
        app.targets["a"].circuit._open()  # as failures would
        assert reg.get_sample_value("chora_webhook_circuit_state", {"subscription": "a", "state": "open"}) == 1
        assert (
            reg.get_sample_value(
                "chora_webhook_circuit_transitions_total",
                {"subscription": "a", "from_state": "closed", "to_state": "open"},
            )
            == 1
        )
        assert reg.get_sample_value("chora_webhook_circuit_state", {"subscription": "b", "state": "closed"}) == 1
    finally:
        await app.close()


# ---------------------------------------------------------------------- chora up
def test_metrics_ports_under_chora_up():
    assert [metrics_port(9464, n) for n in ("telemetry", "generator", "validator", "assembler", "notifier")] == [
        9464,
        9465,
        9466,
        9467,
        9468,
    ]
    assert metrics_port(0, "generator") == 0  # each a free one
    assert metrics_port(-1, "generator") == -1  # none


def test_prometheus_targets_from_readiness_facts(tmp_path):
    infos = {
        "generator": {"metrics_url": "http://127.0.0.1:9465/metrics"},
        "telemetry": {"metrics_url": "http://0.0.0.0:9464/metrics"},
        "validator": {"metrics_url": "http://[::1]:9466/metrics"},
        "notifier": {"metrics_url": None},  # serves none
    }
    assert prometheus_targets(infos) == [
        {"targets": ["127.0.0.1:9465"], "labels": {"service": "generator"}},
        {"targets": ["127.0.0.1:9464"], "labels": {"service": "telemetry"}},
        {"targets": ["[::1]:9466"], "labels": {"service": "validator"}},
    ]
    path = tmp_path / "run" / "prometheus-targets.json"
    write_prometheus_targets(path, infos)
    assert json.loads(path.read_text()) == prometheus_targets(infos)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left


def _free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_chora_up_refuses_a_metrics_port_in_use(tmp_path):
    # the port taken is the validator's (base + 2); the two below it must be free, or the
    # check would (rightly) name one of those first: on a shared machine, pick again
    for _ in range(50):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        if taken > 1026 and _free(taken - 2) and _free(taken - 1):
            break
        s.close()
    with s:
        stack = Stack(Settings(_env_file=None, home=tmp_path, metrics_port=taken - 2))
        with pytest.raises(SystemExit) as e:
            stack.check_metrics_ports()
    assert f"port {taken}" in str(e.value) and "validator" in str(e.value) and "CHORA_METRICS_PORT" in str(e.value)
