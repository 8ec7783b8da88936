"""JsonlSink: line content, one line per stream sequence, batches, position on restart, repair, file mode."""

from __future__ import annotations

import errno
import json
import os
import stat

import msgspec
import pytest

from contracts.catalogue import CONTENT_GENERATED, GENERATION_REQUESTED
from contracts.envelope import new_event
from contracts.events import ContentGenerated, ErrorInfo, GenerationRequested
from services.telemetry import sink as sink_mod
from services.telemetry.lines import encode_seq_line
from services.telemetry.sink import JsonlSink, SinkError


def requested(config: str = "welcome", **ctx):
    return new_event(GENERATION_REQUESTED, GenerationRequested(content_config_id=config, context=ctx), source="test")


def generated(cause=None, status="success", **kw):
    cause = cause or requested()
    data = ContentGenerated(request_id=cause.id, content_config_id="welcome", status=status, **kw)
    return new_event(CONTENT_GENERATED, data, source="generator", cause=cause)


def lines(path):
    raw = path.read_bytes()
    assert raw == b"" or raw.endswith(b"\n")
    return [json.loads(x) for x in raw.splitlines()]


@pytest.fixture
async def sink(tmp_path):
    s = JsonlSink(tmp_path / "tele" / "events.jsonl")
    await s.start()
    yield s
    await s.close()


# --------------------------------------------------------------------------- content


async def test_success_line_content(sink):
    req = requested()
    ev = generated(
        req,
        generator_type="jinja2",
        duration_ms=12.5,
        content="hello world" * 100,
        content_hash="sha256:abc",
        content_length=1100,
    )
    assert await sink.write(ev) is True
    [line] = lines(sink.path)
    assert list(line)[:9] == [
        "schema_version",
        "timestamp",
        "event_time",
        "event_id",
        "trace_id",
        "traceparent",
        "event_type",
        "source",
        "status",
    ]
    assert line["schema_version"] == 1
    assert line["event_id"] == ev.id
    assert line["event_time"] == ev.time
    assert line["trace_id"] == ev.traceid == req.traceid
    assert line["traceparent"] == ev.traceparent
    assert line["event_type"] == CONTENT_GENERATED
    assert line["source"] == "generator"
    assert line["status"] == "success"
    assert line["timestamp"].endswith("Z") and line["timestamp"][:4].isdigit()
    assert line["request_id"] == req.id
    assert line["content_config_id"] == "welcome"
    assert line["generator_type"] == "jinja2"
    assert line["duration_ms"] == 12.5
    assert line["content_hash"] == "sha256:abc"
    assert line["content_length"] == 1100
    assert "content" not in line
    assert "hello world" not in sink.path.read_text()


async def test_error_line_flattens_error(sink):
    ev = generated(status="error", error=ErrorInfo(code="CONFIG_NOT_FOUND", message="no config 'x'"))
    await sink.write(ev)
    [line] = lines(sink.path)
    assert line["status"] == "error"
    assert line["error_code"] == "CONFIG_NOT_FOUND"
    assert line["error_message"] == "no config 'x'"
    assert "error" not in line


async def test_request_without_status_is_ok(sink):
    ev = requested("report", user="ann")
    await sink.write(ev)
    [line] = lines(sink.path)
    assert line["status"] == "ok"
    assert line["event_type"] == GENERATION_REQUESTED
    assert line["content_config_id"] == "report"
    # No config opts in by default: the context's hash and key names, never its values.
    assert "context" not in line and line["context_keys"] == ["user"]
    assert line["context_sha256"].startswith("sha256:") and "ann" not in sink.path.read_text()


async def test_content_without_hash_gets_hash_and_length(sink):
    ev = generated(content="héllo")
    await sink.write(ev)
    [line] = lines(sink.path)
    assert "content" not in line
    assert line["content_length"] == 5
    assert line["content_hash"].startswith("sha256:") and len(line["content_hash"]) == 7 + 64


class BatchCompleted(msgspec.Struct, kw_only=True):
    """An event type the sink has never heard of: mirrored all the same."""

    batch_id: str
    status: str
    items: int
    source: str  # clashes with an envelope key
    error: ErrorInfo | None = None


async def test_unknown_event_type_is_mirrored_generically(sink):
    data = BatchCompleted(
        batch_id="b-1",
        status="partial",
        items=3,
        source="from-data",
        error=ErrorInfo(code="SOME_FAILED", message="1 of 3 failed"),
    )
    ev = new_event("chora.batch_completed", data, source="assembler", subject="b-1")
    await sink.write(ev)
    [line] = lines(sink.path)
    assert line["event_type"] == "chora.batch_completed"
    assert line["status"] == "partial"
    assert line["batch_id"] == "b-1"
    assert line["items"] == 3
    assert line["source"] == "assembler"
    assert line["data_source"] == "from-data"
    assert line["subject"] == "b-1"
    assert line["error_code"] == "SOME_FAILED"


