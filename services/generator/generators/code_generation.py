"""The ``code_generation`` generator: a prompt to the Anthropic Messages API, code back.

The config's template is the prompt, rendered in the jinja2 sandbox over the
context (:class:`~services.generator.generators.jinja.Jinja2Generator`); its
``code_generation`` block (:class:`composition.codegen.CodeGenerationSpec`) sets
the model, system prompt, max_tokens, temperature, stop sequences, timeout and
the language whose fenced blocks are the output (all of them, joined; none is
NO_CODE_BLOCK). Calls go through :class:`services.generator.upstream.Upstream`
(bounded concurrency, circuit breaker, shared rate limit) with the SDK's own
retries off: a transient failure is redelivered by JetStream after the delay the
API asks for, never slept on here.

Upstream failures (:func:`classify`):

| what | code | retried |
| --- | --- | --- |
| 401, 403 | UPSTREAM_AUTH | no |
| 429 | UPSTREAM_RATE_LIMITED | yes, after retry-after |
| 529 | UPSTREAM_OVERLOADED | yes, after retry-after |
| other 5xx, connection refused or reset | UPSTREAM_UNAVAILABLE | yes |
| no reply within ``timeout_s`` | UPSTREAM_TIMEOUT | yes |
| any other 4xx | UPSTREAM_REJECTED | no |
| a reply that is not a Messages API answer | UPSTREAM_BAD_RESPONSE | no |
"""

from __future__ import annotations

import asyncio
import email.utils
import inspect
import os
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from composition.codegen import CodeGenerationSpec
from composition.configs import GenerationError, LoadedConfig
from services.generator.generators.base import (
    Generated,
    Generator,
    Readiness,
    Requirements,
    RetriableGenerationError,
    credentials_readiness,
)
from services.generator.generators.jinja import Jinja2Generator
from services.generator.upstream import Upstream

if TYPE_CHECKING:  # the SDK takes seconds to import: only a process that calls the API pays for it
    import anthropic

API_KEY_ENV = "ANTHROPIC_API_KEY"
BASE_URL_ENV = "ANTHROPIC_BASE_URL"
DEFAULT_BASE_URL = "https://api.anthropic.com"
UPSTREAM = "anthropic"
MAX_PROMPT_CHARS = 200_000
MAX_REPLY_CHARS = 4 << 20  # a reply over this is UPSTREAM_BAD_RESPONSE

# --------------------------------------------------------------------------- fenced code blocks

_OPEN = re.compile(r"^ {0,3}(`{3,}|~{3,})[ \t]*([^\s`]*)")
_ALIASES = {
    "python": {"py", "python3"},
    "javascript": {"js", "node", "mjs"},
    "typescript": {"ts"},
    "shell": {"sh", "bash", "zsh"},
    "bash": {"sh", "shell"},
    "yaml": {"yml"},
    "rust": {"rs"},
    "ruby": {"rb"},
    "go": {"golang"},
    "csharp": {"cs", "c#"},
    "cpp": {"c++", "cxx"},
    "kotlin": {"kt"},
}


def code_blocks(text: str) -> list[tuple[str, str]]:
    """(info word in lower case, body) of every closed fenced block (``` or ~~~), in order."""
    blocks: list[tuple[str, str]] = []
    fence: str | None = None
    lang, body = "", list[str]()
    for line in text.splitlines():
        if fence is None:
            m = _OPEN.match(line)
            if m and not (m.group(1)[0] == "`" and "`" in line[m.end(1) :]):
                fence, lang, body = m.group(1), m.group(2).lower().lstrip("{."), []
            continue
        stripped = line.strip()
        if stripped.startswith(fence) and set(stripped) == {fence[0]} and len(line) - len(line.lstrip(" ")) <= 3:
            blocks.append((lang, "\n".join(body)))
            fence = None
        else:
            body.append(line)
    return blocks


