"""JsonlSink: line content, one line per event id, group commit, repair, file mode."""

from __future__ import annotations

import asyncio
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
from services.telemetry.ids import RecentIds
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


# --------------------------------------------------------------------------- one line per id


async def test_concurrent_duplicates_make_one_line(sink):
    ev = generated()
    others = [generated() for _ in range(20)]
    results = await asyncio.gather(*([sink.write(ev) for _ in range(50)] + [sink.write(o) for o in others]))
    assert results[:50].count(True) == 1
    assert all(results[50:])
    ids = [x["event_id"] for x in lines(sink.path)]
    assert len(ids) == 21 and len(set(ids)) == 21
    assert ids.count(ev.id) == 1
    assert sink.duplicates_skipped == 49
    assert sink.lines_written == 21


async def test_sequential_redelivery_is_skipped(sink):
    ev = generated()
    assert await sink.write(ev) is True
    assert await sink.write(ev) is False
    assert len(lines(sink.path)) == 1


async def test_group_commit_batches_concurrent_writers(sink):
    evs = [requested() for _ in range(300)]
    assert all(await asyncio.gather(*(sink.write(e) for e in evs)))
    # 300 writers that were all waiting at once share a handful of os.write calls
    assert sink.batches < 10
    assert [x["event_id"] for x in lines(sink.path)] == [e.id for e in evs]


async def test_dedupe_survives_restart(tmp_path):
    path = tmp_path / "events.jsonl"
    a, b, c = requested(), requested(), requested()
    s1 = JsonlSink(path)
    await s1.start()
    assert await s1.write(a) and await s1.write(b)
    await s1.close()

    s2 = JsonlSink(path)
    await s2.start()
    assert s2.remembered == 2
    assert await s2.write(a) is False
    assert await s2.write(b) is False
    assert await s2.write(c) is True
    await s2.close()
    assert [x["event_id"] for x in lines(path)] == [a.id, b.id, c.id]


async def test_restart_scan_across_small_chunks_and_cap(tmp_path):
    """The restart scan reads the file backwards in chunks and keeps the newest max_ids."""
    path = tmp_path / "events.jsonl"
    evs = [requested(f"cfg-{i}", pad="x" * (i * 7 % 50)) for i in range(40)]
    s1 = JsonlSink(path)
    await s1.start()
    for e in evs:
        await s1.write(e)
    await s1.close()

    s2 = JsonlSink(path, max_ids=25, scan_chunk_bytes=100)  # lines are longer than a chunk
    await s2.start()
    assert s2.remembered == 25
    for e in evs[15:]:
        assert await s2.write(e) is False, "a recent id was forgotten"
    assert await s2.write(evs[14]) is True, "only the newest 25 ids are remembered"
    await s2.close()

    s3 = JsonlSink(path, scan_chunk_bytes=64)
    await s3.start()
    assert s3.remembered == 40  # 41 lines, evs[14] twice (written again after it was forgotten)
    for e in evs:
        assert await s3.write(e) is False
    await s3.close()
    assert len(lines(path)) == 41


def test_recent_ids_is_bounded():
    r = RecentIds(3)
    for k in (b"a", b"b", b"c", b"a", b"d"):
        r.add(k)
    assert len(r) == 3
    assert b"a" not in r and b"b" in r and b"c" in r and b"d" in r


async def test_memory_cap_forgets_oldest(tmp_path):
    s = JsonlSink(tmp_path / "e.jsonl", max_ids=3)
    await s.start()
    evs = [requested() for _ in range(5)]
    for e in evs:
        await s.write(e)
    assert s.remembered == 3
    assert await s.write(evs[-1]) is False
    assert await s.write(evs[0]) is True
    await s.close()


# --------------------------------------------------------------------------- failures


async def test_failed_write_raises_forgets_ids_and_can_be_retried(sink, monkeypatch):
    ev, other = generated(), generated()
    real_write = os.write
    calls = {"n": 0}

    def failing_write(fd, data):
        if fd == sink._fd and calls["n"] == 0:
            calls["n"] += 1
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(sink_mod.os, "write", failing_write)
    results = await asyncio.gather(sink.write(ev), sink.write(ev), sink.write(other), return_exceptions=True)
    # all three shared the failed batch: nobody may ack
    assert all(isinstance(r, SinkError) for r in results), results
    assert sink.path.read_bytes() == b""
    # redelivery: written now, once
    assert await sink.write(ev) is True
    assert await sink.write(ev) is False
    assert [x["event_id"] for x in lines(sink.path)] == [ev.id]


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


async def test_close_writes_pending_lines(tmp_path):
    s = JsonlSink(tmp_path / "e.jsonl")
    await s.start()
    evs = [requested() for _ in range(10)]
    tasks = [asyncio.create_task(s.write(e)) for e in evs]
    await asyncio.sleep(0)  # let the writers enqueue (scheduling, not timing)
    await s.close()
    assert len(lines(tmp_path / "e.jsonl")) == 10  # written before close returned
    assert await asyncio.gather(*tasks) == [True] * 10


async def test_fsync_mode_writes_lines(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(sink_mod.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    s = JsonlSink(tmp_path / "e.jsonl", fsync=True)
    await s.start()
    evs = [requested() for _ in range(50)]
    assert all(await asyncio.gather(*(s.write(e) for e in evs)))
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
    c = requested()
    assert await s2.write(a) is False
    assert await s2.write(c) is True
    await s2.close()
    assert [x["event_id"] for x in lines(path)] == [a.id, b.id, c.id]


async def test_file_that_is_only_a_torn_line_becomes_empty(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_bytes(b'{"event_id":"x", "timest')
    s = JsonlSink(path)
    await s.start()
    assert path.read_bytes() == b""
    ev = requested()
    await s.write(ev)
    await s.close()
    assert [x["event_id"] for x in lines(path)] == [ev.id]


async def test_unreadable_line_in_the_middle_is_skipped(tmp_path):
    path = tmp_path / "events.jsonl"
    a = requested()
    path.write_bytes(b"garbage\n" + json.dumps({"event_id": a.id}).encode() + b"\n{}\n")
    s = JsonlSink(path)
    await s.start()
    assert await s.write(a) is False
    await s.close()


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
