"""The JSONL lifecycle: schema_version, rotation by size and by UTC day, gzip, retention,
0600 everywhere, the position (stream sequence) across rotation and restart, crash recovery."""

from __future__ import annotations

import datetime as dt
import errno
import gzip
import json
import os
import stat
import threading

import pytest

from contracts.catalogue import GENERATION_REQUESTED
from contracts.envelope import new_event
from contracts.events import GenerationRequested
from services.telemetry import rotation
from services.telemetry import sink as sink_mod
from services.telemetry.sink import JsonlSink
from tests.fakes import Clock

DAY1 = dt.datetime(2025, 3, 9, 23, 59, 0, tzinfo=dt.timezone.utc).timestamp()
DAY2 = DAY1 + 120  # 2025-03-10 00:01


def requested(i: int = 0, trace: str | None = None):
    return new_event(
        GENERATION_REQUESTED,
        GenerationRequested(content_config_id="welcome", context={"i": i}),
        source="t",
        trace_id=trace,
    )


def read_all(d, live="events.jsonl") -> list[dict]:
    """Every line of the rotated files (oldest first) then of the live file."""
    out = []
    for p in rotation.iter_files(d / live):
        with rotation.open_lines(p) as f:
            raw = f.read()
        assert raw == b"" or raw.endswith(b"\n")
        out += [json.loads(x) for x in raw.splitlines()]
    return out


def gz_files(d):
    return sorted(p.name for p in d.iterdir() if p.name.endswith(".gz"))


def line_size(i: int = 0) -> int:
    return len(sink_mod.encode_seq_line(1, requested(i), "2025-03-09T23:59:00.000000Z"))


async def test_schema_version_is_the_first_key(tmp_path):
    s = JsonlSink(tmp_path / "events.jsonl")
    await s.start()
    await s.write(requested())
    await s.close()
    rec = json.loads((tmp_path / "events.jsonl").read_bytes())
    assert list(rec)[:2] == ["schema_version", "timestamp"]
    assert rec["schema_version"] == 1


async def test_rotation_by_size_gzip_contents_and_order(tmp_path):
    per = line_size()
    s = JsonlSink(tmp_path / "events.jsonl", rotate_bytes=3 * per + 10, clock=Clock(DAY1))
    await s.start()
    evs = [requested(i) for i in range(10)]
    for e in evs:  # one line per batch: each file holds exactly 3 lines
        assert await s.write(e) is True
    await s.close()  # waits for the compression
    assert s.rotations == 3
    assert gz_files(tmp_path) == [f"events-2025-03-09-{n:03d}.jsonl.gz" for n in (1, 2, 3)]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith((".tmp",)) or p.name.endswith("-001.jsonl")]
    for n, gz in enumerate(gz_files(tmp_path)):
        raw = gzip.decompress((tmp_path / gz).read_bytes())
        assert [json.loads(x)["event_id"] for x in raw.splitlines()] == [e.id for e in evs[3 * n : 3 * n + 3]]
        assert len(raw) <= 3 * per + 10
    assert [json.loads(x)["event_id"] for x in (tmp_path / "events.jsonl").read_bytes().splitlines()] == [evs[9].id]
    assert [r["event_id"] for r in read_all(tmp_path)] == [e.id for e in evs]


async def test_rotation_by_utc_day(tmp_path):
    clock = Clock(DAY1)
    s = JsonlSink(tmp_path / "events.jsonl", clock=clock)
    await s.start()
    a, b, c = requested(1), requested(2), requested(3)
    await s.write(a)
    await s.write(b)
    assert s.rotations == 0
    clock.t = DAY2
    await s.write(c)
    await s.wait_compressed()
    assert s.rotations == 1
    assert gz_files(tmp_path) == ["events-2025-03-09-001.jsonl.gz"]  # named by the day of its first line
    old = [json.loads(x) for x in gzip.decompress((tmp_path / gz_files(tmp_path)[0]).read_bytes()).splitlines()]
    assert [r["event_id"] for r in old] == [a.id, b.id]
    assert all(r["timestamp"].startswith("2025-03-09T23:59") for r in old)
    [live] = [json.loads(x) for x in (tmp_path / "events.jsonl").read_bytes().splitlines()]
    assert live["event_id"] == c.id and live["timestamp"].startswith("2025-03-10T00:01")
    await s.close()


