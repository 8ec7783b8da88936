"""Generators: turn a loaded content config and a context into text.

A generator is any object with a ``name`` and ``render(config, context) -> str``
(``render`` may also be a coroutine function, for generators that call out to
the network). Failures a caller can expect are :class:`GenerationError` with a
stable code. Generators are found through the ``chora.generators`` entry-point
group (see :class:`GeneratorRegistry`), so another package can add one.

Built in:

- ``jinja2``: jinja2's sandbox (:class:`ImmutableSandboxedEnvironment`, a
  :class:`SandboxedEnvironment` that also refuses ``list.append`` and the
  like) with ``StrictUndefined``
  (a missing variable is an error, never an empty string), no autoescaping,
  ``trim_blocks``/``lstrip_blocks`` and the template's trailing newline kept.
  In the service a render runs in a worker process whose time and memory the
  operating system bounds (:mod:`services.generator.isolation`); the few checks
  left inside the template are in :mod:`.limits`.
- ``template_fill``: substitutes ``{{ name }}`` / ``{{name}}`` / ``{{ a.b }}``
  (dotted names walk nested objects, a numeric part indexes a list); nothing
  else. Strings go in as they are, numbers as ``str()``, anything else
  (booleans, null, objects, lists) as JSON.
- ``demonstration``: returns the config's ``example_output``.

The package: :mod:`.base` (the protocol and the base class), :mod:`.limits`
and :mod:`.sandbox` (jinja2's in-template limits and the sandbox), :mod:`.jinja`,
:mod:`.simple` (``template_fill``, ``demonstration``) and :mod:`.registry`.
"""

from services.generator.generators.base import ENTRY_POINT_GROUP, MAX_OUTPUT_CHARS, Generator, GeneratorProtocol
from services.generator.generators.jinja import Jinja2Generator
from services.generator.generators.limits import (
    MAX_INT_BITS,
    MAX_RENDER_SECONDS,
    MAX_TEMPLATE_TOKENS,
    TemplateLimitError,
)
from services.generator.generators.registry import GeneratorRegistry, default_registry, get_generator
from services.generator.generators.simple import DemonstrationGenerator, TemplateFillGenerator

__all__ = [
    "ENTRY_POINT_GROUP",
    "MAX_INT_BITS",
    "MAX_OUTPUT_CHARS",
    "MAX_RENDER_SECONDS",
    "MAX_TEMPLATE_TOKENS",
    "DemonstrationGenerator",
    "Generator",
    "GeneratorProtocol",
    "GeneratorRegistry",
    "Jinja2Generator",
    "TemplateFillGenerator",
    "TemplateLimitError",
    "default_registry",
    "get_generator",
]
