"""Generators: the protocol, the base class and what every generator shares."""

from __future__ import annotations

from typing import Any, Awaitable, Protocol, runtime_checkable

from composition.configs import GenerationError, LoadedConfig

ENTRY_POINT_GROUP = "chora.generators"
MAX_OUTPUT_CHARS = 1 << 20  # a render that passes this many characters is stopped early


@runtime_checkable
class GeneratorProtocol(Protocol):
    name: str

    def render(self, config: LoadedConfig, context: dict[str, Any]) -> str | Awaitable[str]: ...


class Generator:
    """Base class for generators (subclassing it is optional: the protocol is what counts)."""

    name: str = ""
    # Part of the result cache's key: bump it when the same input renders differently.
    version: str = "1"
    # True: the same config and context always give the same output, so results are
    # cached unless the config says `cache: off` (else only when it says `cache: on` or a TTL).
    deterministic: bool = False

    def render(self, config: LoadedConfig, context: dict[str, Any]) -> str:
        raise NotImplementedError


def _needs_template(config: LoadedConfig, generator: str) -> str:
    if config.template is None:
        raise GenerationError(
            "CONFIG_INVALID", f"config {config.id!r} uses {generator}, which needs 'template' or 'template_file'"
        )
    return config.template
