"""The ``jinja2`` generator.

In the service it renders inside a worker process (:mod:`services.generator.isolation`),
where the operating system bounds its time and memory; used directly (a library, a test),
it renders in the caller's process with only the in-template checks of :mod:`.limits`.
"""

from __future__ import annotations

from typing import Any

import jinja2
from jinja2 import StrictUndefined, Template, TemplateSyntaxError, UndefinedError
from jinja2.exceptions import SecurityError, TemplateError

from composition.configs import GenerationError, LoadedConfig
from services.generator.generators.base import MAX_OUTPUT_CHARS, Generator, _needs_template
from services.generator.generators.limits import TemplateLimitError
from services.generator.generators.sandbox import _Sandbox


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
    deterministic = True  # the result cache is on by default
    version = f"1+jinja2.{jinja2.__version__}"  # another jinja2 may render differently: other cache keys

    def __init__(self, max_output_chars: int = MAX_OUTPUT_CHARS):
        self.env = _Sandbox(
            undefined=StrictUndefined,
            autoescape=False,
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=True,
            max_value_chars=4 * max_output_chars,
        )
        self.max_output_chars = max_output_chars
        # config id -> (template hash, compiled): one version per config, the newest.
        self._compiled: dict[str, tuple[str | None, Template]] = {}

    def compiled(self, config_id: str, template_hash: str | None) -> Template | None:
        """The compiled template of this config version, if it is cached."""
        cached = self._compiled.get(config_id)
        return cached[1] if cached is not None and cached[0] == template_hash else None

    def compile_source(self, config_id: str, template_hash: str | None, name: str, source: str) -> Template:
        tmpl = self.compiled(config_id, template_hash)
        if tmpl is not None:
            return tmpl
        try:
            tmpl = self.env.from_string(source)
        except TemplateSyntaxError as e:
            raise GenerationError("TEMPLATE_ERROR", f"{name}, line {e.lineno}: {e.message or 'syntax error'}") from None
        except SecurityError as e:  # constant folding ran into a limit
            raise GenerationError("TEMPLATE_SECURITY", f"{name}: {e}") from None
        except MemoryError:
            raise GenerationError("RENDER_MEMORY", f"{name}: compiling passed the memory limit") from None
        except Exception as e:  # the parser's recursion limit on deep nesting, a huge number literal, ...
            raise GenerationError("TEMPLATE_ERROR", f"{name}: {type(e).__name__}: {e}") from None
        self._compiled[config_id] = (template_hash, tmpl)
        return tmpl

    def compile(self, config: LoadedConfig) -> Template:
        tmpl = self.compiled(config.id, config.template_hash)
        if tmpl is not None:
            return tmpl
        source = _needs_template(config, "jinja2")
        return self.compile_source(config.id, config.template_hash, config.template_name, source)

    def render(self, config: LoadedConfig, context: dict[str, Any]) -> str:
        return self.render_template(self.compile(config), config.template_name, context)

    def render_template(self, tmpl: Template, name: str, context: dict[str, Any]) -> str:
        """Stream the render (``Template.generate()``) and stop it once it passes the output cap."""
        limit = self.max_output_chars
        parts: list[str] = []
        n = 0
        try:
            for chunk in tmpl.generate(context):
                n += len(chunk)
                if n > limit:
                    raise GenerationError(
                        "OUTPUT_TOO_LARGE", f"{name}: output passed {limit} characters; rendering stopped"
                    )
                parts.append(chunk)
            return "".join(parts)
        except GenerationError:
            raise
        except MemoryError:
            parts.clear()
            raise GenerationError("RENDER_MEMORY", f"{name}: the render passed its memory limit; stopped") from None
        except UndefinedError as e:
            raise GenerationError("MISSING_VARIABLE", _where(name, e) + f"template variable: {e.message}") from None
        except TemplateLimitError as e:
            raise GenerationError("TEMPLATE_SECURITY", _where(name, e) + f"resource limit: {e}") from None
        except SecurityError as e:
            raise GenerationError("TEMPLATE_SECURITY", _where(name, e) + f"not allowed in the sandbox: {e}") from None
        except TemplateError as e:
            raise GenerationError("TEMPLATE_ERROR", _where(name, e) + str(e.message or e)) from None
        except Exception as e:  # a runtime error inside the template: 1 / 0, a bad filter argument, ...
            raise GenerationError("TEMPLATE_ERROR", _where(name, e) + f"{type(e).__name__}: {e}") from None


def _where(name: str, exc: BaseException) -> str:
    line = _template_line(exc)
    return f"{name}, line {line}: " if line else f"{name}: "
