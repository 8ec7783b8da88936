"""TelemetryApp: its mirror target writes stream messages to JSONL and Prometheus; /metrics over
real HTTP (served the way the runtime serves it: the process's ServiceMetrics with the app's
registry)."""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from services.settings import Settings
from contracts.catalogue import CONTENT_GENERATED, GENERATION_REQUESTED
from contracts.envelope import encode_binary, new_event
from contracts.events import ContentGenerated, ErrorInfo, GenerationRequested
from services import runtime
from services.metrics import ServiceMetrics
from services.telemetry.metrics import TelemetryMetrics, event_timestamp
from services.telemetry.service import TelemetryApp, build


def feed(app, seq: int, ev, stored: float | None = None) -> None:
    """Hand ``ev`` to the app's mirror target as stream message ``seq`` (as bus.mirror does)."""
    headers, body = encode_binary(ev)
    stored_ns = int((stored if stored is not None else event_timestamp(ev.time) or 0.0) * 1e9)
    app.mirror_target.accept(seq, "chora." + ev.type.removeprefix("chora."), headers, body, stored_ns)


async def mirror(app, *events, start: int = 1) -> None:
    for i, ev in enumerate(events, start):
        feed(app, i, ev)
    await app.mirror_target.flush()


def requested(config="welcome"):
    return new_event(GENERATION_REQUESTED, GenerationRequested(content_config_id=config), source="test")


def generated(cause, status="success", **kw):
    data = ContentGenerated(request_id=cause.id, content_config_id=cause.data.content_config_id, status=status, **kw)
    return new_event(CONTENT_GENERATED, data, source="generator", cause=cause)


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        assert r.status == 200
        return r.read().decode()


def samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.fixture
async def app(tmp_path):
    settings = Settings(home=tmp_path / "var", metrics_host="127.0.0.1", metrics_port=0)
    a = build(settings)
    await a.start()
    a.process = ServiceMetrics()
    a.process.include(a.metrics_registry)
    a.process.serve("127.0.0.1", 0)
    yield a
    await a.close()
    a.process.stop()


async def test_build_is_registered_and_lazy(tmp_path):
    settings = Settings(home=tmp_path / "var", metrics_port=0)
    a = runtime.build("telemetry", settings)
    assert isinstance(a, TelemetryApp)
    assert a.name == "telemetry"
    assert not settings.jsonl_path.exists()  # nothing happens before start()
    assert a.info()["jsonl_path"] == str(settings.jsonl_path)


async def test_info_reports_path_and_the_served_url_is_real(app, tmp_path):
    info = app.info()
    assert info["jsonl_path"] == str(tmp_path / "var" / "telemetry" / "events.jsonl")
    m = re.fullmatch(r"http://127\.0\.0\.1:(\d+)/metrics", app.process.url)
    assert m and int(m.group(1)) > 0
    assert (tmp_path / "var" / "telemetry" / "events.jsonl").exists()


async def test_mirror_target_writes_lines_and_metrics_over_http(app):
    req1, req2, req3 = requested("a"), requested("b"), requested("c")
    ok1 = generated(req1, generator_type="jinja2", duration_ms=250.0)
    ok2 = generated(req2, generator_type="jinja2", duration_ms=1500.0)
    bad = generated(
        req3,
        status="error",
        generator_type="jinja2",
        duration_ms=3.0,
        error=ErrorInfo(code="TEMPLATE_ERROR", message="boom"),
    )
    await mirror(app, req1, req2, req3, ok1, ok2, bad)

    path = app.sink.path
    assert [json.loads(x)["seq"] for x in path.read_text().splitlines()] == [1, 2, 3, 4, 5, 6]

    text = await asyncio.to_thread(scrape, app.process.url)
    s = samples(text)
    assert s[("chora_events_total", (("event_type", CONTENT_GENERATED), ("status", "success")))] == 2
    assert s[("chora_events_total", (("event_type", CONTENT_GENERATED), ("status", "error")))] == 1
    assert s[("chora_events_total", (("event_type", GENERATION_REQUESTED), ("status", "ok")))] == 3
    assert s[("chora_sink_lines_written_total", ())] == 6
    # generation duration: successes only, in seconds
    assert s[("chora_generation_duration_seconds_count", (("generator", "jinja2"),))] == 2
    assert s[("chora_generation_duration_seconds_sum", (("generator", "jinja2"),))] == pytest.approx(1.75)
    assert s[("chora_generation_duration_seconds_bucket", (("generator", "jinja2"), ("le", "0.5")))] == 1
    assert s[("chora_sink_lag_seconds_count", ())] == 6
    # no ids in labels: neither event ids, request ids nor trace ids appear anywhere
    for ev in (req1, req2, req3, ok1, ok2, bad):
        assert ev.id not in text
        assert ev.traceid not in text
    allowed = {
        "event_type",
        "status",
        "generator",
        "consumer",
        "outcome",
        "le",
        "code",
        "result",
        "rule",
        "severity",
        "subscription",
        "stream",
        "version",
        "python",
    }
    for fam in text_string_to_metric_families(text):
        if fam.name.startswith("chora_"):
            for smp in fam.samples:
                assert set(smp.labels) <= allowed, (smp.name, smp.labels)


