"""The dashboard and the alert rules against a real Prometheus scraping a real stack.

The five services run in-process (:func:`services.runtime.run_service`) on a
real nats-server, each serving its own ``/metrics``; the notifier posts to two
real local HTTP endpoints (one accepts, one rejects) and to a port where
nobody listens (its circuit opens). A real ``prometheus`` (Debian's package)
runs with ``dashboards/prometheus.yml`` as shipped, except for the scrape
interval and the path of the file_sd targets, which are written the way
`chora up` writes them; ``dashboards/alerts.yml`` is its rule file. Under load (a batch with failing items, failing requests,
content that fails validation, an artifact, a malformed message) every panel
query of ``dashboards/chora-compose.json`` and every alert expression must
parse and return data through Prometheus' HTTP API.

An alert expression is a comparison that returns data only while it fires,
so each is checked twice: as written it must parse (status success), and in
its ``bool`` form (``x > bool 5``: one 0/1 sample per watched series) it must
return data, which proves it watches series that exist with the labels it
groups by. Two alerts that this load really triggers (dead letters growing,
error ratio high) must also return data as written.

Skipped only when the prometheus binary is absent outside CI; under CI (CI=1/true/yes)
a missing binary fails the test.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import threading
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from bus.publisher import Publisher
from contracts.catalogue import ARTIFACT_REQUESTED, BATCH_REQUESTED, GENERATION_REQUESTED, subject_for
from contracts.envelope import new_event
from contracts.events import ArtifactRequested, BatchItem, BatchRequested, GenerationRequested
from chora.up import write_prometheus_targets
from services.runtime import ready_file, run_service
from tests.conftest import ROOT, stop_services, under_ci, wait_for

DASHBOARD = ROOT / "dashboards" / "chora-compose.json"
ALERTS = ROOT / "dashboards" / "alerts.yml"
PROM_CONFIG = ROOT / "dashboards" / "prometheus.yml"
RATE_INTERVAL = "10s"
SERVICES = ("generator", "validator", "assembler", "notifier", "telemetry")


def prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        if under_ci():
            pytest.fail("prometheus is not installed (CI must install it: apt-get install -y prometheus)")
        pytest.skip("prometheus binary not installed")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- queries


def panel_queries(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title, expr) of every target, with Grafana's variables resolved."""
    out = []
    for panel in dashboard["panels"]:
        for t in panel.get("targets", []):
            assert t["datasource"]["uid"] == "${datasource}"  # resolved: it is this Prometheus
            out.append((panel["title"], t["expr"].replace("$__rate_interval", RATE_INTERVAL)))
    return out


def alert_rules() -> list[dict]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [r for g in doc["groups"] for r in g["rules"] if "alert" in r]


_COMPARISONS = ("==", "!=", ">=", "<=", ">", "<")


def bool_form(expr: str) -> str:
    """``expr`` with ``bool`` after every comparison operator outside label
    matchers and strings: ``a > 5`` -> ``a > bool 5`` (0 or 1 per series of a)."""
    out, i, depth, quote = [], 0, 0, None
    while i < len(expr):
        c = expr[i]
        if quote:
            out.append(c)
            if c == "\\":
                out.append(expr[i + 1])
                i += 2
                continue
            if c == quote:
                quote = None
            i += 1
            continue
        if c in "\"'`":
            quote = c
        elif c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
        elif depth == 0:
            op = next((o for o in _COMPARISONS if expr.startswith(o, i)), None)
            if op and not expr.startswith("=~", i) and not expr.startswith("!~", i):
                out.append(op)
                i += len(op)
                if not expr[i:].lstrip().startswith("bool"):
                    out.append(" bool")
                continue
        out.append(c)
        i += 1
    return "".join(out)


def test_bool_form():
    assert bool_form('up{job=~"chora.*"} == 0') == 'up{job=~"chora.*"} == bool 0'
    assert bool_form('a{x!="y"} > 1 and b > 0') == 'a{x!="y"} > bool 1 and b > bool 0'
    assert bool_form("a >= bool 3") == "a >= bool 3"
    assert bool_form('a{l="x>1"} < 2') == 'a{l="x>1"} < bool 2'


# --------------------------------------------------------------------------- processes


