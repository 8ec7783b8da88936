"""The mirror's per-message path, without a server: header parsing, ack subjects, the fast
envelope read (the same event as the general decoder), malformed and replayed messages."""

from __future__ import annotations

import json
import time

import pytest
from nats.aio.client import Client

from bus.deadletter import H_REPLAY_FOR
from bus.wire import parse_headers, seq_of
from contracts.catalogue import CONTENT_GENERATED, GENERATION_REQUESTED
from contracts.envelope import decode, encode_binary, encode_structured, new_event
from contracts.events import ContentGenerated, ErrorInfo, GenerationRequested
from services.telemetry.metrics import TelemetryMetrics
from services.telemetry.mirror import Stamp, TelemetryMirror, _as_chora_wrote_it
from services.telemetry.sink import JsonlSink


def requested(**ctx):
    return new_event(GENERATION_REQUESTED, GenerationRequested(content_config_id="welcome", context=ctx), source="t")


def generated(status="success", **kw):
    cause = requested()
    data = ContentGenerated(request_id=cause.id, content_config_id="welcome", status=status, **kw)
    return new_event(CONTENT_GENERATED, data, source="generator", cause=cause, subject="s-1")


def wire(headers: dict[str, str], status: str = "") -> bytes:
    return (f"NATS/1.0{status}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n").encode()


# --------------------------------------------------------------------------- bus.mirror helpers


def test_parse_headers_reads_what_nats_py_reads():
    headers, _ = encode_binary(generated(content="x"))
    raw = wire({**headers, "X-Odd": "  spaced value  ", "bad name": "dropped", "Dup": "1"}) + b""
    raw = raw.replace(b"Dup: 1\r\n", b"Dup: 1\r\nDup: 2\r\n")
    status, parsed = parse_headers(raw)
    assert status is None
    assert parsed == Client._parse_header_lines(raw[len(b"NATS/1.0\r\n") :])
    assert parsed["X-Odd"] == "spaced value" and parsed["Dup"] == "2" and "bad name" not in parsed


def test_parse_headers_reads_status_lines():
    hb = b"NATS/1.0 100 Idle Heartbeat\r\nNats-Last-Consumer: 5\r\nNats-Last-Stream: 10\r\n\r\n"
    assert parse_headers(hb) == ("100", {"Nats-Last-Consumer": "5", "Nats-Last-Stream": "10"})
    assert parse_headers(b"NATS/1.0 100 FlowControl Request\r\n\r\n") == ("100", {})
    assert parse_headers(b"NATS/1.0 409 Consumer Deleted\r\n\r\n")[0] == "409"


def test_seq_of_reads_both_ack_subject_forms():
    assert seq_of("$JS.ACK.S.c.1.42.7.1700000000000000000.3") == (42, 7, 1700000000000000000)
    assert seq_of("$JS.ACK.dom.acchash.S.c.1.42.7.1700000000000000000.3.rand") == (42, 7, 1700000000000000000)
    with pytest.raises(ValueError):
        seq_of("$JS.ACK.S.c.1")


# --------------------------------------------------------------------------- envelope


@pytest.mark.parametrize(
    "event",
    [
        requested(name="Ada", nested={"a": [1, 2]}),
        generated(content="hello", generator_type="jinja2", duration_ms=1.5),
        generated(status="error", error=ErrorInfo(code="X", message="boom")),
        new_event(GENERATION_REQUESTED, GenerationRequested(content_config_id="c"), source="t"),
    ],
)
def test_the_fast_read_is_the_general_decoders_event(event):
    headers, body = encode_binary(event)
    fast = _as_chora_wrote_it(headers, body)
    assert fast is not None
    assert fast == decode(headers, body, typed=False)


def test_anything_but_chora_s_own_form_goes_to_the_general_decoder():
    ev = new_event(GENERATION_REQUESTED, GenerationRequested(content_config_id="c"), source="a source with spaces")
    headers, body = encode_binary(ev)  # the source is percent-encoded
    assert _as_chora_wrote_it(headers, body) is None
    assert decode(headers, body, typed=False).source == "a source with spaces"
    assert _as_chora_wrote_it({**headers, "Ce-Extra": "1"}, body) is None
    assert _as_chora_wrote_it(*encode_structured(ev)) is None
    assert _as_chora_wrote_it(None, body) is None


