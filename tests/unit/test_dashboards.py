"""dashboards/: the Grafana JSON is well formed and only queries metrics that exist.

No server here: the queries are run against a real Prometheus in
tests/integration/test_prometheus.py.
"""

from __future__ import annotations

import json
import re

import pytest
import yaml
from prometheus_client import generate_latest

from bus.monitor import AccountFigures, ConsumerFigures, JetStreamSnapshot, ServerFigures, StreamFigures
from services.telemetry.metrics import TelemetryMetrics
from tests.conftest import ROOT

DASHBOARD = ROOT / "dashboards" / "chora-compose.json"
ALERTS = ROOT / "dashboards" / "alerts.yml"
PROM = ROOT / "dashboards" / "prometheus.yml"

# Grafana's own variables, always defined
BUILTIN_VARS = {
    "__rate_interval",
    "__interval",
    "__interval_ms",
    "__range",
    "__range_s",
    "__range_ms",
    "__name",
    "__dashboard",
    "__from",
    "__to",
}
VAR_RE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")
METRIC_RE = re.compile(r"\b((?:chora|process)_[a-z0-9_]+)")


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def all_panels(dashboard: dict) -> list[dict]:
    out = []
    for p in dashboard["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # collapsed rows hold their panels
    return out


def targets(dashboard: dict) -> list[tuple[dict, dict]]:
    return [(p, t) for p in all_panels(dashboard) for t in p.get("targets", [])]


def test_top_level_keys(dashboard):
    for key in ("title", "uid", "panels", "templating", "schemaVersion", "time", "annotations"):
        assert key in dashboard, key
    assert dashboard["schemaVersion"] >= 36
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,40}", dashboard["uid"])
    assert dashboard["panels"]


def test_datasource_variable(dashboard):
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    ds = variables.get("datasource")
    assert ds is not None and ds["type"] == "datasource" and ds["query"] == "prometheus"


def test_panel_ids_unique_and_grid_positions(dashboard):
    panels = all_panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), [i for i in ids if ids.count(i) > 1]
    for p in panels:
        g = p.get("gridPos")
        assert g is not None, p["title"]
        assert {"h", "w", "x", "y"} <= set(g), p["title"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]


