"""The code_generation generator and the generator's handler against a real HTTP server on
127.0.0.1 that speaks the Messages API (tests/fake_anthropic.py): success, 401, 429 with
retry-after, 529, 500, a reply slower than the timeout, a malformed body. No live API."""

from __future__ import annotations

import pytest

from composition.configs import ConfigStore
from contracts.catalogue import GENERATION_REQUESTED
from contracts.envelope import new_event
from contracts.events import GenerationRequested
from contracts.handling import Delivery, Retry
from services.generator.generators import GeneratorRegistry
from services.generator.generators.code_generation import CodeGenerationGenerator
from services.generator.handlers import Deps, on_generation_requested
from services.generator.upstream import Upstream, UpstreamSettings
from tests.conftest import write
from tests.fake_anthropic import FakeMessagesAPI

CONFIG = {
    "id": "add-function",
    "generator": "code_generation",
    "output_format": "code",
    "template": "Write {{ name }}. scenario={{ scenario }}",
    "context": {"name": "add", "scenario": "ok"},
    "code_generation": {
        "model": "claude-test-1",
        "language": "python",
        "system_prompt": "You write Python.",
        "max_tokens": 300,
        "temperature": 0.2,
        "stop_sequences": ["###"],
        "timeout_s": 0.5,
    },
}


@pytest.fixture
def api(monkeypatch):
    fake = FakeMessagesAPI(slow_s=3.0).start()
    monkeypatch.setenv("ANTHROPIC_BASE_URL", fake.url)
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test-key")
    yield fake
    fake.stop()


@pytest.fixture
def gen() -> CodeGenerationGenerator:
    return CodeGenerationGenerator(Upstream("anthropic", UpstreamSettings(failure_threshold=3)))


@pytest.fixture
def deps(tmp_path, gen) -> Deps:
    write(tmp_path / "configs" / "add-function.json", CONFIG)
    return Deps(ConfigStore(tmp_path / "configs"), GeneratorRegistry({"code_generation": gen}, load_entry_points=False))


def request(scenario: str):
    return new_event(
        GENERATION_REQUESTED,
        GenerationRequested(content_config_id="add-function", context={"scenario": scenario}),
        source="test",
    )


async def handle(deps: Deps, scenario: str, attempt: int = 1, max_attempts: int = 5):
    delivery = Delivery(attempt=attempt, max_attempts=max_attempts, consumer="generator", stream_seq=1)
    (out,) = await on_generation_requested(request(scenario), delivery, deps)
    return out.data


async def test_success_gives_the_code_with_model_stop_reason_and_usage(api, deps, gen):
    d = await handle(deps, "ok")
    assert d.status == "success", d.error
    assert d.content == "def add(a, b):\n    return a + b\n"
    assert (d.model, d.stop_reason) == ("claude-test-1", "end_turn")
    assert (d.usage.input_tokens, d.usage.output_tokens) == (42, 17)
    (sent,) = api.requests
    body = sent["body"]
    assert body["model"] == "claude-test-1" and body["max_tokens"] == 300 and body["temperature"] == 0.2
    assert body["system"] == "You write Python." and body["stop_sequences"] == ["###"]
    assert body["messages"] == [{"role": "user", "content": "Write add. scenario=ok"}]
    assert "sk-test-key" in (sent["headers"].get("Authorization", "") + sent["headers"].get("x-api-key", ""))
    assert sent["headers"].get("x-stainless-retry-count") == "0"
    tokens = {
        (s.labels["model"], s.labels["kind"]): s.value
        for m in gen.upstream.metrics.tokens.collect()
        for s in m.samples
        if s.name.endswith("_total")
    }
    assert tokens == {("claude-test-1", "input"): 42.0, ("claude-test-1", "output"): 17.0}


@pytest.mark.parametrize(
    "scenario, code", [("401", "UPSTREAM_AUTH"), ("403", "UPSTREAM_AUTH"), ("400", "UPSTREAM_REJECTED")]
)
async def test_other_4xx_fail_at_once(api, deps, scenario, code):
    d = await handle(deps, scenario, attempt=1)
    assert d.status == "error" and d.error.code == code
    assert len(api.requests) == 1


async def test_429_is_retried_after_the_delay_the_api_asks_for(api, deps):
    with pytest.raises(Retry) as e:
        await handle(deps, "429")
    assert e.value.delay == 7.0 and "UPSTREAM_RATE_LIMITED" in str(e.value)
    assert len(api.requests) == 1  # the SDK did not retry on its own


@pytest.mark.parametrize("scenario, code", [("529", "UPSTREAM_OVERLOADED"), ("500", "UPSTREAM_UNAVAILABLE")])
async def test_overload_and_server_errors_are_retried(api, deps, scenario, code):
    with pytest.raises(Retry) as e:
        await handle(deps, scenario)
    assert code in str(e.value)
    assert len(api.requests) == 1


@pytest.mark.parametrize("scenario, code", [("429", "UPSTREAM_RATE_LIMITED"), ("529", "UPSTREAM_OVERLOADED")])
async def test_on_the_last_delivery_a_retriable_failure_is_one_error_outcome(api, deps, scenario, code):
    d = await handle(deps, scenario, attempt=5, max_attempts=5)
    assert d.status == "error" and d.error.code == code


async def test_a_reply_slower_than_the_timeout(api, deps):
    with pytest.raises(Retry) as e:
        await handle(deps, "slow")
    assert "UPSTREAM_TIMEOUT" in str(e.value)
    d = await handle(deps, "slow", attempt=5, max_attempts=5)
    assert d.error.code == "UPSTREAM_TIMEOUT" and d.duration_ms < 2500


async def test_a_malformed_body_fails_at_once(api, deps):
    d = await handle(deps, "malformed")
    assert d.status == "error" and d.error.code == "UPSTREAM_BAD_RESPONSE"


async def test_a_reply_without_code_is_no_code_block(api, deps):
    d = await handle(deps, "prose")
    assert d.status == "error" and d.error.code == "NO_CODE_BLOCK"


async def test_repeated_server_errors_open_the_circuit_and_no_call_is_made(api, deps, gen):
    for _ in range(3):
        with pytest.raises(Retry):
            await handle(deps, "500")
    assert gen.upstream.breaker.state == "open"
    with pytest.raises(Retry) as e:
        await handle(deps, "ok")
    assert "UPSTREAM_UNAVAILABLE" in str(e.value) and 25 < e.value.delay <= 30
    assert len(api.requests) == 3


async def test_without_a_key_no_call_is_made(api, deps, monkeypatch):
    monkeypatch.delenv("ANTHROPIC_API_KEY")
    d = await handle(deps, "ok")
    assert d.status == "error" and d.error.code == "CREDENTIALS_MISSING"
    assert "ANTHROPIC_API_KEY" in d.error.message and api.requests == []


async def test_a_hostile_prompt_context_is_a_template_error_not_a_call(api, deps):
    evil = new_event(
        GENERATION_REQUESTED,
        GenerationRequested(content_config_id="add-function", context={"name": "{{ ''.__class__ }}", "scenario": "ok"}),
        source="test",
    )
    (out,) = await on_generation_requested(evil, Delivery.first("generator", 5), deps)
    # the context is data, never template source: it goes into the prompt as text
    assert out.data.status == "success"
    assert api.requests[0]["body"]["messages"][0]["content"] == "Write {{ ''.__class__ }}. scenario=ok"
