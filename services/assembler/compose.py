"""Composing an artifact from its parts, and the contexts the parts are generated with.

Strategies:

- ``concat``: the done parts' contents in the artifact's part order, joined by
  ``separator`` (default a blank line); omitted parts are left out.
- ``layout``: a jinja2 template rendered in jinja2's
  :class:`~jinja2.sandbox.ImmutableSandboxedEnvironment` with ``StrictUndefined``,
  given ``parts`` (part id -> content, done parts only), ``omitted`` (list of
  part ids), ``context`` (artifact defaults < request context) and
  ``artifact_id``. ``{{ parts.summary }}`` of an omitted part is an error
  unless the layout checks ``{% if 'summary' in parts %}``.

Context of a part's generation request: artifact defaults < request context <
part context (shallow: a key of a later level replaces the whole value), plus
``deps`` = {dependency part id: its content} (merged over a ``deps`` object
already in the context).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from jinja2 import StrictUndefined, Template, TemplateSyntaxError
from jinja2.exceptions import SecurityError, TemplateError, UndefinedError
from jinja2.sandbox import ImmutableSandboxedEnvironment

MAX_OUTPUT_CHARS = 8 << 20


class ComposeError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def merge_context(*levels: Mapping[str, Any] | None, deps: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Later levels win, key by key (shallow). ``deps`` is merged into ``context['deps']``."""
    out: dict[str, Any] = {}
    for level in levels:
        if level:
            out.update(level)
    if deps:
        base = out.get("deps")
        out["deps"] = {**(base if isinstance(base, dict) else {}), **deps}
    return out


_env: ImmutableSandboxedEnvironment | None = None


def _environment() -> ImmutableSandboxedEnvironment:
    global _env
    if _env is None:
        _env = ImmutableSandboxedEnvironment(
            undefined=StrictUndefined,
            autoescape=False,
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=True,
        )
    return _env


def compile_layout(source: str, name: str = "<inline layout>") -> Template:
    """Compile a layout; ``ComposeError('LAYOUT_INVALID', ...)`` naming the line on a syntax error."""
    try:
        return _environment().from_string(source)
    except TemplateSyntaxError as e:
        raise ComposeError("LAYOUT_INVALID", f"{name}, line {e.lineno}: {e.message or 'syntax error'}") from None
    except SecurityError as e:
        raise ComposeError("LAYOUT_INVALID", f"{name}: {e}") from None


def concat(contents: Sequence[str], separator: str = "\n\n") -> str:
    return separator.join(contents)


def render_layout(
    source: str,
    *,
    parts: Mapping[str, str],
    omitted: Sequence[str],
    context: Mapping[str, Any],
    artifact_id: str,
    name: str = "<inline layout>",
) -> str:
    tmpl = compile_layout(source, name)
    out: list[str] = []
    n = 0
    try:
        for chunk in tmpl.root_render_func(
            tmpl.new_context(
                {"parts": dict(parts), "omitted": list(omitted), "context": dict(context), "artifact_id": artifact_id}
            )
        ):
            n += len(chunk)
            if n > MAX_OUTPUT_CHARS:
                raise ComposeError("OUTPUT_TOO_LARGE", f"{name}: the artifact passed {MAX_OUTPUT_CHARS} characters")
            out.append(chunk)
    except ComposeError:
        raise
    except UndefinedError as e:
        raise ComposeError("COMPOSE_FAILED", f"{name}: undefined in the layout: {e.message}") from None
    except SecurityError as e:
        raise ComposeError("COMPOSE_FAILED", f"{name}: not allowed in the sandbox: {e}") from None
    except TemplateError as e:
        raise ComposeError("COMPOSE_FAILED", f"{name}: {e.message or e}") from None
    except Exception as e:  # 1 / 0, a bad filter argument, ...
        raise ComposeError("COMPOSE_FAILED", f"{name}: {type(e).__name__}: {e}") from None
    return "".join(out)


def compose(
    strategy: str,
    *,
    order: Sequence[str],
    parts: Mapping[str, str],
    omitted: Sequence[str] = (),
    separator: str = "\n\n",
    layout: str | None = None,
    layout_name: str = "<inline layout>",
    context: Mapping[str, Any] | None = None,
    artifact_id: str = "",
) -> str:
    """The artifact's content. ``order`` is the part order; ``parts`` holds the done ones."""
    if strategy == "concat":
        return concat([parts[p] for p in order if p in parts], separator)
    if strategy == "layout":
        if layout is None:
            raise ComposeError("LAYOUT_INVALID", "strategy 'layout' without a layout")
        return render_layout(
            layout, parts=parts, omitted=omitted, context=context or {}, artifact_id=artifact_id, name=layout_name
        )
    raise ComposeError("COMPOSE_FAILED", f"unknown compose strategy {strategy!r}")
