"""`chora events query` across rotated files, and `chora events tail` following a rotation."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from chora import cli
from chora.commands.events import Filter, follow, parse_when
from contracts.catalogue import CONTENT_GENERATED, GENERATION_REQUESTED
from contracts.envelope import new_event
from contracts.events import ContentGenerated, ErrorInfo, GenerationRequested
from services.telemetry import rotation
from services.telemetry.lines import encode_line
from services.telemetry.sink import JsonlSink
from tests.conftest import child_env, wait_for

ROOT = Path(__file__).resolve().parents[2]


def req(trace: str, i: int = 0):
    return new_event(
        GENERATION_REQUESTED,
        GenerationRequested(content_config_id="welcome", context={"i": i}),
        source="t",
        trace_id=trace,
    )


def gen(trace: str, status: str = "success"):
    cause = req(trace)
    err = ErrorInfo(code="TEMPLATE_ERROR", message="boom") if status == "error" else None
    data = ContentGenerated(request_id=cause.id, content_config_id="welcome", status=status, error=err)
    return new_event(CONTENT_GENERATED, data, source="generator", cause=cause)


class Clock:
    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t


def run(capsys, *argv: str) -> tuple[int, list[str], str]:
    code = cli.main(["events", *argv])
    out, err = capsys.readouterr()
    return code, [json.loads(x)["event_id"] for x in out.splitlines()], err


@pytest.fixture
def home(tmp_path, monkeypatch):
    for k in [k for k in __import__("os").environ if k.startswith("CHORA_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("CHORA_HOME", str(tmp_path / "var"))
    return tmp_path / "var"


@pytest.fixture
async def history(home):
    """Five events written 3 h, 2 h, 1 h, 10 min and 1 min ago, one file each (four rotated)."""
    now = time.time()
    evs = {
        "e1": (req("trace-a"), now - 3 * 3600),
        "e2": (gen("trace-a"), now - 2 * 3600),
        "e3": (gen("trace-b", "error"), now - 3600),
        "e4": (req("trace-b"), now - 600),
        "e5": (gen("trace-a"), now - 60),
    }
    clock = Clock(now)
    path = home / "telemetry" / "events.jsonl"
    size = max(len(encode_line(e, "2025-01-01T00:00:00.000000Z")) for e, _ in evs.values())
    sink = JsonlSink(path, clock=clock, rotate_bytes=size + 10)
    await sink.start()
    for ev, t in evs.values():
        clock.t = t
        assert await sink.write(ev)
    await sink.close()
    assert len(rotation.list_rotated(path)) == 4 and all(r.compressed for r in rotation.list_rotated(path))
    return {k: e.id for k, (e, _) in evs.items()} | {"dir": path.parent, "now": now}


def ids(h, *names):
    return [h[n] for n in names]


async def test_query_reads_rotated_and_live_files_in_order(history, capsys):
    code, got, _ = run(capsys, "query")  # default: the sink's directory under CHORA_HOME
    assert code == 0
    assert got == ids(history, "e1", "e2", "e3", "e4", "e5")
    code, got, _ = run(capsys, "query", "--file", str(history["dir"]))
    assert got == ids(history, "e1", "e2", "e3", "e4", "e5")


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--trace-id", "trace-a"], ["e1", "e2", "e5"]),
        (["--trace-id", "nobody"], []),
        (["--type", "content_generated"], ["e2", "e3", "e5"]),
        (["--type", "chora.generation.requested"], ["e1", "e4"]),
        (["--status", "error"], ["e3"]),
        (["--status", "ok"], ["e1", "e4"]),
        (["--since", "90m"], ["e3", "e4", "e5"]),
        (["--since", "15m"], ["e4", "e5"]),
        (["--until", "30m"], ["e1", "e2", "e3"]),
        (["--since", "150m", "--until", "5m"], ["e2", "e3", "e4"]),
        (["--trace-id", "trace-a", "--type", "content_generated", "--since", "3h"], ["e2", "e5"]),
    ],
)
async def test_query_filters(history, capsys, argv, expected):
    code, got, _ = run(capsys, "query", *argv)
    assert code == 0
    assert got == ids(history, *expected)


async def test_query_since_rfc3339(history, capsys):
    t = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(history["now"] - 1800))
    code, got, _ = run(capsys, "query", "--since", t)
    assert got == ids(history, "e4", "e5")
    code, got, _ = run(capsys, "query", "--until", t.replace("Z", "+00:00"))
    assert got == ids(history, "e1", "e2", "e3")


def test_parse_when():
    assert parse_when("15m", now=1000.0) == 100.0
    assert parse_when("2h", now=10_000.0) == 10_000.0 - 7200
    assert parse_when("1970-01-01T00:01:00Z") == 60.0
    assert parse_when("1970-01-01T01:01:00+01:00") == 60.0
    assert parse_when("1970-01-02") == 86400.0
    with pytest.raises(ValueError, match="neither RFC3339"):
        parse_when("yesterday")


async def test_query_bad_since_is_a_usage_error(history, capsys):
    code, got, err = run(capsys, "query", "--since", "last tuesday")
    assert code == 64 and got == []
    assert "neither RFC3339" in err


async def test_query_one_gz_file(history, capsys):
    first = rotation.list_rotated(history["dir"] / "events.jsonl")[0].path
    code, got, _ = run(capsys, "query", "--file", str(first))
    assert code == 0 and got == ids(history, "e1")


async def test_query_survives_a_corrupt_gz_and_bad_lines(history, capsys):
    rotated = rotation.list_rotated(history["dir"] / "events.jsonl")
    raw = rotated[1].path.read_bytes()
    rotated[1].path.write_bytes(raw[: len(raw) // 2])  # truncated .gz (e2's file)
    with open(history["dir"] / "events.jsonl", "ab") as f:
        f.write(b"not json\n")
    code, got, err = run(capsys, "query")
    assert code == 1  # reported, after every readable line was printed
    assert got == ids(history, "e1", "e3", "e4", "e5")
    assert rotated[1].path.name in err
    assert "1 unreadable line(s)" in err


async def test_query_missing_directory(home, capsys):
    code, got, err = run(capsys, "query", "--file", str(home / "nope"))
    assert code == 1 and "no events file" in err


async def test_tail_no_follow_last_n_with_type(history, capsys):
    # tail reads the live file only; put three more lines there
    sink = JsonlSink(history["dir"] / "events.jsonl", rotate_bytes=0)
    await sink.start()
    more = [gen("trace-c"), req("trace-c"), gen("trace-c", "error")]
    for e in more:
        await sink.write(e)
    await sink.close()
    code, got, _ = run(capsys, "tail", "--no-follow", "-n", "3", "--type", "content_generated")
    assert code == 0 and got == [history["e5"], more[0].id, more[2].id]
    code, got, _ = run(capsys, "tail", "--no-follow", "--trace-id", "trace-c")
    assert got == [e.id for e in more]


async def test_tail_no_follow_missing_file(home, capsys):
    code = cli.main(["events", "tail", "--no-follow"])
    assert code == 1 and "no events file" in capsys.readouterr().err


class Gate:
    """The tail's idle hook: it polls once per permit; ``waits`` counts how often it went idle."""

    def __init__(self):
        self.sem = threading.Semaphore(0)
        self.waits = 0
        self.stopped = False

    def __call__(self) -> bool:
        self.waits += 1
        if not self.sem.acquire(timeout=20):
            return False
        return not self.stopped

    def step(self):
        self.sem.release()

    def stop(self):
        self.stopped = True
        self.sem.release()


