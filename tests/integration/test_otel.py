"""Optional OpenTelemetry spans: exported over OTLP/HTTP to a real local receiver when
OTEL_* asks for it; nothing imported from opentelemetry when it does not."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from bus import tracing
from bus.consumer import ConsumerLoop
from bus.publisher import Publisher
from bus.topology import Topology, provision
from contracts.catalogue import CONTENT_GENERATED, GENERATION_REQUESTED
from contracts.envelope import CloudEvent, new_event
from contracts.events import ContentGenerated, GenerationRequested
from contracts.tracing import parse_traceparent
from tests.conftest import ROOT, child_env, wait_for

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_SPAN}-01"


def _otel_available() -> bool:
    try:
        import opentelemetry.exporter.otlp.proto.http.trace_exporter  # noqa: F401
        import opentelemetry.proto.collector.trace.v1.trace_service_pb2  # noqa: F401
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError:
        return False
    return True


def require_otel() -> None:
    if _otel_available():
        return
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail("opentelemetry-sdk / opentelemetry-exporter-otlp-proto-http missing: install the 'otel' extra")
    pytest.skip("OpenTelemetry not installed (the 'otel' extra); fails under CI=true")


class _Receiver:
    """A real OTLP/HTTP trace receiver: stores every POST /v1/traces body."""

    def __init__(self):
        self.bodies: list[bytes] = []
        self.paths: list[str] = []
        outer = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n)
                outer.paths.append(self.path)
                if self.path != "/v1/traces":
                    self.send_response(404)
                    self.end_headers()
                    return
                outer.bodies.append(body)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def spans(self) -> list[tuple[object, object]]:
        """(resource, span) of everything received."""
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        out = []
        for body in list(self.bodies):
            req = ExportTraceServiceRequest()
            req.ParseFromString(body)
            for rs in req.resource_spans:
                for ss in rs.scope_spans:
                    for span in ss.spans:
                        out.append((rs.resource, span))
        return out

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    with _Receiver() as r:
        yield r


@pytest.fixture
def otel_env(monkeypatch, receiver):
    require_otel()
    for k in list(os.environ):
        if k.startswith("OTEL_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "chora-test-otel")
    tracing.shutdown()  # forget any earlier decision: read this environment
    yield receiver
    tracing.shutdown()


def _attrs(span) -> dict[str, str]:
    return {kv.key: kv.value.string_value for kv in span.attributes}


async def test_span_exported_with_parent_from_traceparent(nc, settings, otel_env):
    receiver = otel_env
    js = nc.jetstream()
    topo = Topology.from_settings(settings)
    await provision(js, topo)
    outputs: list[CloudEvent] = []

    async def handler(ev, delivery):
        out = [
            new_event(
                CONTENT_GENERATED,
                ContentGenerated(request_id=ev.id, content_config_id="x", status="success"),
                source="t",
                cause=ev,
            )
        ]
        outputs.extend(out)
        return out

    loop = ConsumerLoop(nc, js, topo, topo.consumers["generator"], handler)
    task = asyncio.create_task(loop.run())
    ev = new_event(
        GENERATION_REQUESTED, GenerationRequested(content_config_id="hello-world", context={}), source="test"
    )
    ev.traceparent = TRACEPARENT
    ev.traceid = TRACE_ID
    await Publisher(js, topo.prefix).publish(ev)
    await wait_for(lambda: loop.stats.acked == 1, what="the event handled and acked")
    await loop.stop()  # flushes the spans
    await task

    def ours():
        return [s for _, s in receiver.spans() if s.name == f"generator process {GENERATION_REQUESTED}"]

    await wait_for(lambda: ours(), timeout=10, what="the consumer span at the OTLP receiver")
    assert receiver.paths and set(receiver.paths) == {"/v1/traces"}
    [span] = ours()
    assert span.trace_id.hex() == TRACE_ID
    assert span.parent_span_id.hex() == PARENT_SPAN
    assert span.span_id.hex() != PARENT_SPAN
    assert span.kind == span.SPAN_KIND_CONSUMER
    attrs = _attrs(span)
    assert attrs["messaging.system"] == "nats"
    assert attrs["messaging.message.id"] == ev.id
    assert attrs["messaging.destination.name"] == topo.subject(GENERATION_REQUESTED)
    assert attrs["chora.trace_id"] == TRACE_ID
    [(resource, _)] = [(r, s) for r, s in receiver.spans() if s.span_id == span.span_id]
    assert _attrs(resource)["service.name"] == "chora-test-otel"

    # The published output carries the consumer span as its parent: one connected trace.
    stored = await js.get_last_msg(topo.events_stream, topo.subject(CONTENT_GENERATED))
    tp = parse_traceparent(stored.headers["ce-traceparent"])
    assert tp is not None and tp[0] == TRACE_ID and tp[1] == span.span_id.hex()
    assert outputs and outputs[0].id == stored.headers["Nats-Msg-Id"]


async def test_failed_handling_span_is_marked_error(nc, settings, otel_env):
    receiver = otel_env
    js = nc.jetstream()
    topo = Topology.from_settings(settings)
    await provision(js, topo)
    from bus.consumer import Reject

    async def handler(ev, delivery):
        raise Reject("BAD", "never")

    loop = ConsumerLoop(nc, js, topo, topo.consumers["generator"], handler)
    task = asyncio.create_task(loop.run())
    ev = new_event(GENERATION_REQUESTED, GenerationRequested(content_config_id="x", context={}), source="test")
    ev.traceparent = TRACEPARENT
    await Publisher(js, topo.prefix).publish(ev)
    await wait_for(lambda: loop.stats.dead == 1, what="the event dead-lettered")
    await loop.stop()
    await task
    await wait_for(lambda: receiver.spans(), timeout=10, what="a span at the OTLP receiver")
    [(_, span)] = receiver.spans()
    assert span.parent_span_id.hex() == PARENT_SPAN
    assert span.status.code == span.status.STATUS_CODE_ERROR
    assert "BAD" in span.status.message


_NO_OTEL_SCRIPT = r"""
import asyncio, sys
import nats
from bus.consumer import ConsumerLoop
from bus.publisher import Publisher
from bus.topology import Topology, provision
from bus.settings import NatsSettings
from services.settings import Settings
from contracts.catalogue import CONTENT_GENERATED, GENERATION_REQUESTED
from contracts.envelope import new_event
from contracts.events import ContentGenerated, GenerationRequested
from tests.conftest import wait_for

