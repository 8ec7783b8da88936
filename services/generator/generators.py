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
- ``template_fill``: substitutes ``{{ name }}`` / ``{{name}}`` / ``{{ a.b }}``
  (dotted names walk nested objects, a numeric part indexes a list); nothing
  else. Strings go in as they are, numbers as ``str()``, anything else
  (booleans, null, objects, lists) as JSON.
- ``demonstration``: returns the config's ``example_output``.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from importlib.metadata import entry_points
from typing import Any, Awaitable, Protocol, runtime_checkable

from jinja2 import StrictUndefined, Template, TemplateSyntaxError, UndefinedError
from jinja2.exceptions import SecurityError, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from chora.configs import GenerationError, LoadedConfig

log = logging.getLogger("chora.generator")

ENTRY_POINT_GROUP = "chora.generators"
MAX_OUTPUT_CHARS = 1 << 20  # a render that passes this many characters is stopped early
_MAX_POWER = 4096


@runtime_checkable
class GeneratorProtocol(Protocol):
    name: str

    def render(self, config: LoadedConfig, context: dict[str, Any]) -> str | Awaitable[str]: ...


class Generator:
    """Base class for generators (subclassing it is optional: the protocol is what counts)."""

    name: str = ""

    def render(self, config: LoadedConfig, context: dict[str, Any]) -> str:
        raise NotImplementedError


def _needs_template(config: LoadedConfig, generator: str) -> str:
    if config.template is None:
        raise GenerationError(
            "CONFIG_INVALID", f"config {config.id!r} uses {generator}, which needs 'template' or 'template_file'"
        )
    return config.template


# --------------------------------------------------------------------------- jinja2


class _Sandbox(ImmutableSandboxedEnvironment):
    """The sandbox, plus a guard against ``'x' * 10**9`` and ``9 ** 9 ** 9``.

    Immutable: ``{{ xs.append(1) }}`` is refused, because the config's default
    context is shared by every request and must not carry state between them.
    """

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            seq, n = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_OUTPUT_CHARS:
                raise SecurityError(f"repetition of a {type(seq).__name__} {n} times is too large")
        elif operator == "**":
            if isinstance(left, int) and isinstance(right, int) and right > _MAX_POWER and abs(left) > 1:
                raise SecurityError(f"power with an exponent of {right} is too large")
        return self.binop_table[operator](left, right)


def _template_line(exc: BaseException) -> int | None:
    """The template line a render error happened on (jinja rewrites the traceback)."""
    line = None
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


class Jinja2Generator(Generator):
    name = "jinja2"

    def __init__(self, max_output_chars: int = MAX_OUTPUT_CHARS):
        self.env = _Sandbox(
            undefined=StrictUndefined,
            autoescape=False,
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=True,
        )
        self.max_output_chars = max_output_chars
        # config id -> (template hash, compiled): one version per config, the newest.
        self._compiled: dict[str, tuple[str | None, Template]] = {}

    def compile(self, config: LoadedConfig) -> Template:
        cached = self._compiled.get(config.id)
        if cached is not None and cached[0] == config.template_hash:
            return cached[1]
        source = _needs_template(config, "jinja2")
        try:
            tmpl = self.env.from_string(source)
        except TemplateSyntaxError as e:
            raise GenerationError(
                "TEMPLATE_ERROR", f"{config.template_name}, line {e.lineno}: {e.message or 'syntax error'}"
            ) from None
        except SecurityError as e:
            raise GenerationError("TEMPLATE_SECURITY", f"{config.template_name}: {e}") from None
        self._compiled[config.id] = (config.template_hash, tmpl)
        return tmpl

    def render(self, config: LoadedConfig, context: dict[str, Any]) -> str:
        tmpl = self.compile(config)
        limit = self.max_output_chars
        parts: list[str] = []
        n = 0
        try:
            # Template.generate() minus its wrapper: stream, so a runaway loop stops at the limit.
            for chunk in tmpl.root_render_func(tmpl.new_context(context)):
                n += len(chunk)
                if n > limit:
                    raise GenerationError(
                        "OUTPUT_TOO_LARGE", f"{config.template_name}: output passed {limit} characters; rendering stopped"
                    )
                parts.append(chunk)
        except GenerationError:
            raise
        except Exception:
            self._explain(config)
        return "".join(parts)

    def _explain(self, config: LoadedConfig) -> None:
        """Turn the exception being handled into a GenerationError naming the template line."""
        try:
            self.env.handle_exception()  # re-raises with template lines in the traceback
        except UndefinedError as e:
            raise GenerationError("MISSING_VARIABLE", self._where(config, e) + f"template variable: {e.message}") from None
        except SecurityError as e:
            raise GenerationError("TEMPLATE_SECURITY", self._where(config, e) + f"not allowed in the sandbox: {e}") from None
        except TemplateError as e:
            raise GenerationError("TEMPLATE_ERROR", self._where(config, e) + str(e.message or e)) from None
        except Exception as e:  # a runtime error inside the template: 1 / 0, a bad filter argument, ...
            raise GenerationError("TEMPLATE_ERROR", self._where(config, e) + f"{type(e).__name__}: {e}") from None

    @staticmethod
    def _where(config: LoadedConfig, exc: BaseException) -> str:
        line = _template_line(exc)
        return f"{config.template_name}, line {line}: " if line else f"{config.template_name}: "


