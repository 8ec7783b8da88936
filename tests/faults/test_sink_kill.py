"""The telemetry sink as a real process against a real nats-server, from a pre-filled stream:
kill -9 in the middle of the stream and a restart write every stream sequence exactly once
(a torn last line is cut off and its message written again), and a second instance, with its
own file, mirrors the whole stream too."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nats
import pytest

from bus.server import EmbeddedServer
from bus.settings import BusSettings
from bus.topology import Topology, provision
from contracts.catalogue import CONTENT_GENERATED
from contracts.envelope import encode_binary, new_event
from contracts.events import ContentGenerated
from tests.conftest import child_env

N = 6000
PREFIX = "sinkkill"


async def _prefill(url: str) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream(timeout=10)
    await provision(js, Topology.from_settings(BusSettings(prefix=PREFIX)), consumers=[])
    futs = []
    for i in range(N):
        ev = new_event(
            CONTENT_GENERATED,
            ContentGenerated(request_id=f"r-{i}", content_config_id="welcome", status="success", content="x" * 200),
            source="test",
        )
        headers, body = encode_binary(ev)
        futs.append(await js.publish_async(f"{PREFIX}.content_generated.standalone", body, headers=headers))
        if len(futs) >= 1000:
            await asyncio.gather(*futs)
            futs = []
    await asyncio.gather(*futs)
    await nc.close()


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    """A nats-server whose events stream holds N content_generated events."""
    server = EmbeddedServer(tmp_path_factory.mktemp("sinkkill") / "store").start()
    assert server.url is not None
    asyncio.run(_prefill(server.url))
    yield server
    server.stop()


def _spawn(server: EmbeddedServer, home: Path) -> subprocess.Popen:
    home.mkdir(parents=True, exist_ok=True)
    env = child_env(NATS_URL=server.url, CHORA_HOME=str(home), CHORA_PREFIX=PREFIX, CHORA_METRICS_PORT="0")
    with open(home / "telemetry.log", "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "chora", "service", "run", "telemetry"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def _wait_lines(path: Path, at_least: int, proc: subprocess.Popen, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while _lines(path) < at_least:
        assert proc.poll() is None, f"telemetry exited with {proc.returncode} waiting for {what}"
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what} ({_lines(path)} lines)"
        time.sleep(0.01)  # polling a file the child writes


def _seqs(path: Path) -> list[int]:
    return [json.loads(x)["seq"] for x in path.read_bytes().splitlines()]


def test_kill_9_mid_stream_then_restart_writes_every_sequence_once(stream, tmp_path):
    home = tmp_path / "a"
    jsonl = home / "telemetry" / "events.jsonl"
    proc = _spawn(stream, home)
    try:
        _wait_lines(jsonl, 1, proc, "the first lines")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        written = _lines(jsonl)
        assert 0 < written < N, f"the kill came after {written} of {N} lines: not mid-stream"
        # what a kill in the middle of a write leaves: part of a line, no newline
        with open(jsonl, "ab") as f:
            f.write(b'{"schema_version":1,"timestamp":"2026-01-01T00:00:00.000000Z","event_id":"torn')
        proc = _spawn(stream, home)
        _wait_lines(jsonl, N, proc, f"all {N} lines after the restart")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, (home / "telemetry.log").read_text()[-2000:]
    raw = jsonl.read_bytes()
    assert b'"event_id":"torn' not in raw and raw.endswith(b"\n")
    assert _seqs(jsonl) == list(range(1, N + 1))
    assert "cut a torn last line" in (home / "telemetry.log").read_text()


def test_two_instances_each_mirror_the_whole_stream(stream, tmp_path):
    procs = {name: _spawn(stream, tmp_path / name) for name in ("one", "two")}
    try:
        for name, proc in procs.items():
            _wait_lines(tmp_path / name / "telemetry" / "events.jsonl", N, proc, f"all {N} lines in {name}'s file")
    finally:
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
        codes = [proc.wait(60) for proc in procs.values()]
    assert codes == [0, 0]
    for name in procs:
        assert _seqs(tmp_path / name / "telemetry" / "events.jsonl") == list(range(1, N + 1))