def test_panels_do_not_overlap(dashboard):
    cells: dict[tuple[int, int], str] = {}
    for p in all_panels(dashboard):
        g = p["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, (p["title"], cells.get((x, y)))
                cells[(x, y)] = p["title"]


def test_every_target_uses_the_datasource_variable(dashboard):
    ts = targets(dashboard)
    assert len(ts) >= 20
    for panel, t in ts:
        assert t["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert t.get("expr", "").strip(), panel["title"]
        assert t.get("refId"), panel["title"]
    for panel in all_panels(dashboard):
        if panel["type"] != "row":
            assert panel.get("targets"), f"panel {panel['title']} has no query"
    refids = [(p["id"], t["refId"]) for p, t in ts]
    assert len(refids) == len(set(refids))


# Grafana's core panel types (what a stock Grafana 10/11 renders without plugins)
CORE_PANELS = {
    "row",
    "timeseries",
    "stat",
    "gauge",
    "bargauge",
    "table",
    "state-timeline",
    "status-history",
    "barchart",
    "piechart",
    "heatmap",
    "histogram",
    "text",
    "logs",
    "nodeGraph",
    "alertlist",
}
MAPPING_TYPES = {"value", "range", "regex", "special"}


def test_panels_follow_grafanas_panel_model(dashboard):
    """The parts of Grafana's dashboard schema these panels use, field by field: a panel type
    Grafana ships, a title, fieldConfig {defaults, overrides[]}, options {}, value mappings
    of a known type whose entries carry a text, unique refIds, boolean range flags."""
    for p in all_panels(dashboard):
        where = f"panel {p.get('id')} {p.get('title')!r}"
        assert p["type"] in CORE_PANELS, where
        assert isinstance(p["title"], str) and p["title"].strip(), where
        assert isinstance(p["id"], int) and p["id"] > 0, where
        if p["type"] == "row":
            assert isinstance(p.get("panels", []), list) and isinstance(p.get("collapsed", False), bool), where
            continue
        fc = p["fieldConfig"]
        assert isinstance(fc["defaults"], dict) and isinstance(fc["overrides"], list), where
        assert isinstance(p.get("options", {}), dict), where
        for m in fc["defaults"].get("mappings", []):
            assert m["type"] in MAPPING_TYPES, where
            if m["type"] == "value":
                assert m["options"] and all(isinstance(k, str) and "text" in v for k, v in m["options"].items()), where
        thresholds = fc["defaults"].get("thresholds")
        if thresholds:
            assert thresholds["mode"] in ("absolute", "percentage"), where
            assert thresholds["steps"][0]["value"] is None, f"{where}: the first step is the base (value null)"
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), where
        for t in p["targets"]:
            assert isinstance(t.get("range", True), bool) and isinstance(t.get("legendFormat", ""), str), where


def test_referenced_variables_are_defined(dashboard):
    defined = {v["name"] for v in dashboard["templating"]["list"]} | BUILTIN_VARS
    text = json.dumps(dashboard["panels"])
    used = {a or b or c for a, b, c in VAR_RE.findall(text)}
    assert used, "the panels reference no variable at all"
    assert used <= defined, used - defined


def test_required_panels_present(dashboard):
    exprs = " ".join(t["expr"] for _, t in targets(dashboard))
    for needle in (
        "chora_events_total",
        "histogram_quantile(0.5,",
        "histogram_quantile(0.95,",
        "histogram_quantile(0.99,",
        "chora_generation_duration_seconds_bucket",
        "chora_batch_",
        "chora_validation_issues_total",
        "chora_dead_letters",
        "chora_consumer_pending_messages",
        "chora_consumer_ack_pending_messages",
        "chora_webhook_circuit_state",
        "chora_events_consumed_total",
        "chora_events_published_total",
        "chora_handler_duration_seconds_bucket",
        "process_resident_memory_bytes",
        'up{job="chora"}',
        "chora_jetstream_",
        "chora_stream_messages",
        "chora_nats_server_up",
        "chora_nats_server_messages_received_total",
    ):
        assert needle in exprs, needle


def exposed_text() -> str:
    """What the five services' /metrics show together once every kind of figure exists:
    the consumer loop's and process figures (every service), the telemetry sink's, the notifier's."""
    from contracts.catalogue import (
        ARTIFACT_ASSEMBLED,
        BATCH_COMPLETED,
        CONTENT_GENERATED,
        CONTENT_VALIDATED,
        NOTIFICATION_DELIVERED,
        NOTIFICATION_FAILED,
    )
    from contracts.envelope import new_event
    from contracts.events import (
        ArtifactAssembled,
        BatchCompleted,
        ContentGenerated,
        ContentValidated,
        ErrorInfo,
        NotificationDelivered,
        NotificationFailed,
        ValidationIssue,
    )

    m = TelemetryMetrics()
    events = (
        new_event(
            CONTENT_GENERATED,
            ContentGenerated(
                request_id="r", content_config_id="c", status="success", generator_type="jinja2", duration_ms=3
            ),
            source="t",
        ),
        new_event(
            CONTENT_GENERATED,
            ContentGenerated(
                request_id="r", content_config_id="c", status="error", error=ErrorInfo(code="X", message="m")
            ),
            source="t",
        ),
        new_event(
            CONTENT_VALIDATED,
            ContentValidated(
                request_id="r",
                content_config_id="c",
                valid=False,
                issues=[ValidationIssue(rule="regex", severity="error", message="m")],
            ),
            source="t",
        ),
        new_event(
            BATCH_COMPLETED,
            BatchCompleted(batch_id="b", status="success", total=3, successful=2, failed=1, duration_ms=10),
            source="t",
        ),
        new_event(
            ARTIFACT_ASSEMBLED,
            ArtifactAssembled(request_id="r", artifact_id="a", status="success", duration_ms=5),
            source="t",
        ),
        new_event(
            NOTIFICATION_DELIVERED,
            NotificationDelivered(
                subscription="s", event_id="e", event_type="t", attempts=1, status_code=200, duration_ms=2
            ),
            source="t",
        ),
        new_event(
            NOTIFICATION_FAILED,
            NotificationFailed(
                subscription="s",
                event_id="e",
                event_type="t",
                attempts=1,
                error=ErrorInfo(code="CIRCUIT_OPEN", message="m"),
            ),
            source="t",
        ),
    )
    import msgspec

    m.mirrored([(ev.type, msgspec.to_builtins(ev.data), 0) for ev in events], 0.0)
    m.malformed("NOT_A_CLOUDEVENT")
    from types import SimpleNamespace

    from services.metrics import ServiceMetrics
    from services.circuit import CircuitBreaker
    from services.notifier.metrics import NotifierMetrics

    service = ServiceMetrics()
    service.consumer("generator", [CONTENT_GENERATED])
    service.handled("generator", CONTENT_GENERATED, "ack", 0.001)
    service.published(
        "generator",
        [
            new_event(
                CONTENT_GENERATED, ContentGenerated(request_id="r", content_config_id="c", status="success"), source="t"
            )
        ],
    )
    notifier = NotifierMetrics()
    notifier.watch({"s": SimpleNamespace(circuit=CircuitBreaker(), stats={"delivered": 1})})
    service.include(notifier.registry)
    service.include(m.registry)
    m.jetstream_polled(
        JetStreamSnapshot(
            1.0,
            "E",
            "D",
            streams=[StreamFigures("E", 10, 100, 2), StreamFigures("D", 1, 10, 0)],
            consumers=[ConsumerFigures("E", "generator", 3, 2, 1, 0)],
            account=AccountFigures(0, 110, 2, 2),
            servers=[
                ServerFigures("127.0.0.1:8222", True, connections=5, in_msgs=10, slow_consumers=0),
                ServerFigures("nats-2:8222", False),
            ],
        )
    )
    m.jetstream_failed()
    return generate_latest(service.registry).decode()


def exposed_metric_names() -> set[str]:
    text = exposed_text()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


def test_every_queried_metric_is_exposed(dashboard):
    exposed = exposed_metric_names()
    queried = set()
    for _, t in targets(dashboard):
        queried |= set(METRIC_RE.findall(t["expr"]))
    for group in yaml.safe_load(ALERTS.read_text())["groups"]:
        for rule in group["rules"]:
            queried |= set(METRIC_RE.findall(rule["expr"]))
    assert queried
    assert queried <= exposed, queried - exposed


def test_exposed_labels_carry_no_ids():
    """Label names come from a short, closed list (no id of an event, request, trace or batch)."""
    from prometheus_client.parser import text_string_to_metric_families

    allowed = {
        "event_type",
        "status",
        "generator",
        "code",
        "result",
        "rule",
        "severity",
        "outcome",
        "subscription",
        "consumer",
        "stream",
        "version",
        "python",
        "le",
        "state",
        "from_state",
        "to_state",
        "server",
    }
    seen = set()
    for fam in text_string_to_metric_families(exposed_text()):
        for smp in fam.samples:
            seen |= set(smp.labels)
            assert not any("id" in k.split("_") for k in smp.labels), smp
    assert seen <= allowed, seen - allowed
    assert {"stream", "consumer", "subscription", "rule", "severity", "state"} <= seen


def test_alert_rules_shape():
    doc = yaml.safe_load(ALERTS.read_text())
    rules = [r for g in doc["groups"] for r in g["rules"]]
    names = {r["alert"] for r in rules}
    assert {
        "ChoraDeadLettersGrowing",
        "ChoraConsumerLagRising",
        "ChoraGenerationErrorRatioHigh",
        "ChoraWebhookCircuitOpen",
        "ChoraServiceDown",
    } <= names
    assert len(names) == len(rules)
    for r in rules:
        assert r["labels"]["severity"] in ("warning", "critical"), r["alert"]
        assert r["annotations"]["summary"], r["alert"]
    assert any("up" in r["expr"] and "== 0" in r["expr"] for r in rules)


def test_prometheus_config_scrapes_the_targets_chora_up_writes_and_loads_the_alerts(tmp_path):
    """dashboards/prometheus.yml reads the file_sd targets of a `chora up` started from the
    repository root with the default CHORA_HOME (paths are relative to the config file)."""
    from services.settings import Settings
    from chora.up import Stack

    doc = yaml.safe_load(PROM.read_text())
    assert doc["rule_files"] == ["alerts.yml"]
    jobs = {j["job_name"]: j for j in doc["scrape_configs"]}
    [files] = [sd["files"] for sd in jobs["chora"]["file_sd_configs"]]
    default_home = Settings.model_fields["home"].default
    stack = Stack(Settings(_env_file=None, home=default_home))
    assert (PROM.parent / files[0]).resolve() == (ROOT / stack.targets_file).resolve()


async def test_jetstream_figures_poll_failure_keeps_last_and_flags_it(tmp_path):
    """The lag and dead-letter panels read the telemetry app's last good poll; a failed poll
    flips chora_jetstream_monitor_up to 0 (the ChoraJetStreamUnreadable alert) without crashing."""
    from services.telemetry.service import TelemetryApp
    from services.telemetry.sink import JsonlSink

    calls = []

    async def monitor():
        calls.append(1)
        if len(calls) == 2:
            raise ConnectionError("nats unreachable")
        return JetStreamSnapshot(
            float(len(calls)),
            "E",
            "D",
            streams=[StreamFigures("D", len(calls), 1, 0)],
            consumers=[ConsumerFigures("E", "generator", 7, 1, 0, 0)],
        )

    app = TelemetryApp(JsonlSink(tmp_path / "e.jsonl"), monitor=monitor, monitor_interval_s=0)
    await app.start()
    try:
        reg = app.metrics.registry
        assert await app.poll_once() is True
        assert reg.get_sample_value("chora_jetstream_monitor_up") == 1
        assert reg.get_sample_value("chora_dead_letters", {"stream": "D"}) == 1
        assert await app.poll_once() is False
        assert reg.get_sample_value("chora_jetstream_monitor_up") == 0
        assert reg.get_sample_value("chora_jetstream_monitor_errors_total") == 1
        assert reg.get_sample_value("chora_consumer_pending_messages", {"stream": "E", "consumer": "generator"}) == 7
        assert await app.poll_once() is True
        assert reg.get_sample_value("chora_dead_letters", {"stream": "D"}) == 3
        assert reg.get_sample_value("chora_jetstream_monitor_up") == 1
    finally:
        await app.close()


def test_the_documented_prometheus_commands_listen_on_loopback_only():
    """Prometheus listens on every interface unless told otherwise: each command the README
    and the scrape config show binds it to 127.0.0.1."""
    texts = [
        (ROOT / p).read_text().replace("\\\n", " ")
        for p in ("README.md", "docs/operations.md", "dashboards/prometheus.yml")
    ]  # join continued lines
    commands = [m.group(0) for t in texts for m in re.finditer(r"prometheus --config\.file[^\n]*", t)]
    assert len(commands) >= 2
    for c in commands:
        assert "--web.listen-address=127.0.0.1:" in c, c
