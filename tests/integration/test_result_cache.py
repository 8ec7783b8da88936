"""The generator's result cache with the real generator service on a real nats-server.

Each test runs the generator service (services.runtime.run_service, as `chora up`
does, in this process) over its own configs directory, publishes generation
requests and reads the outcomes from the stream's subject. Renders are counted by
the service's own /metrics (``chora_generator_cache_requests_total{result="miss"}``:
one per render of a cacheable config).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import re
import urllib.request
from pathlib import Path
from typing import Any, AsyncIterator

import pytest

from bus.cache import ResultCacheStore
from bus.content import ContentStore
from bus.publisher import Publisher
from bus.topology import Topology
from chora.commands.cache import run_purge
from contracts.catalogue import CONTENT_GENERATED, GENERATION_REQUESTED, subject_for
from contracts.envelope import CloudEvent, decode, new_event
from contracts.events import GenerationRequested
from services.runtime import ready_file, run_service
from services.settings import Settings
from tests.conftest import wait_for, write


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()


class Generator:
    """One generator service instance, running until stopped."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.stop_event = asyncio.Event()
        self.task: asyncio.Task | None = None
        self.metrics_url = ""

    async def start(self) -> "Generator":
        self.task = asyncio.create_task(run_service("generator", self.settings, stop=self.stop_event))
        rf = ready_file(self.settings, "generator")
        await wait_for(lambda: self.task.done() or rf.exists(), 30, "the generator service ready")
        if self.task.done():
            self.task.result()
        self.metrics_url = json.loads(rf.read_text())["metrics_url"]
        return self

    async def stop(self) -> None:
        self.stop_event.set()
        if self.task is not None:
            await self.task

    async def count(self, result: str) -> float:
        text = await asyncio.to_thread(scrape, self.metrics_url)
        m = re.search(rf'^chora_generator_cache_requests_total{{result="{result}"}} (\S+)$', text, re.M)
        assert m, f"no cache series for result={result} in /metrics"
        return float(m.group(1))


@contextlib.asynccontextmanager
async def generator(settings: Settings) -> AsyncIterator[Generator]:
    g = await Generator(settings).start()
    try:
        yield g
    finally:
        await g.stop()


class Client:
    """Publishes generation requests and collects their outcomes by request id."""

    def __init__(self, nc, settings: Settings):
        self.nc, self.settings = nc, settings
        self.pub = Publisher(nc.jetstream(), settings.prefix)
        self.outcomes: dict[str, list[CloudEvent]] = {}

    async def start(self) -> "Client":
        async def on_msg(msg) -> None:
            ev = decode(msg.headers, msg.data)
            self.outcomes.setdefault(ev.data.request_id, []).append(ev)

        await self.nc.subscribe(subject_for(CONTENT_GENERATED, self.settings.prefix), cb=on_msg)
        await self.nc.flush()
        return self

    async def send(self, config_id: str, context: dict[str, Any] | None = None, **fields: Any) -> str:
        ev = new_event(
            GENERATION_REQUESTED,
            GenerationRequested(content_config_id=config_id, context=context or {}, **fields),
            source="test",
        )
        await self.pub.publish(ev)
        return ev.id

    async def outcome(self, request_id: str, timeout: float = 20) -> Any:
        await wait_for(lambda: request_id in self.outcomes, timeout, f"the outcome of request {request_id}")
        return self.outcomes[request_id][0].data

    async def generate(self, config_id: str, context: dict[str, Any] | None = None, **fields: Any) -> Any:
        return await self.outcome(await self.send(config_id, context, **fields))


@pytest.fixture
def configs(tmp_path) -> Path:
    d = tmp_path / "configs"
    write(d / "greet.json", {"id": "greet", "generator": "jinja2", "template_file": "greet.j2", "cache": "1h"})
    write(d / "greet.j2", "Hello {{ name }}, you are {{ tags | join(', ') }}!")
    write(d / "other.yaml", "id: other\ngenerator: template_fill\ntemplate: 'Other {{ name }}'\n")
    write(d / "brief.json", {"id": "brief", "generator": "jinja2", "template": "Brief {{ name }}", "cache": "1s"})
    write(d / "fresh.json", {"id": "fresh", "generator": "jinja2", "template": "Fresh {{ name }}", "cache": "off"})
    write(d / "big.json", {"id": "big", "generator": "jinja2", "template": "{{ 'x' * n }}"})
    # no cache: setting, so the cost decides: a render of a few microseconds, and one of milliseconds
    write(d / "cheap.json", {"id": "cheap", "generator": "jinja2", "template": "Hi {{ name }}"})
    write(
        d / "costly.json",
        {"id": "costly", "generator": "jinja2", "template": "{% for i in range(n) %}{{ i }},{% endfor %}{{ name }}"},
    )
    return d


