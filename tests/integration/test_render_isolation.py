"""Renders that run to their limit do not stall the generator (real nats-server, the
generator service running with its render pool).

The slow requests use a legitimate config (two nested loops over a list from the
request's context), each stopped by the render deadline. The generator's
ack_wait is short (1 s) and the slow requests wait in the pool far longer than
that: without +WPI for work waiting on the pool, they would be redelivered.
"""

from __future__ import annotations

import asyncio

import pytest

from bus.connection import connect
from bus.publisher import Publisher
from bus.topology import Topology
from contracts.catalogue import CONTENT_GENERATED, GENERATION_REQUESTED
from contracts.envelope import decode, new_event
from contracts.events import GenerationRequested
from services.runtime import ready_file, run_service
from tests.conftest import wait_for, write

SLOW = 12  # requests that each run to the render deadline
ORDINARY = 5  # hello-world requests sent while they run
ITEMS = list(range(20_000))  # 4e8 iterations of the nested loops: far past the deadline


@pytest.fixture
def slow_settings(settings, tmp_path):
    cdir = tmp_path / "configs"
    write(
        cdir / "nested.json",
        {
            "id": "nested",
            "generator": "jinja2",
            "template": "{% for a in items %}{% for b in items %}{% if a == b %}.{% endif %}{% endfor %}{% endfor %}",
        },
    )
    write(cdir / "hello.json", {"id": "hello", "generator": "jinja2", "template": "Hello {{ name }}!"})
    return settings.model_copy(
        update={"configs_dir": cdir, "ack_wait_s": 1.0, "render_workers": 2, "render_timeout_s": 0.5}
    )


class Outcomes:
    """Every content_generated on the subject, in arrival order (a core subscriber: it would
    see a double publish that the stream's duplicate window drops)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str | None]] = []  # (request id, status, error code)

    async def on_msg(self, msg) -> None:
        ev = decode(msg.headers, msg.data)
        data = ev.data
        self.seen.append((data.request_id, data.status, data.error.code if data.error else None))

    def of(self, ids: set[str]) -> list[tuple[str, str, str | None]]:
        return [o for o in self.seen if o[0] in ids]


def _request(config_id: str, context: dict):
    return new_event(
        GENERATION_REQUESTED, GenerationRequested(content_config_id=config_id, context=context), source="urn:test"
    )


class Generator:
    """The generator service running in this process, a client, and the outcomes it saw."""

    def __init__(self, settings) -> None:
        self.settings = settings
        self.topo = Topology.from_settings(settings)
        self.outcomes = Outcomes()
        self.stop = asyncio.Event()
        self.task: asyncio.Task | None = None

    async def connect(self) -> None:
        self.nc = await connect(self.settings.nats, name="test-isolation")
        await self.nc.subscribe(self.topo.subject(CONTENT_GENERATED), cb=self.outcomes.on_msg)
        self.pub = Publisher(self.nc.jetstream(), self.settings.prefix)

    async def start(self) -> None:
        self.stop = asyncio.Event()
        task = self.task = asyncio.create_task(run_service("generator", self.settings, stop=self.stop))
        await wait_for(
            lambda: task.done() or ready_file(self.settings, "generator").exists(), 60, "the generator ready"
        )
        if task.done():
            task.result()

    async def send_slow(self, n: int) -> set[str]:
        """``n`` slow requests; returns once the first has its outcome (the rest run or wait)."""
        # distinct contexts: identical requests in flight would share one render (the result cache)
        slow = [_request("nested", {"items": ITEMS, "n": i}) for i in range(n)]
        ids = {e.id for e in slow}
        await self.pub.publish_many(slow)
        await wait_for(lambda: len(self.outcomes.of(ids)) >= 1, 30, "the first slow outcome")
        return ids


@pytest.fixture
async def generator(slow_settings):
    g = Generator(slow_settings)
    await g.connect()
    await g.start()
    yield g
    g.stop.set()
    if g.task is not None:
        await g.task
    await g.nc.close()


async def test_slow_renders_do_not_stall_ordinary_requests(generator):
    outcomes = generator.outcomes
    slow_ids = await generator.send_slow(SLOW)
    ordinary = [_request("hello", {"name": f"n{i}"}) for i in range(ORDINARY)]
    ordinary_ids = {e.id for e in ordinary}
    await generator.pub.publish_many(ordinary)
    await wait_for(lambda: len(outcomes.of(ordinary_ids)) == ORDINARY, 30, "the ordinary outcomes")
    slow_done_then = len(outcomes.of(slow_ids))
    await wait_for(lambda: len(outcomes.of(slow_ids)) >= SLOW, 60, "every slow outcome")
    await generator.nc.flush()

    # the ordinary requests were answered while most slow ones were still running or waiting
    assert slow_done_then <= SLOW // 2, f"{slow_done_then} of {SLOW} slow outcomes came before the ordinary ones"
    assert all(status == "success" for _, status, _ in outcomes.of(ordinary_ids))
    # exactly one outcome per request, each slow one a clear error
    seen_ids = [i for i, _, _ in outcomes.seen]
    assert sorted(seen_ids) == sorted(slow_ids | ordinary_ids), "a request with no outcome or with two"
    assert {code for _, _, code in outcomes.of(slow_ids)} == {"RENDER_TIMEOUT"}
    # no nak, no redelivery (a PubAck timeout or an expired ack_wait would show here)
    topo = generator.topo
    info = await generator.nc.jetstream().consumer_info(topo.events_stream, topo.consumers["generator"].durable)
    assert info.num_redelivered == 0 and info.num_ack_pending == 0, info


async def test_sigterm_drains_quickly_and_loses_nothing(generator):
    """Stopping with slow renders queued: the running ones meet their deadline, the queued ones
    are handed back (nak) and answered by the next generator, each exactly once."""
    outcomes = generator.outcomes
    slow_ids = await generator.send_slow(8)
    generator.stop.set()
    # a render deadline (0.5 s) and the consumer's drain, not 8 queued renders
    assert generator.task is not None
    try:
        await asyncio.wait_for(asyncio.shield(generator.task), 10)
    except asyncio.TimeoutError:
        pytest.fail("the generator did not drain within 10 s of SIGTERM")
    assert len(outcomes.of(slow_ids)) < len(slow_ids), "nothing was left to hand back"
    await generator.start()
    await wait_for(lambda: len(outcomes.of(slow_ids)) >= len(slow_ids), 60, "every slow outcome after the restart")
    await generator.nc.flush()
    ids = [i for i, _, _ in outcomes.seen]
    assert sorted(ids) == sorted(slow_ids), "a request with no outcome or with two"