# --------------------------------------------------------------------------- one line per sequence


async def test_a_sequence_at_or_below_the_position_is_not_written_again(sink):
    a, b = requested(), requested()
    assert await sink.write(a, 5) is True
    assert await sink.write(b, 5) is False
    assert await sink.write(b, 3) is False
    assert await sink.write(b, 6) is True
    assert [(x["seq"], x["event_id"]) for x in lines(sink.path)] == [(5, a.id), (6, b.id)]
    assert sink.position() == sink.written_seq == 6
    assert sink.duplicates_skipped == 2


async def test_lines_taken_are_written_by_one_flush_in_one_write(sink, monkeypatch):
    evs = [requested() for _ in range(300)]
    writes = []
    real_write = os.write
    monkeypatch.setattr(sink_mod.os, "write", lambda fd, data: (writes.append(len(data)), real_write(fd, data))[1])
    for i, e in enumerate(evs, 1):
        assert sink.add(i, encode_seq_line(i, e, "2026-01-01T00:00:00.000000Z"))
    assert sink.pending == 300 and sink.path.read_bytes() == b""
    await sink.flush()
    assert len(writes) == 1 and sink.batches == 1 and sink.pending == 0
    assert [x["event_id"] for x in lines(sink.path)] == [e.id for e in evs]
    assert [x["seq"] for x in lines(sink.path)] == list(range(1, 301))


async def test_position_survives_restart(tmp_path):
    path = tmp_path / "events.jsonl"
    s1 = JsonlSink(path)
    await s1.start()
    assert s1.position() == 0 and s1.start_time() is None
    assert await s1.write(requested(), 7) and await s1.write(requested(), 9)
    await s1.close()

    s2 = JsonlSink(path, scan_chunk_bytes=64)  # lines are longer than a chunk
    await s2.start()
    assert s2.position() == 9
    assert await s2.write(requested(), 9) is False
    assert await s2.write(requested(), 10) is True
    await s2.close()
    assert [x["seq"] for x in lines(path)] == [7, 9, 10]


async def test_a_file_without_seq_resumes_from_the_time_of_its_last_line(tmp_path):
    """A file of the sink before lines had a seq (an upgrade): no position, but the time to
    read the stream from."""
    path = tmp_path / "events.jsonl"
    path.write_bytes(
        b'{"timestamp":"2026-01-01T00:00:00.000000Z","event_id":"a"}\n'
        b'{"timestamp":"2026-01-02T03:04:05.000000Z","event_id":"b"}\n'
    )
    s = JsonlSink(path)
    await s.start()
    assert s.position() == 0
    assert s.start_time() == 1767323045.0
    await s.write(requested(), 1)
    assert s.start_time() is None  # a position now
    await s.close()


# --------------------------------------------------------------------------- failures


async def test_failed_write_drops_the_batch_and_falls_back_to_the_written_position(sink, monkeypatch):
    assert await sink.write(requested(), 1)
    ev, other = generated(), generated()
    real_write = os.write
    calls = {"n": 0}

    def failing_write(fd, data):
        if fd == sink._fd and calls["n"] == 0:
            calls["n"] += 1
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(sink_mod.os, "write", failing_write)
    sink.add(2, encode_seq_line(2, ev))
    sink.add(3, encode_seq_line(3, other))
    assert sink.position() == 3
    with pytest.raises(SinkError):
        await sink.flush()
    # nothing of the batch in the file; the reader asks again from after 1
    assert [x["seq"] for x in lines(sink.path)] == [1]
    assert sink.position() == sink.written_seq == 1 and sink.pending == 0
    assert await sink.write(ev, 2) is True
    assert await sink.write(other, 3) is True
    assert [x["event_id"] for x in lines(sink.path)][1:] == [ev.id, other.id]


async def test_partial_write_is_truncated_back(sink, monkeypatch):
    first = requested()
    await sink.write(first)
    before = sink.path.read_bytes()
    real_write = os.write
    state = {"short": True}

    def short_then_fail(fd, data):
        if fd != sink._fd:
            return real_write(fd, data)
        if state["short"]:
            state["short"] = False
            return real_write(fd, bytes(data[:7]))  # a short write...
        raise OSError(errno.EIO, "I/O error")  # ...then an error

    monkeypatch.setattr(sink_mod.os, "write", short_then_fail)
    ev = requested()
    with pytest.raises(SinkError):
        await sink.write(ev)
    assert sink.path.read_bytes() == before
    monkeypatch.setattr(sink_mod.os, "write", real_write)
    assert await sink.write(ev) is True
    assert [x["event_id"] for x in lines(sink.path)] == [first.id, ev.id]


