"""Generators: the protocol, the base class and what every generator shares.

Besides ``render``, a generator may declare what it needs (:class:`Requirements`:
credentials by environment variable name, upstream endpoints, whether renders
may run concurrently) and tell whether it has it (:class:`Readiness`). The
handler refuses a request for a generator that is not ready with one error
outcome, CREDENTIALS_MISSING (:func:`ensure_ready`); `chora doctor` shows the
same readiness per config. ``prepare()`` does slow set-up (a heavy import) in a
thread, started with the service, so no request waits on the event loop for it.

``render`` returns text, or :class:`Generated` (text plus what the upstream
said: model, stop reason, token usage) for generators that call a model. A
transient upstream failure is :class:`RetriableGenerationError`: the handler
turns it into a redelivery after ``delay`` (or an error outcome on the last one).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Awaitable, Protocol, runtime_checkable

from composition.configs import GenerationError, LoadedConfig

ENTRY_POINT_GROUP = "chora.generators"
MAX_OUTPUT_CHARS = 1 << 20  # a render that passes this many characters is stopped early


@dataclass(frozen=True)
class Requirements:
    """What a generator needs to work."""

    credentials: tuple[str, ...] = ()  # environment variables that must be set (names, never values)
    endpoints: tuple[str, ...] = ()  # upstream URLs it calls
    concurrent: bool = True  # safe to run many renders at the same time


@dataclass(frozen=True)
class Readiness:
    ready: bool
    missing: tuple[str, ...] = ()  # what is missing, for people ("environment variable ANTHROPIC_API_KEY")


@dataclass(frozen=True)
class Generated:
    """A render's text with what the upstream said about it."""

    text: str
    model: str | None = None
    stop_reason: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None


class RetriableGenerationError(GenerationError):
    """A transient failure (an upstream rate limit, overload, outage, timeout): try again
    after ``delay`` seconds (None: the consumer's backoff). ``code`` is the outcome's code
    if no attempt is left."""

    def __init__(self, code: str, message: str, delay: float | None = None):
        super().__init__(code, message)
        self.delay = delay


@runtime_checkable
class GeneratorProtocol(Protocol):
    name: str

    def render(self, config: LoadedConfig, context: dict[str, Any]) -> str | Generated | Awaitable[str | Generated]: ...


def credentials_readiness(requirements: Requirements) -> Readiness:
    """Ready when every credential variable is set and not empty."""
    missing = tuple(f"environment variable {v}" for v in requirements.credentials if not os.environ.get(v))
    return Readiness(not missing, missing)


class Generator:
    """Base class for generators (subclassing it is optional: the protocol is what counts)."""

    name: str = ""
    # Part of the result cache's key: bump it when the same input renders differently.
    version: str = "1"
    # True: the same config and context always give the same output, so results are
    # cached unless the config says `cache: off` (else only when it says `cache: on` or a TTL).
    deterministic: bool = False

    def render(self, config: LoadedConfig, context: dict[str, Any]) -> str | Generated | Awaitable[str | Generated]:
        raise NotImplementedError

    def requirements(self) -> Requirements:
        return Requirements()

    def readiness(self) -> Readiness:
        return credentials_readiness(self.requirements())

    def prepare(self) -> None:
        """Slow set-up (a heavy import): the service runs it in a thread when it starts."""


def requirements_of(generator: Any) -> Requirements:
    """A generator's requirements (none declared: it needs nothing)."""
    fn = getattr(generator, "requirements", None)
    return fn() if callable(fn) else Requirements()


def readiness_of(generator: Any) -> Readiness:
    """A generator's readiness (a generator that does not tell is ready)."""
    fn = getattr(generator, "readiness", None)
    return fn() if callable(fn) else credentials_readiness(requirements_of(generator))


def ensure_ready(generator: Any, name: str) -> None:
    """CREDENTIALS_MISSING, naming what is missing, when ``generator`` is not ready."""
    r = readiness_of(generator)
    if not r.ready:
        raise GenerationError("CREDENTIALS_MISSING", f"generator {name!r} is not ready: missing {', '.join(r.missing)}")


def _needs_template(config: LoadedConfig, generator: str) -> str:
    if config.template is None:
        raise GenerationError(
            "CONFIG_INVALID", f"config {config.id!r} uses {generator}, which needs 'template' or 'template_file'"
        )
    return config.template