async def test_own_registry_not_the_global_one(app):
    await mirror(app, requested())
    assert REGISTRY.get_sample_value("chora_sink_lines_written_total") is None
    assert app.metrics.registry.get_sample_value("chora_sink_lines_written_total") == 1
    # two apps in one process do not clash
    other = TelemetryMetrics()
    assert other.registry is not app.metrics.registry


async def test_lag_is_write_time_minus_the_time_the_stream_stored_it(tmp_path):
    metrics = TelemetryMetrics()
    t = 1_700_000_000.0
    metrics.mirrored(
        [(GENERATION_REQUESTED, {}, int(t * 1e9)), (GENERATION_REQUESTED, {}, int((t - 1.0) * 1e9))], t + 2
    )
    assert metrics.registry.get_sample_value("chora_sink_lag_seconds_sum") == pytest.approx(5.0, abs=1e-5)
    assert metrics.registry.get_sample_value("chora_sink_lag_seconds_count") == 2
    assert metrics.registry.get_sample_value("chora_sink_lag_seconds_bucket", {"le": "1.0"}) == 0
    assert metrics.registry.get_sample_value("chora_sink_lag_seconds_bucket", {"le": "2.5"}) == 1
    assert metrics.registry.get_sample_value("chora_sink_lag_seconds_bucket", {"le": "5.0"}) == 2


def test_event_timestamp_tolerates_garbage():
    assert event_timestamp(None) is None
    assert event_timestamp("not a time") is None
    assert event_timestamp("2024-01-01T00:00:00.500000Z") == pytest.approx(1704067200.5)


async def test_close_closes_file_and_stop_stops_http_server(tmp_path):
    settings = Settings(home=tmp_path / "var", metrics_port=0)
    a = build(settings)
    await a.start()
    process = ServiceMetrics()
    process.include(a.metrics_registry)
    process.serve("127.0.0.1", 0)
    url = process.url
    await asyncio.to_thread(scrape, url)
    await mirror(a, requested())
    await a.close()
    await asyncio.to_thread(process.stop)
    with pytest.raises(OSError):
        await asyncio.to_thread(scrape, url)
    assert process.url is None
    assert a.sink._fd is None
    [line] = settings.jsonl_path.read_text().splitlines()
    assert json.loads(line)["event_type"] == GENERATION_REQUESTED


async def test_failed_write_raises_and_counts_nothing_until_written(app, monkeypatch):
    from services.telemetry import sink as sink_mod

    real = sink_mod.os.write

    def boom(fd, data):
        if fd == app.sink._fd:
            raise OSError(28, "No space left on device")
        return real(fd, data)

    monkeypatch.setattr(sink_mod.os, "write", boom)
    ev = requested()
    with pytest.raises(sink_mod.SinkError):
        await mirror(app, ev)
    assert app.metrics.registry.get_sample_value("chora_sink_lines_written_total") == 0
    assert app.mirror_target.position() == 0  # the reader reads it again
    monkeypatch.setattr(sink_mod.os, "write", real)
    await mirror(app, ev)
    assert app.metrics.registry.get_sample_value("chora_sink_lines_written_total") == 1