async def test_write_before_start_and_after_close_raises(tmp_path):
    s = JsonlSink(tmp_path / "e.jsonl")
    with pytest.raises(SinkError):
        await s.write(requested())
    await s.start()
    await s.close()
    with pytest.raises(SinkError):
        await s.write(requested())


async def test_close_writes_what_was_taken(tmp_path):
    s = JsonlSink(tmp_path / "e.jsonl")
    await s.start()
    for i in range(1, 11):
        s.add(i, encode_seq_line(i, requested()))
    await s.close()
    assert [x["seq"] for x in lines(tmp_path / "e.jsonl")] == list(range(1, 11))


async def test_fsync_mode_writes_lines(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(sink_mod.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    s = JsonlSink(tmp_path / "e.jsonl", fsync=True)
    await s.start()
    for i in range(1, 51):
        s.add(i, encode_seq_line(i, requested()))
    await s.flush()
    assert synced, "fsync=True must fsync"
    await s.close()
    assert len(lines(tmp_path / "e.jsonl")) == 50


# --------------------------------------------------------------------------- file


async def test_torn_last_line_is_repaired(tmp_path):
    path = tmp_path / "events.jsonl"
    a, b = requested(), requested()
    s1 = JsonlSink(path)
    await s1.start()
    await s1.write(a)
    await s1.write(b)
    await s1.close()
    good = path.read_bytes()
    with open(path, "ab") as f:
        f.write(b'{"timestamp":"2024-01-01T00:00:00Z","event_id":"torn-')

    s2 = JsonlSink(path, scan_chunk_bytes=64)
    await s2.start()
    assert path.read_bytes() == good
    assert s2.repaired_bytes > 0
    assert s2.position() == 2  # the torn line's message is read again
    c = requested()
    assert await s2.write(a, 2) is False
    assert await s2.write(c, 3) is True
    await s2.close()
    assert [x["event_id"] for x in lines(path)] == [a.id, b.id, c.id]


async def test_file_that_is_only_a_torn_line_becomes_empty(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_bytes(b'{"event_id":"x", "seq": 4, "timest')
    s = JsonlSink(path)
    await s.start()
    assert path.read_bytes() == b"" and s.position() == 0
    ev = requested()
    await s.write(ev)
    await s.close()
    assert [x["event_id"] for x in lines(path)] == [ev.id]


async def test_an_unreadable_last_line_yields_to_the_one_before(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"garbage\n" + json.dumps({"event_id": "a", "seq": 12}).encode() + b"\nnot json\n")
    s = JsonlSink(path)
    await s.start()
    assert s.position() == 12
    await s.close()


async def test_a_second_sink_on_the_same_file_refuses_to_start(sink, tmp_path):
    other = JsonlSink(sink.path)
    with pytest.raises(SinkError, match="another telemetry sink writes"):
        await other.start()
    await sink.close()
    await other.start()  # the first one gone: the file is free
    await other.close()


async def test_new_file_mode_is_0600(sink):
    await sink.write(requested())
    assert stat.S_IMODE(os.stat(sink.path).st_mode) == 0o600


async def test_existing_file_is_chmod_0600(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"")
    os.chmod(path, 0o644)
    s = JsonlSink(path)
    await s.start()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    await s.close()


async def test_configured_keys_are_redacted_at_any_depth_in_kept_context(tmp_path):
    import json as _json

    from contracts.catalogue import GENERATION_REQUESTED as _GR
    from contracts.envelope import new_event as _new
    from contracts.events import GenerationRequested as _Req
    from services.telemetry.sink import JsonlSink as _Sink

    # The config opts in to keeping context values: the redaction by key name still applies.
    sink = _Sink(
        tmp_path / "e.jsonl", redact_keys=frozenset({"api_key", "password"}), keep_context=lambda kind, cid: cid == "c"
    )
    await sink.start()
    ctx = {
        "name": "Ada",
        "API_KEY": "sk-live-123",
        "db": {"password": "hunter2", "host": "h"},
        "list": [{"password": "p2"}],
    }
    await sink.write(_new(_GR, _Req(content_config_id="c", context=ctx), source="t"))
    await sink.close()
    text = (tmp_path / "e.jsonl").read_text()
    for secret in ("sk-live-123", "hunter2", "p2"):
        assert secret not in text
    rec = _json.loads(text)
    assert rec["context"]["name"] == "Ada" and rec["context"]["db"]["host"] == "h"
    assert rec["context"]["API_KEY"] == "[REDACTED]" and rec["context"]["db"]["password"] == "[REDACTED]"