async def test_tail_finishes_the_old_file_then_follows_the_new_one(tmp_path):
    path = tmp_path / "events.jsonl"
    one = len(encode_line(req("trace-t"), "2025-01-01T00:00:00.000000Z"))
    sink = JsonlSink(path, rotate_bytes=2 * one + 20)  # two lines per file
    await sink.start()
    a1, a2, a3, a4 = (req("trace-t", i) for i in range(4))
    noise = req("trace-other")
    await sink.write(a1)

    got: list[str] = []
    gate = Gate()
    t = threading.Thread(
        target=follow,
        args=(path, Filter(trace_id="trace-t"), lambda batch: got.extend(json.loads(x)["event_id"] for x in batch)),
        kwargs={"idle": gate},
        daemon=True,
    )
    t.start()
    try:
        await wait_for(lambda: got == [a1.id] and gate.waits >= 1, 10, "tail printed the first line and went idle")
        # While the tail is idle: a line lands in the old file, then the file is rotated and compressed
        # (the plain file is gone), and two lines land in the new file.
        await sink.write(a2)
        await sink.write(noise)  # rotates: the old file holds a1, a2
        await sink.write(a3)
        await sink.wait_compressed()
        assert sink.rotations == 1 and not rotation.list_rotated(path)[0].path.name.endswith(".jsonl")
        waits = gate.waits
        gate.step()
        await wait_for(
            lambda: got == [a1.id, a2.id, a3.id] and gate.waits > waits,
            10,
            "the rest of the old file, then the new one",
        )
        # a second rotation while following
        await sink.write(a4)  # rotates (noise, a3 full) -> a4 in a third file
        assert sink.rotations == 2
        gate.step()
        await wait_for(lambda: got == [a1.id, a2.id, a3.id, a4.id], 10, "the line after the second rotation")
    finally:
        gate.stop()
        await sink.close()
        await asyncio.to_thread(t.join, 10)
    assert not t.is_alive()
    assert got.count(a2.id) == 1  # nothing printed twice


async def test_tail_cli_follows_a_rotation(tmp_path):
    """The real `chora events tail` process, driven by a sink in this test."""
    path = tmp_path / "events.jsonl"
    one = len(encode_line(req("trace-t"), "2025-01-01T00:00:00.000000Z"))
    sink = JsonlSink(path, rotate_bytes=2 * one + 20)
    await sink.start()
    evs = [req("trace-t", i) for i in range(5)]
    await sink.write(evs[0])
    proc = subprocess.Popen(
        [sys.executable, "-m", "chora", "events", "tail", "--file", str(path), "--trace-id", "trace-t"],
        cwd=ROOT,
        env=child_env(CHORA_HOME=str(tmp_path)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    got: list[str] = []

    def reader():
        for line in proc.stdout:
            got.append(json.loads(line)["event_id"])

    rt = threading.Thread(target=reader, daemon=True)
    rt.start()
    try:
        await wait_for(lambda: got == [evs[0].id], 20, "the existing line")
        for e in evs[1:]:
            await sink.write(e)
            await sink.write(req("trace-other"))
        await sink.wait_compressed()
        assert sink.rotations >= 3
        await wait_for(lambda: len(got) >= 5, 20, "every trace-t line across the rotations")
        assert got == [e.id for e in evs]
    finally:
        await sink.close()
        proc.send_signal(signal.SIGINT)
        try:
            rc = await asyncio.to_thread(proc.wait, 10)
        finally:
            if proc.poll() is None:
                proc.kill()
        await asyncio.to_thread(rt.join, 5)
    assert rc == 0, proc.stderr.read().decode()