@pytest.fixture
def cache_settings(settings, configs) -> Settings:
    # every deterministic render cached from the first request (the cost policy is the unit tests')
    return settings.model_copy(
        update={"configs_dir": configs, "content_threshold_bytes": 4096, "cache_min_render_ms": 0}
    )


@pytest.fixture
async def client(nc, cache_settings) -> Client:
    return await Client(nc, cache_settings).start()


def cache_store(nc, settings: Settings) -> ResultCacheStore:
    js = nc.jetstream()
    topo = Topology.from_settings(settings)
    return ResultCacheStore(js, topo.cache_bucket, ContentStore(js, topo.content_bucket))


async def cache_keys(nc, settings: Settings, config_id: str | None = None) -> list[str]:
    return await cache_store(nc, settings).keys(config_id)


CTX = {"name": "Ada", "tags": ["curious", "exact"]}


async def test_the_second_identical_request_is_a_hit_with_the_same_content(cache_settings, client):
    async with generator(cache_settings) as g:
        first = await client.generate("greet", CTX)
        # the same context, its keys in another order
        second = await client.generate("greet", {"tags": ["curious", "exact"], "name": "Ada"})
        assert (first.status, first.cached) == ("success", False)
        assert (second.status, second.cached) == ("success", True)
        assert second.content == first.content == "Hello Ada, you are curious, exact!"
        assert second.content_hash == first.content_hash
        assert (await g.count("miss"), await g.count("hit")) == (1, 1)
        # another context is another entry
        third = await client.generate("greet", {**CTX, "name": "Grace"})
        assert (third.cached, third.content) == (False, "Hello Grace, you are curious, exact!")


async def test_a_no_cache_request_renders_afresh(cache_settings, client):
    async with generator(cache_settings) as g:
        assert (await client.generate("greet", CTX)).cached is False
        bypassed = await client.generate("greet", CTX, no_cache=True)
        assert (bypassed.status, bypassed.cached) == ("success", False)
        assert (await g.count("bypass"), await g.count("miss"), await g.count("hit")) == (1, 1, 0)
        assert (await client.generate("greet", CTX)).cached is True


async def test_a_config_with_cache_off_is_rendered_every_time(cache_settings, client):
    async with generator(cache_settings) as g:
        outcomes = [await client.generate("fresh", CTX) for _ in range(2)]
        assert [o.cached for o in outcomes] == [False, False]
        assert (await g.count("miss"), await g.count("hit")) == (0, 0)  # the cache never saw them
        assert await cache_keys(client.nc, cache_settings, "fresh") == []


async def test_unset_the_cache_looks_up_only_configs_whose_renders_cost_enough(cache_settings, client, nc):
    """The default policy with its default threshold (CHORA_CACHE_MIN_RENDER_MS=1): the render
    pool reports what each render cost in its worker; a config whose renders are cheaper than a
    lookup is never looked up, a costly one is from its second request on."""
    policy = cache_settings.model_copy(update={"cache_min_render_ms": 1.0})
    async with generator(policy) as g:
        cheap = [await client.generate("cheap", {"name": "Ada"}) for _ in range(3)]
        assert [(o.status, o.cached) for o in cheap] == [("success", False)] * 3
        assert (await g.count("miss"), await g.count("hit")) == (0, 0)  # never looked up
        assert await cache_keys(client.nc, policy, "cheap") == []
        ctx = {"name": "Ada", "n": 20000}  # tens of thousands of loop turns: milliseconds
        costly = [await client.generate("costly", ctx) for _ in range(3)]
        assert [(o.status, o.cached) for o in costly] == [("success", False), ("success", False), ("success", True)]
        # the first render measured the cost (not looked up), the second missed and stored, the third hit
        assert (await g.count("miss"), await g.count("hit")) == (1, 1)
        assert len(await cache_keys(client.nc, policy, "costly")) == 1


async def test_an_entry_disappears_when_its_ttl_runs_out(cache_settings, client, nc):
    async with generator(cache_settings):  # it provisions the bucket
        kv = await nc.jetstream().key_value(Topology.from_settings(cache_settings).cache_bucket)
        watcher = await kv.watch("brief.*.v")  # entries only; before the request: the put and its expiry are both seen
        try:
            first = await client.generate("brief", CTX)  # cache: 1s
            assert first.cached is False
            seen: list[tuple[str, str | None]] = []
            while not seen or seen[-1][1] is None:  # until the entry's end
                entry = await watcher.updates(timeout=10)
                if entry is not None:
                    seen.append((entry.key, entry.operation))
        finally:
            await watcher.stop()
        [(key, stored), (expired_key, how)] = seen
        assert (stored, expired_key, how) == (None, key, "PURGE"), f"the watch of brief.*.v saw {seen}"
        assert await cache_keys(nc, cache_settings, "brief") == []
        again = await client.generate("brief", CTX)
        assert (again.cached, again.content) == (False, first.content)


