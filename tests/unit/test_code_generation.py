"""code_generation without a network: code extraction, the mapping of upstream failures
to stable codes, retry-after, the shared rate limit (on an injected clock), call slots,
the config block and readiness."""

from __future__ import annotations

import asyncio

import anthropic
import httpx2
import pytest
from pydantic import ValidationError

from composition.codegen import CodeGenerationSpec
from composition.configs import GenerationError
from services.generator.generators.base import RetriableGenerationError, ensure_ready, readiness_of
from services.generator.generators.code_generation import (
    API_KEY_ENV,
    CodeGenerationGenerator,
    classify,
    code_blocks,
    extract_code,
    retry_after,
)
from services.generator.upstream import MemoryCounters, RateLimiter, Upstream, UpstreamSettings

# --------------------------------------------------------------------------- extraction


def test_every_block_of_the_language_is_joined_and_others_are_left_out():
    text = (
        "Intro\n```python\ndef a():\n    return 1\n```\ntext\n```js\nlet x = 1\n```\n"
        "```py\ndef b():\n    return 2\n```\n"
    )
    assert extract_code(text, "python") == "def a():\n    return 1\n\ndef b():\n    return 2\n"
    assert extract_code(text, "JavaScript") == "let x = 1\n"


def test_tilde_fences_longer_fences_and_inner_backticks():
    text = "~~~rust\nfn main() {}\n~~~\n````python\nprint('```')\n```\nstill code\n````\n"
    assert code_blocks(text) == [("rust", "fn main() {}"), ("python", "print('```')\n```\nstill code")]


def test_no_block_of_the_language_is_a_clear_error_that_names_what_was_found():
    with pytest.raises(GenerationError) as e:
        extract_code("```sh\nls\n```\nand ```inline``` text", "python")
    assert e.value.code == "NO_CODE_BLOCK" and "sh" in e.value.message


def test_an_unclosed_block_cut_at_max_tokens_says_so():
    with pytest.raises(GenerationError) as e:
        extract_code("```python\ndef a(", "python", "max_tokens")
    assert e.value.code == "NO_CODE_BLOCK" and "max_tokens" in e.value.message


# --------------------------------------------------------------------------- failures -> codes


def status_error(status: int, headers: dict[str, str] | None = None) -> anthropic.APIStatusError:
    req = httpx2.Request("POST", "http://127.0.0.1/v1/messages")
    resp = httpx2.Response(status, headers=headers or {}, request=req, json={"error": {"message": "m"}})
    return anthropic.AsyncAnthropic(api_key="k", base_url="http://127.0.0.1")._make_status_error(
        "error", body={"error": {"message": "m"}}, response=resp
    )


@pytest.mark.parametrize(
    "status, code, retriable, down",
    [
        (401, "UPSTREAM_AUTH", False, False),
        (403, "UPSTREAM_AUTH", False, False),
        (400, "UPSTREAM_REJECTED", False, False),
        (404, "UPSTREAM_REJECTED", False, False),
        (413, "UPSTREAM_REJECTED", False, False),
        (429, "UPSTREAM_RATE_LIMITED", True, False),
        (529, "UPSTREAM_OVERLOADED", True, True),
        (500, "UPSTREAM_UNAVAILABLE", True, True),
        (503, "UPSTREAM_UNAVAILABLE", True, True),
    ],
)
def test_status_codes_map_to_stable_codes(status, code, retriable, down):
    f = classify(status_error(status))
    assert (f.code, f.retriable, f.upstream_down) == (code, retriable, down)


def test_timeouts_connection_errors_and_unreadable_bodies():
    req = httpx2.Request("POST", "http://127.0.0.1/v1/messages")
    assert classify(anthropic.APITimeoutError(req)).code == "UPSTREAM_TIMEOUT"
    assert classify(anthropic.APIConnectionError(request=req)).code == "UPSTREAM_UNAVAILABLE"
    f = classify(ValueError("Expecting value: line 1"))
    assert (f.code, f.retriable) == ("UPSTREAM_BAD_RESPONSE", False)


def test_the_delay_the_api_asks_for_is_kept():
    assert classify(status_error(429, {"retry-after": "7"})).delay == 7.0
    assert classify(status_error(529, {"retry-after-ms": "1500"})).delay == 1.5
    assert retry_after({"retry-after": "Thu, 01 Jan 2026 00:00:10 GMT"}, now=1767225600.0) == 10.0
    assert retry_after({"retry-after": "soon"}) is None and retry_after({}) is None


# --------------------------------------------------------------------------- the rate limit