async def test_day_rotation_after_restart_uses_the_files_first_line(tmp_path):
    path = tmp_path / "events.jsonl"
    s1 = JsonlSink(path, clock=Clock(DAY1))
    await s1.start()
    a = requested(1)
    await s1.write(a)
    await s1.close()
    s2 = JsonlSink(path, clock=Clock(DAY2))  # restarted on the next day
    await s2.start()
    assert s2.position() == 1 and await s2.write(a, 1) is False
    b = requested(2)
    assert await s2.write(b) is True
    await s2.close()
    assert s2.rotations == 1
    assert gz_files(tmp_path) == ["events-2025-03-09-001.jsonl.gz"]
    assert [r["event_id"] for r in read_all(tmp_path)] == [a.id, b.id]


async def test_daily_rotation_can_be_turned_off(tmp_path):
    clock = Clock(DAY1)
    s = JsonlSink(tmp_path / "events.jsonl", clock=clock, rotate_daily=False, rotate_bytes=0)
    await s.start()
    await s.write(requested(1))
    clock.t = DAY2 + 5 * 86400
    await s.write(requested(2))
    await s.close()
    assert s.rotations == 0 and gz_files(tmp_path) == []
    assert len(read_all(tmp_path)) == 2


async def test_retention_deletes_the_oldest(tmp_path):
    per = line_size()
    s = JsonlSink(tmp_path / "events.jsonl", rotate_bytes=per + 10, retention_files=2, clock=Clock(DAY1))
    await s.start()
    evs = [requested(i) for i in range(6)]
    for e in evs:  # one line per file: 5 rotations
        await s.write(e)
    await s.close()
    assert s.rotations == 5
    assert gz_files(tmp_path) == ["events-2025-03-09-004.jsonl.gz", "events-2025-03-09-005.jsonl.gz"]
    assert [r["event_id"] for r in read_all(tmp_path)] == [e.id for e in evs[3:]]
    # sequence numbers keep counting after deletions: never a name twice
    s2 = JsonlSink(tmp_path / "events.jsonl", rotate_bytes=per + 10, retention_files=2, clock=Clock(DAY1))
    await s2.start()
    await s2.write(requested(99))
    await s2.close()
    assert gz_files(tmp_path) == ["events-2025-03-09-005.jsonl.gz", "events-2025-03-09-006.jsonl.gz"]


async def test_every_file_is_0600(tmp_path):
    old = os.umask(0o022)
    try:
        per = line_size()
        s = JsonlSink(tmp_path / "events.jsonl", rotate_bytes=per + 10, clock=Clock(DAY1))
        await s.start()
        for i in range(4):
            await s.write(requested(i))
        await s.close()
    finally:
        os.umask(old)
    files = list(tmp_path.iterdir())
    assert len(files) == 5  # 3 .gz + the live file + its lock file
    for p in files:
        assert stat.S_IMODE(os.stat(p).st_mode) == 0o600, p.name


async def test_position_across_rotation_and_restart(tmp_path):
    path = tmp_path / "events.jsonl"
    per = line_size()
    evs = [requested(i) for i in range(7)]
    s1 = JsonlSink(path, rotate_bytes=2 * per + 10, clock=Clock(DAY1))
    await s1.start()
    for e in evs:
        await s1.write(e)
    for i, e in enumerate(evs, 1):
        assert await s1.write(e, i) is False  # at or below the position
    await s1.close()
    assert s1.rotations == 3  # the live file holds one line; the rest is in .gz files

    s2 = JsonlSink(path, rotate_bytes=2 * per + 10, clock=Clock(DAY1))
    await s2.start()
    assert s2.position() == 7
    new = requested(100)
    assert await s2.write(new, 7) is False
    assert await s2.write(new, 8) is True
    await s2.close()
    recs = read_all(tmp_path)
    assert [r["event_id"] for r in recs] == [e.id for e in evs] + [new.id]
    assert [r["seq"] for r in recs] == list(range(1, 9))


async def test_restart_right_after_a_rotation_reads_the_rotated_file(tmp_path):
    """A crash between the rotation and the first line of the new file: the live file is empty,
    the position is in the newest rotated file (gzipped on start)."""
    path = tmp_path / "events.jsonl"
    a, b = requested(1), requested(2)
    s1 = JsonlSink(path, clock=Clock(DAY1))
    await s1.start()
    await s1.write(a, 41)
    await s1.write(b, 42)
    await s1.close()
    mtime = os.stat(path).st_mtime_ns
    os.rename(path, rotation.rotated_name(path, "2025-03-09", 1))  # as a rotation leaves it, before the gzip
    s2 = JsonlSink(path, clock=Clock(DAY1 + 10))
    await s2.start()  # recovers: compresses the plain rotated file
    assert gz_files(tmp_path) == ["events-2025-03-09-001.jsonl.gz"]
    assert os.stat(tmp_path / gz_files(tmp_path)[0]).st_mtime_ns == mtime  # the time of its last line
    assert not rotation.rotated_name(path, "2025-03-09", 1).exists()
    assert s2.position() == 42
    assert await s2.write(a, 41) is False and await s2.write(b, 42) is False
    await s2.close()
    assert [r["event_id"] for r in read_all(tmp_path)] == [a.id, b.id]


