"""bus.mirror.StreamMirror against a real nats-server: reads the stream from after the
target's position, in order, each sequence once; a consumer that disappears is replaced and
the reading goes on where it stopped; a failed write is read again; the plain subscription
path (no direct delivery) reads the same."""

from __future__ import annotations

import asyncio

import pytest

from bus.mirror import StreamMirror
from bus.settings import BusSettings
from bus.topology import Topology, provision
from tests.conftest import wait_for


class Recorder:
    """A MirrorTarget in memory: what was accepted, what was flushed."""

    def __init__(self, start: int = 0, fail_flushes: int = 0):
        self.accepted: list[int] = []
        self.written: list[int] = list(range(1, start + 1))
        self.fail_flushes = fail_flushes
        self.subjects: set[str] = set()

    def position(self) -> int:
        return self.accepted[-1] if self.accepted else (self.written[-1] if self.written else 0)

    def start_time(self) -> float | None:
        return None

    def accept(self, seq, subject, headers, data, stored_ns) -> None:
        assert headers and headers.get("n") == data.decode(), "headers and body of one message"
        self.accepted.append(seq)
        self.subjects.add(subject)

    async def flush(self) -> None:
        batch, self.accepted = self.accepted, []
        if self.fail_flushes:
            self.fail_flushes -= 1
            raise OSError("disk full")
        self.written += batch


async def _publish(js, prefix: str, start: int, n: int) -> None:
    futs = [
        await js.publish_async(f"{prefix}.content_generated.standalone", str(i).encode(), headers={"n": str(i)})
        for i in range(start, start + n)
    ]
    await asyncio.gather(*futs)


@pytest.fixture
async def stream(nc, prefix):
    js = nc.jetstream(timeout=10)
    topo = Topology.from_settings(BusSettings(prefix=prefix))
    await provision(js, topo, consumers=[])
    await _publish(js, prefix, 1, 300)
    return js, topo.events_stream


async def _run(nc, js, stream_name, target, **kw):
    m = StreamMirror(nc, js, stream_name, target, heartbeat_s=0.2, retry_s=0.1, **kw)
    task = asyncio.create_task(m.run())
    return m, task


async def test_reads_after_the_position_and_replaces_a_consumer_that_disappears(nc, stream, prefix):
    js, name = stream
    target = Recorder(start=100)
    m, task = await _run(nc, js, name, target)
    try:
        await wait_for(lambda: len(target.written) == 300, 30, "sequences 101..300")
        consumers = [c.name async for c in _consumers(js, name)]
        assert len(consumers) == 1
        await js.delete_consumer(name, consumers[0])  # a server restart, a leader change...
        await _publish(js, prefix, 301, 200)
        await wait_for(lambda: len(target.written) == 500, 30, "sequences 301..500 after the replacement")
    finally:
        await m.stop()
        await task
    assert target.written == list(range(1, 501))
    assert m.stats.resets >= 2 and m.stats.received == 400
    assert target.subjects == {f"{prefix}.content_generated.standalone"}


async def test_a_failed_write_is_read_again_from_the_written_position(nc, stream):
    js, name = stream
    target = Recorder(fail_flushes=1)
    m, task = await _run(nc, js, name, target)
    try:
        await wait_for(lambda: len(target.written) == 300, 30, "every sequence written after the failure")
    finally:
        await m.stop()
        await task
    assert target.written == list(range(1, 301))
    assert m.stats.flush_errors == 1


async def test_the_plain_subscription_path_reads_the_same(nc, stream):
    js, name = stream
    target = Recorder()
    m, task = await _run(nc, js, name, target, direct=False)
    try:
        await wait_for(lambda: len(target.written) == 300, 30, "all 300 sequences")
        assert m.bound
    finally:
        await m.stop()
        await task
    assert target.written == list(range(1, 301))
    assert getattr(nc, "_chora_direct", None) is None  # nothing of nats-py was wrapped


async def _consumers(js, stream_name):
    for c in await js.consumers_info(stream_name):
        yield c
