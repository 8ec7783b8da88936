"""code_generation end to end: the real generator service on a real nats-server, the local
fake Messages API server as the upstream. Retries go through JetStream redelivery after the
delay the API asked for; the last delivery gives one error outcome; a missing key gives one
CREDENTIALS_MISSING outcome at once; the rate limit is counted in KV by compare-and-set, so
limiters of two instances share one budget."""

from __future__ import annotations

import asyncio
import json
import urllib.request

import msgspec
import pytest

from bus.publisher import Publisher
from bus.state import StateStore
from bus.topology import Topology, provision
from contracts.catalogue import CONTENT_GENERATED, GENERATION_REQUESTED, subject_for
from contracts.envelope import decode, new_event
from contracts.events import GenerationRequested
from services.generator.generators.base import RetriableGenerationError
from services.generator.upstream import RateLimiter, UpstreamSettings
from services.runtime import ready_file, run_service
from tests.conftest import wait_for, write
from tests.fake_anthropic import FakeMessagesAPI
from tests.integration.test_code_generation_api import CONFIG


@pytest.fixture
def api(monkeypatch):
    fake = FakeMessagesAPI(slow_s=3.0, flaky_failures=2, retry_after="0.5").start()
    monkeypatch.setenv("ANTHROPIC_BASE_URL", fake.url)
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test-key")
    yield fake
    fake.stop()


@pytest.fixture
def cg_settings(settings, tmp_path):
    write(tmp_path / "configs" / "add-function.json", CONFIG)
    return settings.model_copy(update={"configs_dir": tmp_path / "configs", "max_deliver": 3})


class Generator:
    """The generator service running in this process, and every outcome it publishes."""

    def __init__(self, settings, nc):
        self.settings, self.nc = settings, nc
        self.outcomes: list = []
        self.stop = asyncio.Event()

    async def __aenter__(self) -> "Generator":
        async def on_msg(msg) -> None:
            self.outcomes.append(decode(msg.headers, msg.data))

        self.sub = await self.nc.subscribe(subject_for(CONTENT_GENERATED, self.settings.prefix), cb=on_msg)
        self.task = asyncio.create_task(run_service("generator", self.settings, stop=self.stop))
        await wait_for(
            lambda: self.task.done() or ready_file(self.settings, "generator").exists(), 30, "generator ready"
        )
        if self.task.done():
            self.task.result()
        self.metrics_url = json.loads(ready_file(self.settings, "generator").read_text())["metrics_url"]
        return self

    async def __aexit__(self, *exc) -> None:
        self.stop.set()
        await self.task
        await self.sub.unsubscribe()

    async def request(self, scenario: str) -> str:
        ev = new_event(
            GENERATION_REQUESTED,
            GenerationRequested(content_config_id="add-function", context={"scenario": scenario}),
            source="test",
        )
        await Publisher(self.nc.jetstream(), self.settings.prefix).publish(ev)
        return ev.id

    def outcome_of(self, request_id: str):
        found = [o.data for o in self.outcomes if o.data.request_id == request_id]
        return found[0] if found else None

    async def stored_outcomes(self) -> int:
        subject = subject_for(CONTENT_GENERATED, self.settings.prefix)
        info = await self.nc.jetstream().stream_info(
            Topology.from_settings(self.settings).events_stream, subjects_filter=subject
        )
        return sum((info.state.subjects or {}).values())  # every subject the filter matches


