"""The result cache across instances: bus/cache.py's claims and waits on a real nats-server,
and two ResultCache objects (two generator instances, each with its own connection)
sharing one bucket."""

from __future__ import annotations

import asyncio

import nats
import pytest
from prometheus_client import CollectorRegistry

from bus.cache import ResultCacheStore
from bus.content import ContentStore
from bus.topology import Topology, provision
from composition.configs import ConfigStore, GenerationError
from services.generator.cache import CacheMetrics, ResultCache, cache_key, generator_version
from services.generator.generators.jinja import Jinja2Generator
from tests.conftest import wait_for, write


@pytest.fixture
async def stores(nats_server, settings):
    """Two stores on the same bucket, each over its own connection (two instances)."""
    topo = Topology.from_settings(settings)
    conns = [await nats.connect(nats_server.url) for _ in range(2)]
    await provision(conns[0].jetstream(), topo, consumers=[])
    yield [
        ResultCacheStore(c.jetstream(), topo.cache_bucket, ContentStore(c.jetstream(), topo.content_bucket))
        for c in conns
    ]
    for c in conns:
        await c.close()


KEY = "greet." + "a" * 64


async def test_a_claim_is_exclusive_until_released(stores):
    one, two = stores
    assert await one.claim(KEY, 30) is True
    assert await two.claim(KEY, 30) is False
    assert await one.claim(KEY, 30) is False  # not reentrant either
    await one.release(KEY)
    assert await two.claim(KEY, 30) is True


async def test_the_claim_of_a_holder_that_died_expires_and_can_be_taken(stores):
    one, two = stores
    kv = await one.kv()
    watcher = await kv.watch(KEY + ".p")
    try:
        assert await one.claim(KEY, 1) is True  # and never released
        ops = []
        while not ops or ops[-1] is None:
            entry = await watcher.updates(timeout=10)
            if entry is not None:
                ops.append(entry.operation)
    finally:
        await watcher.stop()
    assert ops == [None, "PURGE"], f"the watch of the claim saw {ops}"
    assert await two.claim(KEY, 30) is True


async def test_wait_gets_the_entry_that_the_holder_stores(stores):
    one, two = stores
    assert await one.claim(KEY, 30)
    waiting = asyncio.create_task(two.wait(KEY, 30))
    await one.put(KEY, "Hello".encode(), 60)  # the claim stays: the entry is what b waits for
    assert await asyncio.wait_for(waiting, 10) == b"Hello"
    assert await two.get(KEY) == b"Hello"


async def test_wait_ends_without_a_value_when_the_claim_is_released_without_an_entry(stores):
    one, two = stores
    assert await one.claim(KEY, 30)
    waiting = asyncio.create_task(two.wait(KEY, 60))
    await one.release(KEY)
    # far sooner than its 60 s timeout: a watch sees the release
    assert await asyncio.wait_for(waiting, 10) is None


async def watchers(store: ResultCacheStore) -> int:
    """Consumers on the bucket's stream: a waiting instance watches with one."""
    return (await store.js.stream_info(f"KV_{store.bucket}")).state.consumer_count


def _cache(store: ResultCacheStore, wait_s: float) -> ResultCache:
    # claims for every generator (the default claims only for generators that are not deterministic)
    # (and caches every deterministic render, whatever it costs)
    return ResultCache(
        store, CacheMetrics(CollectorRegistry()), default_ttl_s=600, wait_s=wait_s, claims="always", min_render_s=0
    )


@pytest.fixture
def config(tmp_path):
    write(tmp_path / "greet.json", {"id": "greet", "generator": "jinja2", "template": "Hello {{ name }}"})
    return ConfigStore(tmp_path).get("greet")


async def test_two_instances_render_an_identical_request_once(stores, config):
    a, b = _cache(stores[0], 30), _cache(stores[1], 30)
    renders: list[str] = []
    gate = asyncio.Event()

    def renderer(who: str):
        async def render() -> str:
            renders.append(who)
            await gate.wait()
            return "Hello Ada"

        return render

    gen = Jinja2Generator()
    first = asyncio.create_task(a.fetch(config, gen, {"name": "Ada"}, renderer("a")))
    await wait_for(lambda: renders == ["a"], 10, "instance a rendering (holding the claim)")
    second = asyncio.create_task(b.fetch(config, gen, {"name": "Ada"}, renderer("b")))
    await wait_for(lambda: watchers(stores[1]), 10, "instance b watching for a's entry")
    gate.set()
    assert await asyncio.wait_for(first, 10) == ("Hello Ada", False)
    assert await asyncio.wait_for(second, 10) == ("Hello Ada", True)
    assert renders == ["a"]


async def test_when_the_holder_fails_the_other_instance_renders_without_waiting_out_its_timeout(stores, config):
    a, b = _cache(stores[0], 60), _cache(stores[1], 60)
    renders: list[str] = []
    gate = asyncio.Event()

    async def failing() -> str:
        renders.append("a")
        await gate.wait()
        raise GenerationError("MISSING_VARIABLE", "no name")

    async def working() -> str:
        renders.append("b")
        return "Hello Ada"

    gen = Jinja2Generator()
    first = asyncio.create_task(a.fetch(config, gen, {"name": "Ada"}, failing))
    await wait_for(lambda: renders == ["a"], 10, "instance a rendering (holding the claim)")
    second = asyncio.create_task(b.fetch(config, gen, {"name": "Ada"}, working))
    gate.set()
    with pytest.raises(GenerationError):
        await asyncio.wait_for(first, 10)
    # b renders itself once a's claim ends, long before its 60 s wait
    assert await asyncio.wait_for(second, 10) == ("Hello Ada", False)
    assert renders == ["a", "b"]
    assert await stores[0].keys("greet") == [key(config, gen)]  # b's result is stored, a's error is not
    assert await stores[0].get(key(config, gen)) == b"Hello Ada"


def key(config, gen) -> str:
    return cache_key(
        config.id,
        config.spec.generator,
        generator_version(gen),
        config.config_hash,
        config.template_hash,
        {"name": "Ada"},
    )