class Prometheus:
    def __init__(self, binary: str, workdir: Path, port: int):
        self.binary, self.workdir, self.port = binary, workdir, port
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None
        self.log = workdir / "prometheus.log"

    def start(self, config: Path) -> None:
        self._log = open(self.log, "wb")
        self.proc = subprocess.Popen(
            [
                self.binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1h",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if getattr(self, "_log", None):
            self._log.close()

    def get(self, path: str, **params) -> dict:
        url = f"{self.url}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:  # a bad query answers 400 with a JSON error
            return json.loads(e.read())

    def ready(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, self.log.read_text()[-3000:]
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, ConnectionError, OSError):
            return False


class Endpoint(BaseHTTPRequestHandler):
    """/ok answers 200, anything else 400 (a permanent refusal)."""

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200 if self.path == "/ok" else 400)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


# --------------------------------------------------------------------------- the test


async def test_dashboard_and_alerts_against_real_prometheus(settings, nc, nats_server, tmp_path, monkeypatch):
    binary = prometheus_binary()
    promtool = shutil.which("promtool")
    if promtool:
        for args in (["check", "rules", str(ALERTS)], ["check", "config", str(PROM_CONFIG)]):
            r = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, r.stdout + r.stderr

    # webhook endpoints and the notifier config
    http = ThreadingHTTPServer(("127.0.0.1", 0), Endpoint)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{http.server_address[1]}"
    monkeypatch.setenv("PROM_TEST_HOOK_SECRET", "s3cret-for-the-test")
    notifier_config = tmp_path / "notifier.yaml"
    notifier_config.write_text(
        yaml.safe_dump(
            {
                "subscriptions": [
                    {
                        "name": "done-hook",
                        "events": ["chora.batch_completed", "chora.artifact_assembled"],
                        "url": f"{base}/ok",
                        "secret_env": "PROM_TEST_HOOK_SECRET",
                    },
                    {
                        "name": "errors-hook",
                        "events": ["chora.content_generated"],
                        "filters": {"status": ["error"]},
                        "url": f"{base}/reject",
                        "secret_env": "PROM_TEST_HOOK_SECRET",
                        "max_attempts": 1,
                    },
                    {
                        "name": "down-hook",
                        "events": ["chora.content_generated"],
                        "filters": {"status": ["error"]},
                        "url": f"http://127.0.0.1:{free_port()}/nobody-listens",
                        "secret_env": "PROM_TEST_HOOK_SECRET",
                        "max_attempts": 1,
                        "circuit": {"failure_threshold": 2, "reset_timeout_s": 600},
                    },
                ]
            }
        )
    )
    # the NATS server panels read /varz: of the real server, and of a node that is down
    dead_node = f"127.0.0.1:{free_port()}"
    settings = settings.model_copy(
        update={
            "notifier_config": notifier_config,
            "metrics_port": 0,
            "nats_monitor_url": f"{nats_server.monitor_url},http://{dead_node}",
            "monitor_interval_s": 1.0,
        }
    )

    stop = asyncio.Event()
    tasks = [asyncio.create_task(run_service(name, settings, stop=stop), name=name) for name in SERVICES]
    prom = Prometheus(binary, tmp_path / "prometheus", free_port())
    prom.workdir.mkdir()
    try:

        def all_ready() -> bool:
            for t in tasks:
                if t.done():
                    t.result()  # raise the service's start error
            return all(ready_file(settings, n).exists() for n in SERVICES)

        await wait_for(all_ready, 30, "every service ready")
        infos = {n: json.loads(ready_file(settings, n).read_text()) for n in SERVICES}
        targets_file = prom.workdir / "targets" / "prometheus-targets.json"
        write_prometheus_targets(targets_file, infos)

        shipped = yaml.safe_load(PROM_CONFIG.read_text())
        [job] = shipped["scrape_configs"]
        [sd] = job["file_sd_configs"]
        assert [Path(f).name for f in sd["files"]] == [targets_file.name]
        sd["files"] = [str(targets_file)]
        shipped["global"].update(scrape_interval="1s", evaluation_interval="1s")
        shipped["rule_files"] = [str(ALERTS)]
        config = prom.workdir / "prometheus.yml"
        config.write_text(yaml.safe_dump(shipped))
        if promtool:
            r = subprocess.run([promtool, "check", "config", str(config)], capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, r.stdout + r.stderr
        prom.start(config)
        await wait_for(prom.ready, 30, "prometheus ready")

        async def query(expr: str) -> dict:
            return await asyncio.to_thread(prom.get, "/api/v1/query", query=expr)

        # The dead-letter figure must be scraped at its starting value first, so that "growing" can be seen.
        async def dlq_scraped() -> bool:
            r = await query("chora_dead_letters")
            return r["status"] == "success" and bool(r["data"]["result"])

        await wait_for(dlq_scraped, 30, "chora_dead_letters scraped")

        # load: a batch with failing items, failing requests, invalid content, an artifact, a malformed message
        js = nc.jetstream()
        pub = Publisher(js, settings.prefix)
        items = [BatchItem(content_config_id=c) for c in ["hello-world", "welcome-email", "no-such-config"] * 4]
        await pub.publish(new_event(BATCH_REQUESTED, BatchRequested(items=items), source="test"))
        events = [
            new_event(GENERATION_REQUESTED, GenerationRequested(content_config_id="missing-config"), source="test")
            for _ in range(5)
        ]
        events += [
            new_event(
                GENERATION_REQUESTED,
                GenerationRequested(content_config_id="hello-world", context={"name": "two\nlines"}),
                source="test",
            )
            for _ in range(3)
        ]
        events.append(new_event(ARTIFACT_REQUESTED, ArtifactRequested(artifact_id="welcome-pack"), source="test"))
        await pub.publish_many(events)
        await js.publish(subject_for(GENERATION_REQUESTED, settings.prefix), b"not a cloudevent")

        queries = panel_queries(json.loads(DASHBOARD.read_text()))
        alerts = alert_rules()
        assert queries and alerts
        checks: list[tuple[str, str]] = list(queries)
        for rule in alerts:
            checks.append((f"alert {rule['alert']} (bool form)", bool_form(rule["expr"])))
        firing = {
            "ChoraDeadLettersGrowing",
            "ChoraGenerationErrorRatioHigh",
            "ChoraWebhookCircuitOpen",
            "ChoraNatsServerDown",
        }
        checks += [(f"alert {r['alert']}", r["expr"]) for r in alerts if r["alert"] in firing]

        # every expression as written must parse
        for rule in alerts:
            r = await query(rule["expr"])
            assert r["status"] == "success", (rule["alert"], r)

        missing: dict[str, str] = {}

        async def every_check_has_data() -> bool:
            missing.clear()
            for title, expr in checks:
                r = await query(expr)
                assert r["status"] == "success", (title, expr, r)  # a parse error never heals
                if not r["data"]["result"]:
                    missing[title] = expr
            return not missing

        try:
            await wait_for(every_check_has_data, 90, "every panel query and alert expression returning data")
        except AssertionError as e:
            raise AssertionError(f"{e}; still empty: {json.dumps(missing, indent=1)}") from None

        # Prometheus evaluates the rule file itself without errors
        async def rules_evaluated() -> bool:
            r = await asyncio.to_thread(prom.get, "/api/v1/rules")
            rules = [x for g in r["data"]["groups"] for x in g["rules"]]
            assert {x["name"] for x in rules} == {a["alert"] for a in alerts}
            assert all(x["health"] != "err" for x in rules), [x.get("lastError") for x in rules]
            return all(x["health"] == "ok" for x in rules)

        await wait_for(rules_evaluated, 30, "alert rules evaluated")

        # a few figures are what the load made them (waiting for the load to be done and scraped)
        async def value(expr: str) -> float:
            r = await query(expr)
            res = r["data"]["result"]
            return float(res[0]["value"][1]) if res else -1.0

        async def expect(expr: str, op: str, want: float) -> None:
            got: list[float] = []

            async def reached() -> bool:
                got.append(await value(expr))
                return got[-1] == want if op == "==" else got[-1] >= want

            try:
                await wait_for(reached, 30, expr)
            except AssertionError:
                raise AssertionError(f"{expr}: {got[-1] if got else None}, expected {op} {want}") from None

        generator = f'service="generator",consumer="generator",event_type="{GENERATION_REQUESTED}"'
        figures = [
            ('sum(chora_events_total{event_type="chora.batch_completed"})', "==", 1),
            ('sum(chora_batch_items_total{outcome="error"})', "==", 4),
            ('sum(chora_webhook_deliveries_total{subscription="errors-hook",outcome="failed"})', ">=", 5),
            ('sum(chora_validation_issues_total{severity="error"})', ">=", 3),
            ("sum(chora_dead_letters)", ">=", 1),
            ('count(chora_consumer_pending_messages{consumer="generator"})', "==", 1),
            # every service process is a target of its own, labelled with its service
            ('count(up{job="chora"} == 1)', "==", len(SERVICES)),
            ("count(count by (service) (chora_build_info))", "==", len(SERVICES)),
            # per service: what its consumer loops consumed and published
            (f'sum(chora_events_consumed_total{{{generator},outcome="ack"}})', ">=", 8 + len(items)),
            (
                'sum(chora_events_published_total{service="generator",event_type="chora.content_generated",'
                'status="error"})',
                ">=",
                5 + 4,
            ),
            # the malformed message: a line of its own in the sink (no dead letter from it)
            ('sum(chora_sink_malformed_total{code="NOT_A_CLOUDEVENT"})', "==", 1),
            ('sum(chora_handler_duration_seconds_count{service="validator"})', ">=", 1),
            # the breaker's live state, straight from the notifier
            ('chora_webhook_circuit_state{subscription="down-hook",state="open"}', "==", 1),
            ('chora_webhook_circuit_state{subscription="done-hook",state="closed"}', "==", 1),
            ('sum(chora_webhook_circuit_transitions_total{subscription="down-hook",to_state="open"})', "==", 1),
            ('sum(chora_notifier_events_total{subscription="down-hook",outcome="failed"})', ">=", 2),
            # the NATS servers: the real one answers and carries the load, the dead node is down
            (f'chora_nats_server_up{{server="{nats_server.monitor_url.split("//")[1]}"}}', "==", 1),
            (f'chora_nats_server_up{{server="{dead_node}"}}', "==", 0),
            ("sum(chora_nats_server_messages_received_total)", ">=", 100),
            ("sum(chora_nats_server_connections)", ">=", len(SERVICES)),
        ]
        for expr, op, want in figures:
            await expect(expr, op, want)
    finally:
        failed = await stop_services(stop, tasks)
        prom.stop()
        http.shutdown()
        http.server_close()
        assert not failed, f"services failed: {failed}"