class Clock:
    def __init__(self, t: float = 600.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


async def test_requests_per_minute_are_shared_by_limiters_on_the_same_counters():
    counters, clock = MemoryCounters(), Clock(600.0)
    s = UpstreamSettings(requests_per_minute=3, tokens_per_minute=10_000)
    one, two = RateLimiter(counters, s, clock), RateLimiter(counters, s, clock)
    await one.reserve("m", 10)
    await two.reserve("m", 10)
    await one.reserve("m", 10)
    clock.t = 615.0
    with pytest.raises(Exception) as e:
        await two.reserve("m", 10)
    assert e.value.retry_in == pytest.approx(45.0)
    await two.reserve("other-model", 10)  # per model
    clock.t = 660.0  # the next window
    await two.reserve("m", 10)


async def test_tokens_are_reserved_then_corrected_to_the_usage():
    counters, clock = MemoryCounters(), Clock(0.0)
    limiter = RateLimiter(counters, UpstreamSettings(requests_per_minute=100, tokens_per_minute=1000), clock)
    r = await limiter.reserve("m", 900)
    with pytest.raises(Exception):
        await limiter.reserve("m", 200)
    await limiter.settle(r, 100)  # it used far less than it reserved
    await limiter.reserve("m", 200)
    ((value, _),) = [await counters.get(r.key)]
    assert value == b'{"r": 2, "t": 300}'


async def test_a_request_larger_than_a_window_may_use_an_empty_one():
    limiter = RateLimiter(MemoryCounters(), UpstreamSettings(tokens_per_minute=100), Clock())
    await limiter.reserve("m", 5000)


async def test_over_the_limit_is_a_retry_at_the_next_window():
    up = Upstream("anthropic", UpstreamSettings(requests_per_minute=1), clock=Clock(630.0))
    await up.reserve("m", 1)
    with pytest.raises(RetriableGenerationError) as e:
        await up.reserve("m", 1)
    assert e.value.code == "UPSTREAM_RATE_LIMITED" and e.value.delay == pytest.approx(30.0)


async def test_too_many_waiting_for_a_slot_is_a_retry_not_a_wait():
    up = Upstream("anthropic", UpstreamSettings(max_concurrency=1, max_waiting=1, busy_retry_s=2.5))
    release = asyncio.Event()

    async def hold() -> None:
        async with up.slot():
            await release.wait()

    holder = asyncio.create_task(hold())
    waiter_in = asyncio.Event()

    async def wait_turn() -> None:
        waiter_in.set()
        async with up.slot():
            pass

    await asyncio.sleep(0)
    waiter = asyncio.create_task(wait_turn())
    await waiter_in.wait()
    await asyncio.sleep(0)
    with pytest.raises(RetriableGenerationError) as e:
        async with up.slot():
            pass
    assert e.value.code == "UPSTREAM_BUSY" and e.value.delay == 2.5
    release.set()
    await asyncio.wait_for(asyncio.gather(holder, waiter), 5)


def test_an_open_circuit_is_a_retry_after_the_time_left():
    up = Upstream("anthropic", UpstreamSettings(failure_threshold=1, reset_timeout_s=30))
    up.breaker.failure(up.permit())
    with pytest.raises(RetriableGenerationError) as e:
        up.permit()
    assert e.value.code == "UPSTREAM_UNAVAILABLE" and 0 < e.value.delay <= 30


# --------------------------------------------------------------------------- config and readiness


def test_the_config_block_is_validated():
    spec = CodeGenerationSpec(model="claude-sonnet-4-5", language="python", stop_sequences=["###"])
    assert spec.max_tokens == 4096 and spec.temperature is None
    for bad in (
        {"model": "m", "language": "python", "temperature": 1.5},
        {"model": "m", "language": "python", "max_tokens": 0},
        {"model": "m", "language": "python", "stop_sequences": [""]},
        {"model": "m", "language": "python", "stop_sequences": ["x"] * 17},
        {"model": "m", "language": "python", "temprature": 0.1},
        {"model": "bad model", "language": "python"},
        {"language": "python"},
    ):
        with pytest.raises(ValidationError):
            CodeGenerationSpec(**bad)


def test_without_a_key_it_is_not_ready_and_says_which_variable(monkeypatch):
    gen = CodeGenerationGenerator()
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    r = readiness_of(gen)
    assert not r.ready and r.missing == (f"environment variable {API_KEY_ENV}",)
    with pytest.raises(GenerationError) as e:
        ensure_ready(gen, "code_generation")
    assert e.value.code == "CREDENTIALS_MISSING" and API_KEY_ENV in e.value.message
    monkeypatch.setenv(API_KEY_ENV, "sk-test")
    assert readiness_of(gen).ready
    req = gen.requirements()
    assert req.credentials == (API_KEY_ENV,) and req.concurrent and req.endpoints


def test_generators_that_need_nothing_are_ready():
    from services.generator.generators import GeneratorRegistry

    reg = GeneratorRegistry()
    for name in ("jinja2", "template_fill", "demonstration"):
        assert readiness_of(reg.get_generator(name)).ready


class BrokenCounters(MemoryCounters):
    async def get(self, key: str):
        raise ConnectionError("no KV bucket")


async def test_counters_that_cannot_be_used_are_a_retry_not_a_call():
    limiter = RateLimiter(BrokenCounters(), UpstreamSettings(), Clock())
    with pytest.raises(RetriableGenerationError) as e:
        await limiter.reserve("m", 10)
    assert e.value.code == "RATE_LIMIT_UNAVAILABLE" and "no KV bucket" in e.value.message