# --------------------------------------------------------------------------- the target


@pytest.fixture
async def target(tmp_path):
    sink = JsonlSink(tmp_path / "events.jsonl")
    await sink.start()
    t = TelemetryMirror(sink, TelemetryMetrics(), max_event_bytes=4096)
    yield t
    await sink.close()


def lines(target) -> list[dict]:
    return [json.loads(x) for x in target.sink.path.read_bytes().splitlines()]


async def test_a_malformed_message_gets_a_line_of_its_own_and_the_next_follows(target):
    good = requested(name="Ada")
    h, b = encode_binary(good)
    now = time.time_ns()
    target.accept(1, "chora.generation.requested", h, b, now)
    target.accept(2, "chora.generation.requested", {"ce-id": "x1", "ce-type": "chora.generation.requested"}, b, now)
    target.accept(3, "chora.generation.requested", h, b"{not json", now)
    target.accept(4, "chora.generation.requested", h, b"x" * 5000, now)  # over max_event_bytes
    target.accept(5, "chora.generation.requested", None, b"raw bytes", now)
    target.accept(6, "chora.generation.requested", h, b, now)
    await target.flush()
    recs = lines(target)
    assert [r["seq"] for r in recs] == [1, 2, 3, 4, 5, 6]
    assert [r["status"] for r in recs] == ["ok", "malformed", "malformed", "malformed", "malformed", "ok"]
    assert [r.get("error_code") for r in recs[1:5]] == [
        "MISSING_ATTRIBUTE",
        "INVALID_JSON",
        "OVERSIZED",
        "NOT_A_CLOUDEVENT",
    ]
    assert recs[1]["event_id"] == "x1" and recs[2]["event_id"] == good.id
    assert "raw bytes" not in target.sink.path.read_text() and "{not json" not in target.sink.path.read_text()
    reg = target.metrics.registry
    assert reg.get_sample_value("chora_sink_malformed_total", {"code": "INVALID_JSON"}) == 1
    assert reg.get_sample_value("chora_sink_lines_written_total") == 6
    assert target.malformed == 4


async def test_a_replay_for_another_consumer_is_skipped(target):
    ev = requested()
    h, b = encode_binary(ev)
    now = time.time_ns()
    target.accept(1, "chora.generation.requested", h, b, now)
    target.accept(2, "chora.generation.requested", {**h, H_REPLAY_FOR: "generator"}, b, now)
    target.accept(3, "chora.generation.requested", {**h, H_REPLAY_FOR: "telemetry"}, b, now)
    await target.flush()
    assert [r["seq"] for r in lines(target)] == [1, 3]
    assert target.skipped == 1


async def test_labels_never_take_a_payload_value_as_it_comes(target):
    h, _ = encode_binary(requested())
    hostile = {**h, "ce-type": "chora.made_up_" + "x" * 50}
    target.accept(1, "chora.x", hostile, b'{"status": "pwned-123", "generator_type": ["a"]}', time.time_ns())
    h2, _ = encode_binary(generated())
    target.accept(2, "chora.x", h2, b'{"status": ["not", "hashable"], "duration_ms": "NaN"}', time.time_ns())
    await target.flush()
    reg = target.metrics.registry
    assert reg.get_sample_value("chora_events_total", {"event_type": "other", "status": "other"}) == 1
    assert reg.get_sample_value("chora_events_total", {"event_type": CONTENT_GENERATED, "status": "other"}) == 1
    assert len(lines(target)) == 2


def test_stamp_is_rfc3339_utc_with_microseconds():
    clock = iter([1704067200.123456, 1704067200.1236, 1704067201.5]).__next__
    st = Stamp(clock)
    assert st() == "2024-01-01T00:00:00.123456Z"
    assert st() == "2024-01-01T00:00:00.123456Z"  # within the same millisecond
    assert st() == "2024-01-01T00:00:01.500000Z"