# --------------------------------------------------------------------------- template_fill

_PLACEHOLDER = re.compile(r"\{\{(.*?)\}\}", re.S)
_NAME = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*)\s*")


def _fill_value(v: Any) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return str(v)
    return json.dumps(v, ensure_ascii=False, default=str)


class TemplateFillGenerator(Generator):
    name = "template_fill"

    def __init__(self) -> None:
        # config id -> (template hash, literals, placeholders); placeholders are
        # (dotted name, path parts, line); literals has one more item than placeholders.
        self._compiled: dict[str, tuple[str | None, list[str], list[tuple[str, tuple[str, ...], int]]]] = {}

    def compile(self, config: LoadedConfig) -> tuple[list[str], list[tuple[str, tuple[str, ...], int]]]:
        cached = self._compiled.get(config.id)
        if cached is not None and cached[0] == config.template_hash:
            return cached[1], cached[2]
        source = _needs_template(config, "template_fill")
        literals: list[str] = []
        holes: list[tuple[str, tuple[str, ...], int]] = []
        pos = 0
        for m in _PLACEHOLDER.finditer(source):
            line = source.count("\n", 0, m.start()) + 1
            nm = _NAME.fullmatch(m.group(1))
            if nm is None:
                raise GenerationError(
                    "TEMPLATE_ERROR",
                    f"{config.template_name}, line {line}: {m.group(0)[:80]!r} is not a plain variable; "
                    "template_fill substitutes {{ name }} or {{ a.b }} only (use jinja2 for logic)",
                )
            literals.append(source[pos : m.start()])
            holes.append((nm.group(1), tuple(nm.group(1).split(".")), line))
            pos = m.end()
        literals.append(source[pos:])
        self._compiled[config.id] = (config.template_hash, literals, holes)
        return literals, holes

    def render(self, config: LoadedConfig, context: dict[str, Any]) -> str:
        literals, holes = self.compile(config)
        out = [literals[0]]
        for (name, path, line), lit in zip(holes, literals[1:]):
            v: Any = context
            for part in path:
                if isinstance(v, dict) and part in v:
                    v = v[part]
                elif isinstance(v, list) and part.isdigit() and int(part) < len(v):
                    v = v[int(part)]
                else:
                    raise GenerationError(
                        "MISSING_VARIABLE",
                        f"{config.template_name}, line {line}: template variable {name!r} is not in the context",
                    )
            out.append(_fill_value(v))
            out.append(lit)
        return "".join(out)


# --------------------------------------------------------------------------- demonstration


class DemonstrationGenerator(Generator):
    name = "demonstration"

    def render(self, config: LoadedConfig, context: dict[str, Any]) -> str:
        out = config.example_output
        if out is None:
            raise GenerationError("CONFIG_INVALID", f"config {config.id!r} uses demonstration but has no example_output")
        return out


# --------------------------------------------------------------------------- the registry


class GeneratorRegistry:
    """Generators by name: the ``chora.generators`` entry points, loaded once.

    An entry point may name a class (instantiated without arguments) or an
    object with ``render``. One that fails to load is remembered and reported
    as UNKNOWN_GENERATOR with the reason. ``generators`` given here (or
    :meth:`register`-ed) win over entry points of the same name.
    """

    def __init__(self, generators: dict[str, Any] | None = None, *, load_entry_points: bool = True):
        self._generators: dict[str, Any] = dict(generators or {})
        self._errors: dict[str, str] = {}
        self._loaded = not load_entry_points
        self._lock = threading.Lock()

    def load(self) -> None:
        """Load the entry points (once; later calls do nothing)."""
        with self._lock:
            if self._loaded:
                return
            for ep in entry_points(group=ENTRY_POINT_GROUP):
                if ep.name in self._generators:
                    continue
                try:
                    obj = ep.load()
                    gen = obj() if isinstance(obj, type) else obj
                    if not callable(getattr(gen, "render", None)):
                        raise TypeError(f"{ep.value} has no render(config, context)")
                except Exception as e:
                    self._errors[ep.name] = f"{type(e).__name__}: {e}"
                    log.warning("generator %r (%s) failed to load: %s", ep.name, ep.value, self._errors[ep.name])
                    continue
                self._generators[ep.name] = gen
            self._loaded = True

    def register(self, name: str, generator: Any) -> None:
        self._generators[name] = generator
        self._errors.pop(name, None)

    def get_generator(self, name: str) -> Any:
        gen = self._generators.get(name)
        if gen is not None:
            return gen
        if not self._loaded:
            self.load()
            gen = self._generators.get(name)
            if gen is not None:
                return gen
        if name in self._errors:
            raise GenerationError("UNKNOWN_GENERATOR", f"generator {name!r} failed to load: {self._errors[name]}")
        known = ", ".join(sorted(self._generators)) or "none"
        raise GenerationError("UNKNOWN_GENERATOR", f"no generator {name!r} is registered (known: {known})")

    def names(self) -> list[str]:
        self.load()
        return sorted(self._generators)

    @property
    def errors(self) -> dict[str, str]:
        return dict(self._errors)


_default: GeneratorRegistry | None = None


def default_registry() -> GeneratorRegistry:
    global _default
    if _default is None:
        _default = GeneratorRegistry()
    return _default


def get_generator(name: str) -> Any:
    """``default_registry().get_generator(name)``."""
    return default_registry().get_generator(name)
