"""The ``jinja2`` generator."""

from __future__ import annotations

from typing import Any

from jinja2 import StrictUndefined, Template, TemplateSyntaxError, UndefinedError
from jinja2.exceptions import SecurityError, TemplateError

from composition.configs import GenerationError, LoadedConfig
from services.generator.generators.base import MAX_OUTPUT_CHARS, Generator, _needs_template
from services.generator.generators.limits import MAX_RENDER_SECONDS, TemplateLimitError, _Budget
from services.generator.generators.sandbox import _Sandbox

# --------------------------------------------------------------------------- jinja2


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

    def __init__(self, max_output_chars: int = MAX_OUTPUT_CHARS, max_render_seconds: float = MAX_RENDER_SECONDS):
        self.env = _Sandbox(
            undefined=StrictUndefined,
            autoescape=False,
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=True,
            max_value_chars=4 * max_output_chars,
            max_value_items=max_output_chars,
            max_alloc_bytes=64 * max_output_chars,
        )
        self.max_output_chars = max_output_chars
        self.max_render_seconds = max_render_seconds
        # config id -> (template hash, compiled): one version per config, the newest.
        self._compiled: dict[str, tuple[str | None, Template]] = {}

    def compile(self, config: LoadedConfig) -> Template:
        cached = self._compiled.get(config.id)
        if cached is not None and cached[0] == config.template_hash:
            return cached[1]
        source = _needs_template(config, "jinja2")
        # Compiling folds constant expressions (filters included): under a budget too, a small one.
        saved = self.env.start(self.max_render_seconds, self.env.max_value_chars)
        try:
            tmpl = self.env.from_string(source)
        except TemplateSyntaxError as e:
            raise GenerationError(
                "TEMPLATE_ERROR", f"{config.template_name}, line {e.lineno}: {e.message or 'syntax error'}"
            ) from None
        except SecurityError as e:
            raise GenerationError("TEMPLATE_SECURITY", f"{config.template_name}: {e}") from None
        except Exception as e:  # the parser's recursion limit on deep nesting, a huge number literal, ...
            raise GenerationError("TEMPLATE_ERROR", f"{config.template_name}: {type(e).__name__}: {e}") from None
        finally:
            self.env.stop(saved)
        self._compiled[config.id] = (config.template_hash, tmpl)
        return tmpl

    def render(self, config: LoadedConfig, context: dict[str, Any]) -> str:
        tmpl = self.compile(config)
        limit = self.max_output_chars
        parts: list[str] = []
        n = 0
        env = self.env
        local = env._local
        saved = getattr(local, "budget", None)
        local.budget = _Budget(self.max_render_seconds, env.max_alloc_bytes)
        try:
            # Template.generate() minus its wrapper: stream, so a runaway loop stops at the limit.
            for chunk in tmpl.root_render_func(tmpl.new_context(context)):
                n += len(chunk)
                if n > limit:
                    raise GenerationError(
                        "OUTPUT_TOO_LARGE",
                        f"{config.template_name}: output passed {limit} characters; rendering stopped",
                    )
                parts.append(chunk)
        except GenerationError:
            raise
        except Exception:
            self._explain(config)
        finally:
            local.budget = saved
        return "".join(parts)

    def _explain(self, config: LoadedConfig) -> None:
        """Turn the exception being handled into a GenerationError naming the template line."""
        try:
            self.env.handle_exception()  # re-raises with template lines in the traceback
        except UndefinedError as e:
            raise GenerationError(
                "MISSING_VARIABLE", self._where(config, e) + f"template variable: {e.message}"
            ) from None
        except TemplateLimitError as e:
            raise GenerationError("TEMPLATE_SECURITY", self._where(config, e) + f"resource limit: {e}") from None
        except SecurityError as e:
            raise GenerationError(
                "TEMPLATE_SECURITY", self._where(config, e) + f"not allowed in the sandbox: {e}"
            ) from None
        except TemplateError as e:
            raise GenerationError("TEMPLATE_ERROR", self._where(config, e) + str(e.message or e)) from None
        except Exception as e:  # a runtime error inside the template: 1 / 0, a bad filter argument, ...
            raise GenerationError("TEMPLATE_ERROR", self._where(config, e) + f"{type(e).__name__}: {e}") from None

    @staticmethod
    def _where(config: LoadedConfig, exc: BaseException) -> str:
        line = _template_line(exc)
        return f"{config.template_name}, line {line}: " if line else f"{config.template_name}: "