async def test_success_and_a_retry_through_redelivery_after_retry_after(cg_settings, nc, api):
    async with Generator(cg_settings, nc) as g:
        ok_id = await g.request("ok")
        flaky_id = await g.request("flaky")
        await wait_for(lambda: g.outcome_of(ok_id) and g.outcome_of(flaky_id), 30, "both outcomes")
        ok, flaky = g.outcome_of(ok_id), g.outcome_of(flaky_id)
        assert ok.status == "success" and ok.content == "def add(a, b):\n    return a + b\n"
        assert (ok.model, ok.stop_reason, ok.usage.input_tokens, ok.usage.output_tokens) == (
            "claude-test-1",
            "end_turn",
            42,
            17,
        )
        assert flaky.status == "success", flaky.error
        flaky_calls = [r["at"] for r in api.requests if "scenario=flaky" in r["body"]["messages"][0]["content"]]
        assert len(flaky_calls) == 3  # two 529s, then the answer: the SDK retried nothing itself
        # each redelivery came after the retry-after the API asked for (0.5 s), not the consumer's backoff
        assert all(b - a >= 0.45 for a, b in zip(flaky_calls, flaky_calls[1:])), flaky_calls
        assert await g.stored_outcomes() == 2  # one outcome each, never more

        def scrape() -> str:
            with urllib.request.urlopen(g.metrics_url, timeout=5) as r:
                return r.read().decode()

        async def counted() -> bool:
            text = await asyncio.to_thread(scrape)
            return (
                'chora_generator_tokens_total{kind="input",model="claude-test-1"} 84.0' in text
                and 'chora_generator_tokens_total{kind="output",model="claude-test-1"} 34.0' in text
                and 'chora_generator_upstream_calls_total{model="claude-test-1",outcome="UPSTREAM_OVERLOADED",upstream="anthropic"} 2.0'
                in text
            )

        try:
            await wait_for(counted, 10, "token and call counters on the generator's /metrics")
        except AssertionError:
            print([ln for ln in (await asyncio.to_thread(scrape)).splitlines() if "chora_generator" in ln])
            raise


async def test_on_the_last_delivery_a_rate_limit_is_one_error_outcome(cg_settings, nc, api):
    api.retry_after = "0.2"
    async with Generator(cg_settings, nc) as g:
        rid = await g.request("429")
        await wait_for(lambda: g.outcome_of(rid), 30, "the outcome of the rate-limited request")
        d = g.outcome_of(rid)
        assert d.status == "error" and d.error.code == "UPSTREAM_RATE_LIMITED"
        assert len(api.requests) == cg_settings.max_deliver  # one call per delivery
        assert await g.stored_outcomes() == 1
        dlq = await nc.jetstream().stream_info(Topology.from_settings(cg_settings).dlq_stream)
        assert dlq.state.messages == 0  # an outcome, not a dead letter


async def test_without_a_key_one_credentials_missing_outcome_at_once(cg_settings, nc, api, monkeypatch):
    monkeypatch.delenv("ANTHROPIC_API_KEY")
    async with Generator(cg_settings, nc) as g:
        rid = await g.request("ok")
        await wait_for(lambda: g.outcome_of(rid), 30, "the outcome of the request without a key")
        d = g.outcome_of(rid)
        assert d.status == "error" and d.error.code == "CREDENTIALS_MISSING" and "ANTHROPIC_API_KEY" in d.error.message
        info = await nc.jetstream().consumer_info(Topology.from_settings(cg_settings).events_stream, "generator")
        assert info.num_redelivered == 0 and info.num_ack_pending == 0
    assert api.requests == []


async def test_two_instances_share_one_rate_limit_through_kv(settings, nc):
    js = nc.jetstream()
    topo = Topology.from_settings(settings)
    await provision(js, topo, consumers=[])
    limits = UpstreamSettings(requests_per_minute=7, tokens_per_minute=1_000_000)
    one = RateLimiter(StateStore(js, topo.limits_bucket), limits)
    two = RateLimiter(StateStore(js, topo.limits_bucket), limits)

    async def take(limiter: RateLimiter) -> bool:
        try:
            await limiter.reserve("claude-test-1", 10)
            return True
        except RetriableGenerationError:  # the counter was too contended: not a grant
            return False
        except Exception as e:  # RateLimited
            assert "requests per minute" in str(e)
            return False

    granted = await asyncio.gather(*(take(one if i % 2 else two) for i in range(20)))
    window_keys = [k for k in await StateStore(js, topo.limits_bucket).items("ratelimit")]
    # exactly the budget: a compare-and-set loses only to another grant, and there are at most 7
    assert sum(granted) == 7
    (key,) = window_keys
    value, _ = await StateStore(js, topo.limits_bucket).get(key)
    assert msgspec.json.decode(value)["r"] == sum(granted)