def extract_code(text: str, language: str, stop_reason: str | None = None) -> str:
    """Every fenced block in ``language`` (or an alias), joined by a blank line; NO_CODE_BLOCK if none."""
    want = language.lower()
    names = {want} | _ALIASES.get(want, set())
    found = [body for lang, body in code_blocks(text) if lang in names]
    if not found:
        others = sorted({lang or "(no language)" for lang, _ in code_blocks(text)})
        why = f"the reply has no closed ```{language} block"
        if others:
            why += f" (blocks found: {', '.join(others)})"
        if stop_reason == "max_tokens":
            why += "; the reply was cut at max_tokens"
        raise GenerationError("NO_CODE_BLOCK", why)
    return "\n\n".join(b.rstrip("\n") for b in found) + "\n"


# --------------------------------------------------------------------------- upstream failures


@dataclass(frozen=True)
class Failure:
    code: str
    message: str
    retriable: bool
    delay: float | None = None  # seconds the upstream asked us to wait
    upstream_down: bool = False  # counts against the circuit breaker


def retry_after(headers: Any, now: float | None = None) -> float | None:
    """Seconds from ``retry-after-ms`` or ``retry-after`` (seconds or an HTTP date), else None."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _api_message(e: "anthropic.APIStatusError") -> str:
    msg = getattr(e, "api_message", None) or ""
    return f"{e.status_code} {msg}".strip()[:500]


def classify(e: Exception) -> Failure:
    """The stable code of an SDK error, and whether (and when) to try again."""
    import anthropic

    if isinstance(e, anthropic.APITimeoutError):
        return Failure("UPSTREAM_TIMEOUT", "no reply within the timeout", True, upstream_down=True)
    if isinstance(e, anthropic.APIConnectionError):
        return Failure("UPSTREAM_UNAVAILABLE", f"cannot reach the API: {e.__cause__ or e}", True, upstream_down=True)
    if isinstance(e, anthropic.APIStatusError):
        status, delay = e.status_code, retry_after(e.response.headers)
        if status in (401, 403):
            return Failure("UPSTREAM_AUTH", f"the API refused the credentials: {_api_message(e)}", False)
        if status == 429:
            return Failure("UPSTREAM_RATE_LIMITED", f"the API's rate limit: {_api_message(e)}", True, delay)
        if status == 529:
            return Failure("UPSTREAM_OVERLOADED", f"the API is overloaded: {_api_message(e)}", True, delay, True)
        if status >= 500:
            return Failure("UPSTREAM_UNAVAILABLE", f"the API failed: {_api_message(e)}", True, delay, True)
        return Failure("UPSTREAM_REJECTED", f"the API refused the request: {_api_message(e)}", False)
    return Failure("UPSTREAM_BAD_RESPONSE", f"the reply is not a Messages API answer: {type(e).__name__}: {e}", False)


def _read_reply(message: Any, default_model: str) -> Generated:
    """Text, model, stop reason and usage of a reply; UPSTREAM_BAD_RESPONSE if it has no such shape."""
    content = getattr(message, "content", None)
    usage = getattr(message, "usage", None)
    inp, out = getattr(usage, "input_tokens", None), getattr(usage, "output_tokens", None)
    if not isinstance(content, list) or not isinstance(inp, int) or not isinstance(out, int):
        raise GenerationError("UPSTREAM_BAD_RESPONSE", "the reply is not a Messages API answer (no content or usage)")
    texts = [
        b.text for b in content if getattr(b, "type", None) == "text" and isinstance(getattr(b, "text", None), str)
    ]
    text = "".join(texts)
    if len(text) > MAX_REPLY_CHARS:
        raise GenerationError("UPSTREAM_BAD_RESPONSE", f"the reply has {len(text)} characters, over {MAX_REPLY_CHARS}")
    model = getattr(message, "model", None)
    stop = getattr(message, "stop_reason", None)
    return Generated(
        text=text,
        model=model if isinstance(model, str) and model else default_model,
        stop_reason=stop if isinstance(stop, str) else None,
        input_tokens=inp,
        output_tokens=out,
    )


# --------------------------------------------------------------------------- the generator


class CodeGenerationGenerator(Generator):
    name = "code_generation"

    def __init__(self, upstream: Upstream | None = None):
        self.upstream = upstream or Upstream(UPSTREAM)
        self.prompts = Jinja2Generator(max_output_chars=MAX_PROMPT_CHARS)
        self._client: "anthropic.AsyncAnthropic | None" = None
        self._client_for: tuple[str, str | None] | None = None

    def requirements(self) -> Requirements:
        return Requirements(
            credentials=(API_KEY_ENV,), endpoints=(os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL,), concurrent=True
        )

    def readiness(self) -> Readiness:
        return credentials_readiness(self.requirements())

    def prepare(self) -> None:
        """Import the SDK (seconds of CPU on a busy machine): done in a thread, on the
        service's start and before the first call, never on the event loop."""
        import anthropic  # noqa: F401

    def client(self) -> "anthropic.AsyncAnthropic":
        """One client per key and base URL (read from the environment, so a rotated key is used)."""
        import anthropic

        key = (os.environ.get(API_KEY_ENV, ""), os.environ.get(BASE_URL_ENV) or None)
        if self._client is None or self._client_for != key:
            self._client = anthropic.AsyncAnthropic(
                api_key=key[0], base_url=key[1], max_retries=0, open_telemetry=False
            )
            self._client_for = key
        return self._client

    @staticmethod
    def spec(config: LoadedConfig) -> CodeGenerationSpec:
        spec = config.spec.code_generation
        if spec is None:
            raise GenerationError(
                "CONFIG_INVALID", f"config {config.id!r} uses code_generation but has no code_generation block"
            )
        return spec

    async def render(self, config: LoadedConfig, context: dict[str, Any]) -> Generated:
        spec = self.spec(config)
        prompt = self.prompts.render(config, context)
        if inspect.isawaitable(prompt):
            prompt = await prompt
        assert isinstance(prompt, str)
        reply = await self.ask(spec, prompt)
        code = extract_code(reply.text, spec.language, reply.stop_reason)
        return Generated(code, reply.model, reply.stop_reason, reply.input_tokens, reply.output_tokens)

    async def ask(self, spec: CodeGenerationSpec, prompt: str) -> Generated:
        """One Messages API call through the upstream's slot, breaker and rate limit."""
        up, metrics = self.upstream, self.upstream.metrics
        estimate = (len(prompt) + len(spec.system_prompt)) // 4 + 1 + spec.max_tokens
        params: dict[str, Any] = {
            "model": spec.model,
            "max_tokens": spec.max_tokens,
            "messages": [{"role": "user", "content": prompt}],
            "timeout": spec.timeout_s,
        }
        if spec.system_prompt:
            params["system"] = spec.system_prompt
        if spec.temperature is not None:  # a Messages API field this SDK's signature leaves out
            params["extra_body"] = {"temperature": spec.temperature}
        if spec.stop_sequences:
            params["stop_sequences"] = list(spec.stop_sequences)
        if self._client is None:
            await asyncio.to_thread(self.prepare)
        client = self.client()
        from anthropic import AnthropicError

        async with up.slot():
            permit = up.permit()
            try:
                reservation = await up.reserve(spec.model, estimate)
            except BaseException:
                up.breaker.release(permit)
                raise
            try:
                message = await client.messages.create(**params)
            except (AnthropicError, ValueError) as e:  # the SDK's errors, a body it could not parse
                f = classify(e)
                (up.breaker.failure if f.upstream_down else up.breaker.success)(permit)
                metrics.call(UPSTREAM, spec.model, f.code)
                if f.code != "UPSTREAM_RATE_LIMITED":  # a refused call used no tokens
                    await up.limiter.settle(reservation, 0)
                if f.retriable:
                    delay = None if f.delay is None else min(f.delay, up.settings.max_retry_delay_s)
                    raise RetriableGenerationError(f.code, f.message, delay) from None
                raise GenerationError(f.code, f.message) from None
            except BaseException:
                up.breaker.release(permit)
                raise
            up.breaker.success(permit)
        try:
            reply = _read_reply(message, spec.model)
        except GenerationError:
            metrics.call(UPSTREAM, spec.model, "UPSTREAM_BAD_RESPONSE")
            raise
        metrics.call(UPSTREAM, spec.model, "ok")
        metrics.used(reply.model or spec.model, reply.input_tokens or 0, reply.output_tokens or 0)
        await up.limiter.settle(reservation, (reply.input_tokens or 0) + (reply.output_tokens or 0))
        return reply