async def test_concurrent_identical_requests_are_rendered_once(cache_settings, client):
    async with generator(cache_settings) as g:
        ids = await asyncio.gather(*(client.send("greet", CTX) for _ in range(40)))
        outcomes = [await client.outcome(i) for i in ids]
        assert {o.content for o in outcomes} == {"Hello Ada, you are curious, exact!"}
        assert sorted(o.cached for o in outcomes) == [False] + [True] * 39
        assert (await g.count("miss"), await g.count("hit")) == (1, 39)


async def test_purge_of_one_config_leaves_the_others(cache_settings, client, nc):
    async with generator(cache_settings) as g:
        for name in ("Ada", "Grace"):
            assert (await client.generate("greet", {**CTX, "name": name})).cached is False
        assert (await client.generate("other", CTX)).cached is False

        async def stored() -> bool:  # entries are stored just after their outcome is published
            return (
                len(await cache_keys(nc, cache_settings, "greet")),
                len(await cache_keys(nc, cache_settings, "other")),
            ) == (2, 1)

        await wait_for(stored, 10, "the entries of greet (2) and other (1) stored")

        out = io.StringIO()
        assert await run_purge(nc, cache_settings, "greet", out=out) == 0
        assert out.getvalue().startswith("purged 2 cache entries of greet from ")
        assert await cache_keys(nc, cache_settings, "greet") == []
        assert len(await cache_keys(nc, cache_settings, "other")) == 1

        assert (await client.generate("greet", CTX)).cached is False
        assert (await client.generate("other", CTX)).cached is True
        assert await g.count("miss") == 4

        out = io.StringIO()
        assert await run_purge(nc, cache_settings, None, out=out) == 0  # everything
        assert out.getvalue().startswith("purged 2 cache entries from ")
        assert await cache_keys(nc, cache_settings) == []


async def test_an_edited_template_is_a_miss_with_the_new_content(cache_settings, client, configs):
    async with generator(cache_settings):
        before = await client.generate("greet", CTX)
        assert (await client.generate("greet", CTX)).cached is True
        write(configs / "greet.j2", "Goodbye {{ name }}!")
        after = await client.generate("greet", CTX)
        assert (after.cached, after.content) == (False, "Goodbye Ada!")
        assert before.content != after.content
        # the config file itself: a change of any field is a new key too
        write(
            configs / "greet.json",
            {"id": "greet", "generator": "jinja2", "template_file": "greet.j2", "cache": "1h", "description": "edited"},
        )
        assert (await client.generate("greet", CTX)).cached is False


async def test_errors_are_never_cached(cache_settings, client, nc):
    async with generator(cache_settings) as g:
        for _ in range(2):
            failed = await client.generate("greet", {"name": "Ada"})  # no tags
            assert (failed.status, failed.error.code, failed.cached) == ("error", "MISSING_VARIABLE", None)
        assert await cache_keys(nc, cache_settings, "greet") == []
        assert (await g.count("miss"), await g.count("hit")) == (0, 0)


async def test_two_generator_instances_share_the_cache(cache_settings, client):
    async with generator(cache_settings) as a:
        assert (await client.generate("greet", CTX)).cached is False
        assert await a.count("miss") == 1
    # a second instance, with nothing in memory: the entry is in the shared bucket
    async with generator(cache_settings) as b:
        hit = await client.generate("greet", CTX)
        assert (hit.cached, hit.content) == (True, "Hello Ada, you are curious, exact!")
        assert (await b.count("hit"), await b.count("miss")) == (1, 0)


async def test_a_large_result_is_cached_by_reference_in_the_object_store(cache_settings, client, nc):
    async with generator(cache_settings):
        first = await client.generate("big", {"n": 20_000})
        second = await client.generate("big", {"n": 20_000})
        assert (first.cached, second.cached) == (False, True)
        assert second.content_hash == first.content_hash and second.content_length == 20_000
        [key] = await cache_keys(nc, cache_settings, "big")
        kv = await nc.jetstream().key_value(Topology.from_settings(cache_settings).cache_bucket)
        body = (await kv.get(key + ".v")).value
        assert body.startswith(b"@obj://") and len(body) < 200