async def test_compression_runs_in_a_thread(tmp_path, monkeypatch):
    threads = []
    real = rotation.compress
    monkeypatch.setattr(
        rotation, "compress", lambda p, **kw: (threads.append(threading.current_thread()), real(p, **kw))[1]
    )
    s = JsonlSink(tmp_path / "events.jsonl", rotate_bytes=line_size() + 10, clock=Clock(DAY1))
    await s.start()
    await s.write(requested(1))
    await s.write(requested(2))
    await s.close()
    assert len(threads) == 1 and threads[0] is not threading.main_thread()


async def test_stale_tmp_and_leftover_plain_are_cleaned_on_start(tmp_path):
    path = tmp_path / "events.jsonl"
    s1 = JsonlSink(path, rotate_bytes=line_size() + 10, clock=Clock(DAY1))
    await s1.start()
    a, b = requested(1), requested(2)
    await s1.write(a)
    await s1.write(b)
    await s1.close()
    gz = tmp_path / "events-2025-03-09-001.jsonl.gz"
    # a crash after the .gz rename but before the plain file was removed, and a torn .tmp
    (tmp_path / "events-2025-03-09-001.jsonl").write_bytes(gzip.decompress(gz.read_bytes()))
    (tmp_path / "events-2025-03-09-002.jsonl.gz.tmp").write_bytes(b"\x1f\x8b torn")
    s2 = JsonlSink(path, clock=Clock(DAY1))
    await s2.start()
    await s2.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "events-2025-03-09-001.jsonl.gz",
        "events.jsonl",
        "events.jsonl.lock",
    ]
    assert [r["event_id"] for r in read_all(tmp_path)] == [a.id, b.id]


async def test_failed_rotation_keeps_writing(tmp_path, monkeypatch):
    s = JsonlSink(tmp_path / "events.jsonl", rotate_bytes=line_size() + 10, clock=Clock(DAY1))
    await s.start()
    a, b = requested(1), requested(2)
    await s.write(a)
    real = os.rename
    monkeypatch.setattr(os, "rename", lambda *x: (_ for _ in ()).throw(OSError(errno.EACCES, "denied")))
    assert await s.write(b) is True  # the rotation failed; the line went to the live file
    monkeypatch.setattr(os, "rename", real)
    await s.close()
    assert s.rotations == 0
    assert [r["event_id"] for r in read_all(tmp_path)] == [a.id, b.id]


async def test_failed_compression_keeps_the_plain_file(tmp_path, monkeypatch):
    def broken(p, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rotation, "compress", broken)
    s = JsonlSink(tmp_path / "events.jsonl", rotate_bytes=line_size() + 10, clock=Clock(DAY1))
    await s.start()
    a, b = requested(1), requested(2)
    await s.write(a)
    await s.write(b)
    await s.close()
    assert s.compress_errors == 1
    assert (tmp_path / "events-2025-03-09-001.jsonl").exists()
    assert [r["event_id"] for r in read_all(tmp_path)] == [a.id, b.id]  # still readable, in order


@pytest.mark.parametrize("fsync", [False, True])
async def test_batches_across_rotations_lose_nothing(tmp_path, fsync):
    s = JsonlSink(tmp_path / "events.jsonl", rotate_bytes=20 * line_size(), fsync=fsync, clock=Clock(DAY1))
    await s.start()
    evs = [requested(i) for i in range(400)]
    taken = []
    for w in range(10):  # batches of 40, each after a replay of the 10 before it (an overlap)
        for seq in list(range(40 * w - 9, 40 * w + 1)) + list(range(40 * w + 1, 40 * w + 41)):
            if seq >= 1:
                taken.append(s.add(seq, sink_mod.encode_seq_line(seq, evs[seq - 1])))
        await s.flush()
    await s.close()
    assert taken.count(True) == 400 and taken.count(False) == 90
    assert s.rotations >= 3
    recs = read_all(tmp_path)
    assert [r["seq"] for r in recs] == list(range(1, 401))
    assert [r["event_id"] for r in recs] == [e.id for e in evs]