async def main(url, prefix, home):
    settings = Settings(home=home, prefix=prefix, nats=NatsSettings(url=url))
    nc = await nats.connect(url)
    js = nc.jetstream()
    topo = Topology.from_settings(settings)
    await provision(js, topo)
    async def handler(ev, delivery):
        return [new_event(CONTENT_GENERATED, ContentGenerated(request_id=ev.id, content_config_id="x", status="success"), source="t", cause=ev)]
    loop = ConsumerLoop(nc, js, topo, topo.consumers["generator"], handler)
    task = asyncio.create_task(loop.run())
    await Publisher(js, topo.prefix).publish_many([new_event(GENERATION_REQUESTED, GenerationRequested(content_config_id="x", context={}), source="t") for _ in range(5)])
    await wait_for(lambda: loop.stats.acked == 5, what="5 acks")
    await loop.stop()
    await task
    await nc.close()
    loaded = sorted(m for m in sys.modules if m == "opentelemetry" or m.startswith("opentelemetry."))
    print(f"acked={loop.stats.acked} published={loop.stats.published} otel={loaded}")

asyncio.run(main(*sys.argv[1:]))
"""


def test_no_opentelemetry_imported_when_not_configured(nats_server, tmp_path, prefix):
    """Off by default: handling events imports nothing from opentelemetry (a fresh process,
    since this test process may have loaded it for the tests above)."""
    env = {k: v for k, v in child_env().items() if not k.startswith("OTEL_")}
    r = subprocess.run(
        [sys.executable, "-c", _NO_OTEL_SCRIPT, nats_server.url, prefix, str(tmp_path / "var")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert "acked=5 published=5 otel=[]" in r.stdout, r.stdout + r.stderr


def test_sdk_disabled_wins_over_endpoint():
    assert tracing.configured({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x"})
    assert tracing.configured({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://x"})
    assert not tracing.configured({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x", "OTEL_SDK_DISABLED": "TRUE"})
    assert not tracing.configured({})
