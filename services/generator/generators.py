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
  A render has a deadline (MAX_RENDER_SECONDS) and size and allocation limits
  tied to the output limit; see "jinja2: resource limits" below.
- ``template_fill``: substitutes ``{{ name }}`` / ``{{name}}`` / ``{{ a.b }}``
  (dotted names walk nested objects, a numeric part indexes a list); nothing
  else. Strings go in as they are, numbers as ``str()``, anything else
  (booleans, null, objects, lists) as JSON.
- ``demonstration``: returns the config's ``example_output``.
"""

from __future__ import annotations

import itertools
import json
import logging
import operator
import pprint
import re
import threading
import time
import types
from functools import update_wrapper, wraps
from importlib.metadata import entry_points
from typing import Any, Awaitable, Callable, Protocol, runtime_checkable

from jinja2 import StrictUndefined, Template, TemplateSyntaxError, UndefinedError, nodes, pass_environment
from jinja2.compiler import CodeGenerator, Frame, optimizeconst
from jinja2.exceptions import SecurityError, TemplateError
from jinja2.ext import Extension
from jinja2.lexer import TokenStream
from jinja2.filters import make_attrgetter, make_multi_attrgetter, sync_do_sum
from jinja2.runtime import LoopContext, Macro, markup_join
from jinja2.sandbox import (
    MAX_RANGE,
    ImmutableSandboxedEnvironment,
    SandboxedEnvironment,
    SandboxedEscapeFormatter,
    SandboxedFormatter,
)
from jinja2.utils import Namespace, generate_lorem_ipsum
from markupsafe import Markup

from composition.configs import GenerationError, LoadedConfig

log = logging.getLogger("chora.generator")

ENTRY_POINT_GROUP = "chora.generators"
MAX_OUTPUT_CHARS = 1 << 20  # a render that passes this many characters is stopped early


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


# --------------------------------------------------------------------------- jinja2: resource limits
#
# The sandbox stops attribute tricks; these stop a template from spending the
# generator's time or memory. A render runs synchronously in the service's event
# loop, so a slow render stalls every other request (and heartbeats) with it.
#
# - Time: every loop iteration, call (macros included), filter, operator and
#   ``~`` checks a per-render deadline (MAX_RENDER_SECONDS), so nested loops and
#   exponential macro recursion stop in bounded time, on any thread (no signals:
#   SIGALRM is main-thread only and already used by pytest-timeout and others).
# - Size: an operation that could build a value larger than ``max_value_chars``
#   characters (4x the output limit) or ``max_value_items`` items is refused
#   *before* it allocates: repetition, concatenation, powers, %-formatting and
#   str.format widths, str methods with a width or count, the amplifying
#   filters (center, indent, wordwrap, replace, join, format, ...), lipsum, and
#   printing a container whose text would be too large.
# - Total: what a render creates through those operations is charged to a
#   budget (``max_alloc_bytes``, 64x the output limit), so values cannot pile
#   up in namespaces or nested lists without bound either.
#
# A refusal is a TemplateLimitError (a SecurityError): the outcome is
# TEMPLATE_SECURITY, naming the template line.

MAX_RENDER_SECONDS = 1.0  # wall-clock budget of one render (and of one compile's constant folding)
MAX_TEMPLATE_TOKENS = 20_000  # a template's size in jinja tokens (the examples have under 100)
_MAX_POWER = 4096  # largest exponent of an integer power with a base other than -1, 0, 1
MAX_INT_BITS = 1 << 16  # largest integer a template may compute (~19700 decimal digits)
_SHORT_LOOP = 64  # a loop over a list of at most this many items checks the deadline once, not per item
_SLOW_FILTERS = frozenset({"title", "wordcount", "urlize", "wordwrap", "urlencode", "striptags", "indent", "xmlattr"})
_LINE_BREAKS = ("\n", "\r", "\v", "\f", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029")
_now = time.monotonic
_BuiltinMethod = types.BuiltinMethodType
_GeneratorType = types.GeneratorType
_DICT_VIEWS = (type({}.keys()), type({}.values()), type({}.items()))
_CONTAINERS = frozenset({list, tuple, dict, set, frozenset, *_DICT_VIEWS})
_SCALARS = frozenset({str, int, float, bool, type(None)})
_COMPARE: dict[str, Callable[[Any, Any], Any]] = {
    "eq": operator.eq,
    "ne": operator.ne,
    "gt": operator.gt,
    "gteq": operator.ge,
    "lt": operator.lt,
    "lteq": operator.le,
    "in": lambda a, b: a in b,
    "notin": lambda a, b: a not in b,
}
# jinja's tests that compare (``x is eq(y)``, ``select("in", xs)``): through compare() too
_COMPARING_TESTS = {
    "in": "in", "==": "eq", "eq": "eq", "equalto": "eq", "!=": "ne", "ne": "ne", ">": "gt", "gt": "gt",
    "greaterthan": "gt", "ge": "gteq", ">=": "gteq", "<": "lt", "lt": "lt", "lessthan": "lt", "<=": "lteq",
    "le": "lteq",
}  # fmt: skip


class TemplateLimitError(SecurityError):
    """A render (or compile) stopped by a resource limit: time, size or allocation budget."""


class _Budget:
    """What one render may still spend: a deadline and bytes of new data."""

    __slots__ = ("deadline", "left", "seconds", "total")

    def __init__(self, seconds: float, total: int):
        self.deadline = _now() + seconds
        self.seconds = seconds
        self.left = total
        self.total = total


def _digits(n: int) -> int:
    """An upper bound of the characters of ``str(n)``."""
    return n.bit_length() * 30103 // 100000 + 2


def _str_repr_len(s: str) -> int:
    """An upper bound of ``len(repr(s))`` (``s`` is a str)."""
    n = len(s)
    if s.isprintable():
        return n + s.count("\\") + s.count("'") + 2
    return n * (4 if s.isascii() else 10) + 2


class _GuardedCodeGenerator(CodeGenerator):
    """jinja's code generator, with the budget checks of :class:`_Sandbox` compiled in."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._loop_iters: set[int] = set()  # ids of the for loops' iterable nodes

    def visit_For(self, node: nodes.For, frame: Frame) -> None:
        self._loop_iters.add(id(node.iter))
        super().visit_For(node, frame)

    def visit(self, node: nodes.Node, *args: Any, **kwargs: Any) -> Any:
        key = id(node)
        if key not in self._loop_iters:
            return super().visit(node, *args, **kwargs)
        # a for loop's iterable: ``environment.guard_iter(<iterable>)``, checked on every item
        self._loop_iters.discard(key)
        self.write("environment.guard_iter(")
        try:
            super().visit(node, *args, **kwargs)
        finally:
            self._loop_iters.add(key)
        self.write(")")
        return None

    # ``{{ value }}``: ``environment.to_str(value)`` instead of ``str(value)``, so a container is
    # sized before it is printed (constants are checked the same way at compile time). A str, the
    # common case, skips the call: ``(_o if type(_o := value) is str else environment.to_str(_o))``.
    def _make_finalize(self) -> CodeGenerator._FinalizeInfo:
        if self._finalize is None:
            self._finalize = self._FinalizeInfo(self.environment.to_str, None)  # type: ignore[attr-defined]
        return self._finalize

    def _output_child_pre(self, node: nodes.Expr, frame: Frame, finalize: CodeGenerator._FinalizeInfo) -> None:
        if frame.eval_ctx.volatile or frame.eval_ctx.autoescape:
            super()._output_child_pre(node, frame, finalize)  # escape(...) keeps Markup as it is
            self.write("environment.checked(")
        else:
            self.write("(_o if type(_o := ")

    def _output_child_post(self, node: nodes.Expr, frame: Frame, finalize: CodeGenerator._FinalizeInfo) -> None:
        if frame.eval_ctx.volatile or frame.eval_ctx.autoescape:
            self.write("))")
        else:
            self.write(") is str else environment.to_str(_o))")

    @optimizeconst
    def visit_Getitem(self, node: nodes.Getitem, frame: Frame) -> None:
        # ``x[a:b:c]``: jinja slices directly; a slice is a copy, so it goes through the budget.
        if not isinstance(node.arg, nodes.Slice):
            super().visit_Getitem(node, frame)
            return
        self.write("environment.guard_slice(")
        self.visit(node.node, frame)
        for part in (node.arg.start, node.arg.stop, node.arg.step):
            self.write(", ")
            if part is None:
                self.write("None")
            else:
                self.visit(part, frame)
        self.write(")")

    @optimizeconst
    def visit_Compare(self, node: nodes.Compare, frame: Frame) -> None:
        # ``a == b``, ``a in b``, ...: ``environment.compare(a, "eq", b)``, so comparing containers
        # of big values is sized first. A chain ``a < b < c`` stays one evaluation of each operand,
        # short-circuiting as in Python: ``compare(a, "lt", (t_1 := b)) and compare(t_1, "lt", c)``.
        self.write("(")
        left: str | None = None
        for i, op in enumerate(node.ops):
            if i:
                self.write(" and ")
            self.write("environment.compare(")
            if left is None:
                self.visit(node.expr, frame)
            else:
                self.write(left)
            self.write(f", {op.op!r}, ")
            if i + 1 < len(node.ops):
                left = self.temporary_identifier()
                self.write(f"({left} := ")
                self.visit(op.expr, frame)
                self.write(")")
            else:
                self.visit(op.expr, frame)
            self.write(")")
        self.write(")")

    @optimizeconst
    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        # ``a ~ b``: like jinja's (str_join / markup_join), with the size checked first.
        if frame.eval_ctx.volatile:
            markup = "context.eval_ctx.volatile"
        elif frame.eval_ctx.autoescape:
            markup = "True"
        else:
            markup = "False"
        self.write("environment.guard_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write(f"), {markup})")


class _TokenLimit(Extension):
    """Refuses a template of more than ``max_template_tokens`` tokens before it is parsed: jinja
    spends about 15 µs and 3 KB per token compiling (a 1 MB template of ``{{ a }}`` takes seconds
    and over 500 MB). The token stream is lazy, so a huge template is not even lexed to its end."""

    def filter_stream(self, stream: TokenStream) -> Any:
        limit = self.environment.max_template_tokens  # type: ignore[attr-defined]
        for n, token in enumerate(stream, 1):
            if n > limit:
                raise TemplateSyntaxError(
                    f"the template has more than {limit} tokens; split it up", token.lineno, stream.name, stream.filename
                )
            yield token


class _BoundedFormatter(SandboxedFormatter):
    """``str.format`` in the sandbox, refusing widths and totals past the size limit."""

    def __init__(self, env: "_Sandbox", **kwargs: Any) -> None:
        super().__init__(env, **kwargs)
        self._total = 0

    def vformat(self, format_string: str, args: Any, kwargs: Any) -> str:
        self._total = len(format_string)
        return super().vformat(format_string, args, kwargs)

    def convert_field(self, value: Any, conversion: str | None) -> Any:
        if conversion in ("r", "a"):
            size = self._env.value_size(value, repr_=True)
            self._env.check_chars(size * (10 if conversion == "a" else 1), "a formatted field")
        return super().convert_field(value, conversion)

    def format_field(self, value: Any, format_spec: str) -> Any:
        env: _Sandbox = self._env  # type: ignore[assignment]
        env.tick()
        size = env.value_size(value, formatted=True) + env.spec_width(format_spec)
        if "," in format_spec or "_" in format_spec:
            size += size // 3
        self._total += size
        env.check_chars(self._total, "the formatted string")
        return super().format_field(value, format_spec)


class _BoundedEscapeFormatter(_BoundedFormatter, SandboxedEscapeFormatter):
    pass


class _CappedStream:
    """A write-only text stream that refuses to grow past ``cap`` characters."""

    def __init__(self, env: "_Sandbox", cap: int) -> None:
        self.env, self.cap, self.n, self.parts = env, cap, 0, []

    def write(self, s: str) -> int:
        self.n += len(s)
        if self.n > self.cap:
            raise TemplateLimitError(f"the text would pass {self.cap} characters")
        if len(self.parts) & 0xFF == 0:
            self.env.tick()
        self.parts.append(s)
        return len(s)


# Filters that turn their value into text first (soft_str): a container's text is sized before.
_STRINGIFYING_FILTERS = frozenset(
    {
        "capitalize", "center", "e", "escape", "forceescape", "format", "indent", "lower", "upper", "title",
        "trim", "striptags", "truncate", "replace", "string", "urlize", "wordcount", "wordwrap", "urlencode",
        "safe", "xmlattr",
    }
)  # fmt: skip

_FILTER_CHECKS: dict[str, Callable[..., Any]] = {}


def _filter_check(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a pre-check for filter ``name``: called as ``check(env, value, *args, **kwargs)``
    before the filter (without its context/environment argument); it raises to refuse, or returns
    ``(args, kwargs)`` (value first) to call the filter with instead (an iterable made a list)."""

    def register(f: Callable[..., Any]) -> Callable[..., Any]:
        f.__qualname__ = f.__name__ = f"{name} filter"
        _FILTER_CHECKS[name] = f
        return f

    return register


def _line_count(s: str) -> int:
    return sum(map(s.count, _LINE_BREAKS)) + 1


@_filter_check("center")
def _check_center(env: "_Sandbox", value: Any, width: Any = 80) -> None:
    if isinstance(width, int):
        env.check_chars(width, "a centered string")


@_filter_check("indent")
def _check_indent(env: "_Sandbox", s: Any, width: Any = 4, first: Any = False, blank: Any = False) -> None:
    s = env.text_of(s)
    ind = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
    env.check_chars(len(s) + _line_count(s) * max(ind, 0), "the indented text")


@_filter_check("wordwrap")
def _check_wordwrap(
    env: "_Sandbox", s: Any, width: Any = 79, break_long_words: Any = True, wrapstring: Any = None, break_on_hyphens: Any = True
) -> None:
    s = env.text_of(s)
    ws = len(wrapstring) if isinstance(wrapstring, str) else 1
    lines = len(s) + 1
    if isinstance(width, int) and width > 0:
        lines = min(lines, 2 * len(s) // width + 2 * _line_count(s))
    env.check_chars(len(s) + lines * ws, "the wrapped text")


@_filter_check("replace")
def _check_replace(env: "_Sandbox", s: Any, old: Any, new: Any, count: Any = None) -> None:
    s, old, new = env.text_of(s), env.text_of(old), env.text_of(new)
    occurrences = len(s) + 1 if not old else s.count(old)
    if isinstance(count, int) and count >= 0:
        occurrences = min(occurrences, count)
    env.check_chars(len(s) + occurrences * (len(new) - len(old)), "the replaced text")


@_filter_check("format")
def _check_format(env: "_Sandbox", value: Any, *args: Any, **kwargs: Any) -> None:
    env.printf_size(env.text_of(value), kwargs or args)


@_filter_check("join")
def _check_join(env: "_Sandbox", value: Any, d: Any = "", attribute: Any = None) -> tuple[tuple[Any, ...], dict[str, Any]]:
    items = env.as_list(value)
    if attribute is not None:
        getter = make_attrgetter(env, attribute)
        items = [getter(x) for x in items]
    size = sum(env.value_size(x) for x in items) if items else 0
    if len(items) > 1:
        size += (len(items) - 1) * env.value_size(d)
    env.check_chars(size, "the joined string")
    return (items, d), {}


@_filter_check("urlize")
def _check_urlize(
    env: "_Sandbox", value: Any, trim_url_limit: Any = None, nofollow: Any = False, target: Any = None, rel: Any = None,
    extra_schemes: Any = None,
) -> None:  # fmt: skip
    s = env.text_of(value)
    extra = env.value_size(target or "") + env.value_size(rel or "") + 64
    links = s.count(".") + s.count("@") + s.count(":") + 1
    escapes = sum(map(s.count, "&<>\"'"))
    env.check_chars(2 * len(s) + 4 * escapes + links * extra, "the urlized text")


@_filter_check("batch")
def _check_batch(env: "_Sandbox", value: Any, linecount: Any, fill_with: Any = None) -> None:
    if fill_with is not None and isinstance(linecount, int):
        env.check_items(linecount, "a batch")


@_filter_check("slice")
def _check_slice(env: "_Sandbox", value: Any, slices: Any, fill_with: Any = None) -> None:
    if isinstance(slices, int) and slices > MAX_RANGE:
        raise TemplateLimitError(f"slice into {slices} parts is too many (at most {MAX_RANGE})")


@_filter_check("round")
def _check_round(env: "_Sandbox", value: Any, precision: Any = 0, method: Any = "common") -> None:
    if isinstance(precision, int) and abs(precision) > _MAX_POWER:
        raise TemplateLimitError(f"round to {precision} digits is too many (at most {_MAX_POWER})")


@_filter_check("tojson")
def _check_tojson(env: "_Sandbox", value: Any, indent: Any = None) -> None:
    if type(value) in _SCALARS:
        return  # at most 12 characters of JSON per character: the result is checked after
    size, nodes_, depth = env.shape(value)
    if indent is not None:
        ind = len(indent) if isinstance(indent, str) else indent if isinstance(indent, int) else 0
        size += nodes_ * (depth * max(ind, 0) + 1)
    env.check_chars(size, "the JSON text")


@_filter_check("pprint")
def _check_pprint(env: "_Sandbox", value: Any) -> None:
    size, _, depth = env.shape(value)
    env.check_chars(size, "the pretty-printed text")
    # pprint re-renders every nested level: its work grows with size x depth.
    env.check_chars(size * depth // 8, "the pretty-printer's work")


def _sort_keys(env: "_Sandbox", items: list[Any], attribute: Any, multi: bool = False) -> None:
    """Sorting, deduplicating or taking the min/max compares keys (lower-cased copies of strings by
    default): their total size is bounded like one comparison."""
    keys: Any = items
    if attribute is not None:
        getter = (make_multi_attrgetter if multi else make_attrgetter)(env, attribute)
        keys = [getter(x) for x in items]
    limit = env.max_compare_chars
    if all(type(k) is str for k in keys):
        size = sum(map(len, keys))
    else:
        size = env.shape(keys, limit=limit)[0]
    if size > limit:
        raise TemplateLimitError(f"sorting or comparing more than {limit} characters of keys is too much work")


@_filter_check("sort")
def _check_sort(env: "_Sandbox", value: Any, reverse: Any = False, case_sensitive: Any = False, attribute: Any = None) -> Any:
    items = env.as_list(value)
    _sort_keys(env, items, attribute, multi=True)
    return (items, reverse, case_sensitive, attribute), {}


@_filter_check("unique")
def _check_unique(env: "_Sandbox", value: Any, case_sensitive: Any = False, attribute: Any = None) -> Any:
    items = env.as_list(value)
    _sort_keys(env, items, attribute)
    return (items, case_sensitive, attribute), {}


@_filter_check("min")
def _check_min(env: "_Sandbox", value: Any, case_sensitive: Any = False, attribute: Any = None) -> Any:
    items = env.as_list(value)
    _sort_keys(env, items, attribute)
    return (items, case_sensitive, attribute), {}


_FILTER_CHECKS["max"] = _check_min


@_filter_check("groupby")
def _check_groupby(env: "_Sandbox", value: Any, attribute: Any, default: Any = None, case_sensitive: Any = False) -> Any:
    items = env.as_list(value)
    _sort_keys(env, items, attribute)
    return (items, attribute, default, case_sensitive), {}


@_filter_check("dictsort")
def _check_dictsort(env: "_Sandbox", value: Any, case_sensitive: Any = False, by: Any = "key", reverse: Any = False) -> None:
    limit = env.max_compare_chars
    if env.shape(value, limit=limit)[0] > limit:
        raise TemplateLimitError(f"sorting more than {limit} characters of keys is too much work")


@pass_environment
def _sum_filter(environment: "_Sandbox", iterable: Any, attribute: Any = None, start: Any = 0) -> Any:
    """jinja's ``sum``; sums of lists, tuples or strings are sized first and built in linear time."""
    if isinstance(start, (int, float)):
        return sync_do_sum(environment, iterable, attribute, start)
    items = environment.as_list(iterable)
    if attribute is not None:
        getter = make_attrgetter(environment, attribute)
        items = [getter(x) for x in items]
    kind = type(start)
    if kind in (list, tuple) and all(type(x) is kind for x in items):
        environment.check_items(len(start) + sum(map(len, items)), "the sum")
        return kind(itertools.chain(start, *items))
    return sum(items, start)  # anything else: what Python does (str is a TypeError)


@pass_environment
def _pprint_filter(environment: "_Sandbox", value: Any) -> str:
    """``pformat(value)``, written to a stream that stops at the size limit."""
    stream = _CappedStream(environment, environment.max_value_chars)
    pprint.PrettyPrinter(stream=stream).pprint(value)
    return "".join(stream.parts)[:-1]  # pprint() adds the newline pformat() does not


class _Sandbox(ImmutableSandboxedEnvironment):
    """The sandbox, plus the resource limits described above.

    Immutable: ``{{ xs.append(1) }}`` is refused, because the config's default
    context is shared by every request and must not carry state between them.
    """

    code_generator_class = _GuardedCodeGenerator
    intercepted_binops = frozenset({"+", "-", "*", "/", "//", "%", "**"})
    intercepted_unops = frozenset({"-"})

    def __init__(
        self,
        *,
        max_value_chars: int = 4 * MAX_OUTPUT_CHARS,
        max_value_items: int = MAX_OUTPUT_CHARS,
        max_alloc_bytes: int = 64 * MAX_OUTPUT_CHARS,
        max_template_tokens: int = MAX_TEMPLATE_TOKENS,
        **kwargs: Any,
    ) -> None:
        kwargs["extensions"] = [*kwargs.get("extensions", ()), _TokenLimit]
        super().__init__(**kwargs)
        self.max_template_tokens = max_template_tokens
        self.max_value_chars = max_value_chars
        self.max_value_items = max_value_items
        self.max_alloc_bytes = max_alloc_bytes
        self.max_compare_chars = 4 * max_value_chars  # what one comparison (or sort key set) may span
        self._local = threading.local()
        self.concat = self.guard_join  # macro, block and {% set %} bodies are joined with this
        filters = dict(self.filters, sum=_sum_filter, pprint=_pprint_filter)
        self.filters = {name: self._guard_filter(name, f) for name, f in filters.items()}
        self.globals["lipsum"] = self._lipsum
        for name, op in _COMPARING_TESTS.items():
            self.tests[name] = self._comparing_test(op)

    # ------------------------------------------------------------------ the budget
    def start(self, seconds: float, total: int | None = None) -> _Budget | None:
        """Open a budget for this thread (a render or a compile); returns the one to restore."""
        local = self._local
        saved = getattr(local, "budget", None)
        local.budget = _Budget(seconds, self.max_alloc_bytes if total is None else total)
        return saved

    def stop(self, saved: _Budget | None) -> None:
        self._local.budget = saved

    def _budget(self) -> _Budget | None:
        return getattr(self._local, "budget", None)

    def tick(self, b: _Budget | None = None) -> None:
        """Raise if the render is past its deadline."""
        if b is None:
            b = getattr(self._local, "budget", None)
            if b is None:
                return
        if _now() > b.deadline:
            raise TemplateLimitError(f"the render took more than {b.seconds:g} s; stopped")

    def _spend(self, b: _Budget, nbytes: int) -> None:
        b.left -= nbytes
        if b.left < 0:
            raise TemplateLimitError(f"the render built more than {b.total} bytes of values; stopped")

    def check_chars(self, n: int, what: str) -> None:
        if n > self.max_value_chars:
            raise TemplateLimitError(f"{what} would have {n} characters, over the limit of {self.max_value_chars}")

    def check_items(self, n: int, what: str) -> None:
        if n > self.max_value_items:
            raise TemplateLimitError(f"{what} would have {n} items, over the limit of {self.max_value_items}")

    def _result(self, rv: Any, b: _Budget | None) -> Any:
        """Check and charge a value an operation built."""
        t = type(rv)
        if t is str or t is Markup or (t is not int and isinstance(rv, str)):
            n = len(rv)
            if n > self.max_value_chars:
                self.check_chars(n, "a string")
            if b is not None:
                self._spend(b, n if rv.isascii() else 4 * n)
        elif t is int:
            bits = rv.bit_length()
            if bits > 64:
                if bits > MAX_INT_BITS:
                    raise TemplateLimitError(f"an integer of {bits} bits is over the limit of {MAX_INT_BITS}")
                if b is not None:
                    self._spend(b, bits >> 3)
        elif t is list or t is tuple or t is dict or t is set or t is frozenset:
            n = len(rv)
            if n > self.max_value_items:
                self.check_items(n, f"a {t.__name__}")
            if b is not None:
                self._spend(b, 8 * n)
        elif t is bytes:
            self.check_chars(len(rv), "a bytes value")
            if b is not None:
                self._spend(b, len(rv))
        return rv

    # ------------------------------------------------------------------ sizes
    def shape(self, obj: Any, *, repr_: bool = True, limit: int | None = None) -> tuple[int, int, int]:
        """(characters, nodes, depth) of ``repr(obj)`` (``str`` if not ``repr_``), estimated from
        above; stops counting past ``limit`` (the size limit)."""
        t = type(obj)
        if t is str:  # the common cases, without the walk
            return (len(obj) if not repr_ else _str_repr_len(obj)), 1, 1
        if t is int:
            return _digits(obj), 1, 1
        if t is float or t is bool or obj is None:
            return 24, 1, 1
        if limit is None:
            limit = self.max_value_chars
        b = self._budget()
        total = nodes_ = depth = 0
        stack: list[tuple[Any, int]] = [(obj, 1)]
        pop, extend = stack.pop, stack.extend
        top = not repr_
        while stack:
            o, d = pop()
            nodes_ += 1
            if d > depth:
                depth = d
            t = type(o)
            if t is str:
                total += len(o) if top else _str_repr_len(o)
            elif t is int:
                total += _digits(o)
            elif t is float or t is bool or o is None:
                total += 24
            elif t is list or t is tuple or t is set or t is frozenset or t in _DICT_VIEWS:
                total += 2 * len(o) + 16
                if total <= limit:
                    extend(zip(o, itertools.repeat(d + 1)))
            elif t is dict:
                total += 4 * len(o) + 2
                if total <= limit:
                    extend(zip(o.keys(), itertools.repeat(d + 1)))
                    extend(zip(o.values(), itertools.repeat(d + 1)))
            elif isinstance(o, str):
                total += len(o) if top else _str_repr_len(o) + 10
            elif isinstance(o, Namespace):
                total += 14
                stack.append((object.__getattribute__(o, "_Namespace__attrs"), d + 1))
            elif isinstance(o, (bytes, bytearray)):
                total += 4 * len(o) + 3
            else:
                total += 80  # a cycler, a macro, a generator, an Undefined, ...: a short repr (or an error)
            top = False
            if total > limit:
                break
            if nodes_ & 0xFFF == 0 and b is not None:
                self.tick(b)
        return total, nodes_, depth

    def value_size(self, value: Any, *, repr_: bool = False, formatted: bool = False) -> int:
        """An upper bound of ``len(str(value))`` (``repr`` if ``repr_``); 330 for a float when
        ``formatted`` (``'%f' % 1e308`` has 309 digits)."""
        t = type(value)
        if t is str and not repr_:
            return len(value)
        if t is int:
            return _digits(value)
        if t is float:
            return 330 if formatted else 24
        return self.shape(value, repr_=repr_)[0]

    def text_of(self, value: Any) -> str:
        """``str(value)`` for a filter argument, sized before it is built."""
        if isinstance(value, str):
            return value
        self.check_chars(self.value_size(value), "the text of a value")
        return str(value)

    def as_list(self, value: Any) -> list[Any]:
        if type(value) is not list:
            value = list(self.guard_iter(value))
        self.check_items(len(value), "a sequence")
        return value

    def spec_width(self, spec: str) -> int:
        """The largest number in a format spec (width or precision), refused past the size limit."""
        if not spec:
            return 0
        widest = 0
        for digits in re.findall(r"\d+", spec):
            if len(digits) > 9:
                raise TemplateLimitError(f"a format width of {digits[:12]}... is over the limit")
            widest = max(widest, int(digits))
        self.check_chars(widest, "a formatted field")
        return widest

    def printf_size(self, fmt: str | bytes, args: Any) -> int:
        """An upper bound of ``len(fmt % args)``: refuses widths, precisions and totals past the limit."""
        if isinstance(fmt, (bytes, bytearray)):
            fmt = bytes(fmt).decode("latin-1")
        elif type(fmt) is not str:
            fmt = str.__str__(fmt)
        cap = self.max_value_chars
        positional = args if isinstance(args, tuple) else (args,)
        pos = 0
        total = 0
        i, end = 0, len(fmt)
        while True:
            j = fmt.find("%", i)
            if j < 0:
                total += end - i
                break
            total += j - i
            k = j + 1
            key = None
            if k < end and fmt[k] == "(":
                depth, m = 1, k + 1
                while m < end and depth:
                    depth += {"(": 1, ")": -1}.get(fmt[m], 0)
                    m += 1
                key, k = fmt[k + 1 : m - 1], m
            while k < end and fmt[k] in "-+ #0":
                k += 1
            numbers = []
            for _ in range(2):  # width, then precision
                if k < end and fmt[k] == "*":
                    if pos < len(positional) and isinstance(positional[pos], int):
                        numbers.append(abs(positional[pos]))
                    pos += 1
                    k += 1
                else:
                    m = k
                    while k < end and "0" <= fmt[k] <= "9":
                        k += 1
                    if k - m > 9:
                        raise TemplateLimitError(f"a format width of {fmt[m:m + 12]}... is over the limit")
                    if k > m:
                        numbers.append(int(fmt[m:k]))
                if k < end and fmt[k] == "." and len(numbers) < 2:
                    k += 1
                    continue
                break
            while k < end and fmt[k] in "hlL":
                k += 1
            if k >= end:
                break  # an incomplete format: Python raises
            conv = fmt[k]
            i = k + 1
            if conv == "%":
                total += 1
                continue
            if key is not None:
                try:
                    value = args[key]
                except Exception:
                    return total  # Python raises the same
            elif pos < len(positional):
                value = positional[pos]
                pos += 1
            else:
                return total  # not enough arguments: Python raises
            widest = max(numbers, default=0)
            self.check_chars(widest, "a formatted field")
            if conv in "sra":
                size = self.value_size(value, repr_=conv != "s") * (10 if conv == "a" else 1)
            elif conv == "c":
                size = 1
            else:
                size = self.value_size(value, formatted=True) + 3
            total += size + widest
            if total > cap:
                self.check_chars(total, "the formatted string")
        self.check_chars(total, "the formatted string")
        return total

    # ------------------------------------------------------------------ hooks of the generated code
    def guard_iter(self, iterable: Any) -> Any:
        """A for loop's iterable: the deadline is checked when the loop starts and on every item,
        but for a short list, tuple or dict (whose body's own loops, calls and filters check it)."""
        b = getattr(self._local, "budget", None)
        if b is None:
            return iterable
        if _now() > b.deadline:
            self.tick(b)
        t = type(iterable)
        if (t is list or t is tuple or t is dict) and len(iterable) <= _SHORT_LOOP:
            return iterable
        return self._guarded(iterable, b)

    def _guarded(self, iterable: Any, b: _Budget) -> Any:
        deadline = b.deadline
        for item in iterable:
            if _now() > deadline:
                self.tick(b)
            yield item

    def guard_concat(self, items: tuple[Any, ...], markup: bool) -> str:
        """``a ~ b ~ c``, sized before it is built."""
        b = getattr(self._local, "budget", None)
        if b is not None and _now() > b.deadline:
            self.tick(b)
        size = 0
        for x in items:
            size += len(x) if type(x) is str else self.value_size(x)
        self.check_chars(size, "a concatenation")
        rv = markup_join(items) if markup else "".join([x if type(x) is str else str(x) for x in items])
        if b is not None:
            self._spend(b, size)
        return rv

    def guard_join(self, parts: Any) -> str:
        """The output of a macro, a block or ``{% set %}...{% endset %}``, sized before it is joined."""
        if type(parts) is not list:
            parts = list(parts)
        size = sum(map(len, parts))
        self.check_chars(size, "the output of a macro or block")
        b = getattr(self._local, "budget", None)
        if b is not None:
            self.tick(b)
            self._spend(b, size)
        return "".join(parts)

    def guard_slice(self, obj: Any, start: Any, stop: Any, step: Any) -> Any:
        """``obj[start:stop:step]``: a copy, checked and charged like any other new value."""
        return self._result(obj[start:stop:step], getattr(self._local, "budget", None))

    def compare(self, left: Any, op: str, right: Any) -> Any:
        """``left <op> right`` (jinja's operator names): comparing containers costs up to the size of
        their contents (``[a] * n == [b] * n`` compares ``a`` and ``b`` n times), sized first."""
        if type(left) in _CONTAINERS or type(right) in _CONTAINERS:
            self.check_compare(left, op, right)
        return _COMPARE[op](left, right)

    def check_compare(self, left: Any, op: str, right: Any) -> None:
        limit = self.max_compare_chars
        if op in ("in", "notin"):
            if type(right) in (list, tuple):
                work = len(right) * self.shape(left, limit=limit)[0]
                if work > limit:
                    raise TemplateLimitError(f"looking for a value of that size in {len(right)} items is too much work")
            return
        if type(left) in _CONTAINERS and type(right) in _CONTAINERS:
            if self.shape(left, limit=limit)[0] > limit and self.shape(right, limit=limit)[0] > limit:
                raise TemplateLimitError(f"comparing values of more than {limit} characters each is too much work")

    def to_str(self, value: Any) -> str:
        """``str(value)`` for ``{{ value }}``: a container is sized before it is printed."""
        t = type(value)
        if t is str:
            return value
        if t is not int and t is not float and t is not bool and value is not None and not isinstance(value, str):
            self.check_chars(self.shape(value, repr_=False)[0], "the printed value")
        return str(value)

    def checked(self, value: Any) -> Any:
        """``value`` itself, once sized: ``{{ value }}`` under autoescape, escaped after."""
        t = type(value)
        if t is not str and t is not int and t is not float and t is not bool and value is not None:
            if not isinstance(value, str):
                self.check_chars(self.shape(value, repr_=False)[0], "the printed value")
        return value

    # ------------------------------------------------------------------ operators and calls
    def call_binop(self, context: Any, op: str, left: Any, right: Any) -> Any:
        b = getattr(self._local, "budget", None)
        if b is not None and _now() > b.deadline:
            self.tick(b)
        if op == "*":
            if isinstance(right, int) and isinstance(left, (str, bytes, list, tuple)):
                self._check_repeat(left, right)
            elif isinstance(left, int) and isinstance(right, (str, bytes, list, tuple)):
                self._check_repeat(right, left)
            elif isinstance(left, int) and isinstance(right, int):
                bits = left.bit_length() + right.bit_length()
                if bits > MAX_INT_BITS + 1:
                    raise TemplateLimitError(f"a product of {bits} bits is over the limit of {MAX_INT_BITS}")
        elif op == "+":
            if isinstance(left, (str, bytes, list, tuple)) and isinstance(right, (str, bytes, list, tuple)):
                n = len(left) + len(right)
                if isinstance(left, (list, tuple)):
                    self.check_items(n, f"a {type(left).__name__} concatenation")
                else:
                    self.check_chars(n, "a concatenation")
        elif op == "**":
            if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
                if right > _MAX_POWER:
                    raise TemplateLimitError(f"power with an exponent of {right} is too large")
                bits = left.bit_length() * right
                if bits > MAX_INT_BITS:
                    raise TemplateLimitError(f"a power of about {bits} bits is over the limit of {MAX_INT_BITS}")
        elif op == "%":
            if isinstance(left, (str, bytes)):
                self.printf_size(left, right)
        return self._result(self.binop_table[op](left, right), b)

    def _check_repeat(self, seq: Any, n: int) -> None:
        size = len(seq) * n
        if isinstance(seq, (list, tuple)):
            if size > self.max_value_items:
                raise TemplateLimitError(f"repetition of a {type(seq).__name__} {n} times is too large")
        elif size > self.max_value_chars:
            raise TemplateLimitError(f"repetition of a {type(seq).__name__} {n} times is too large")

    def call_unop(self, context: Any, op: str, arg: Any) -> Any:
        return self._result(self.unop_table[op](arg), getattr(self._local, "budget", None))

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        b = getattr(__self._local, "budget", None)
        if b is not None and _now() > b.deadline:
            __self.tick(b)
        if type(__obj) is _BuiltinMethod:
            owner = __obj.__self__
            if isinstance(owner, (str, bytes)):
                check = _SEQ_METHOD_CHECKS.get(__obj.__name__)
                if check is not None:
                    args = check(__self, owner, args, kwargs)
            elif isinstance(owner, int) and __obj.__name__ == "to_bytes":
                length = args[0] if args else kwargs.get("length", 1)
                if isinstance(length, int):
                    __self.check_chars(length, "to_bytes()")
            elif type(owner) in (list, tuple) and __obj.__name__ in ("index", "count") and args:
                __self.check_compare(args[0], "in", owner)
        elif type(__obj) is types.MethodType and type(__obj.__self__) is LoopContext and __obj.__name__ == "changed":
            __self.check_compare(args, "eq", args)  # compared with the previous item's
        rv = SandboxedEnvironment.call(__self, __context, __obj, *args, **kwargs)
        if type(__obj) is Macro:
            return rv  # its output was sized and charged when it was joined
        return __self._result(rv, b)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        """jinja's sandboxed ``str.format``/``format_map``, with widths and totals bounded."""
        if not isinstance(value, (types.MethodType, types.BuiltinMethodType)) or value.__name__ not in (
            "format",
            "format_map",
        ):
            return None
        f_self: Any = value.__self__
        if not isinstance(f_self, str):
            return None
        str_type = type(f_self)
        is_format_map = value.__name__ == "format_map"
        escape = f_self.escape if isinstance(f_self, Markup) else None
        env = self

        def wrapper(*args: Any, **kwargs: Any) -> str:
            if is_format_map:
                if kwargs:
                    raise TypeError("format_map() takes no keyword arguments")
                if len(args) != 1:
                    raise TypeError(f"format_map() takes exactly one argument ({len(args)} given)")
                kwargs = args[0]
                args = ()
            formatter = _BoundedEscapeFormatter(env, escape=escape) if escape else _BoundedFormatter(env)
            return str_type(formatter.vformat(f_self, args, kwargs))

        return update_wrapper(wrapper, value)

    # ------------------------------------------------------------------ filters and globals
    def _guard_filter(self, name: str, func: Callable[..., Any]) -> Callable[..., Any]:
        lead = 1 if getattr(func, "jinja_pass_arg", None) is not None else 0
        check = _FILTER_CHECKS.get(name)
        stringifies = name in _STRINGIFYING_FILTERS
        slow = name in _SLOW_FILTERS
        env, local, result, guard_iter = self, self._local, self._result, self.guard_iter

        if check is None and not stringifies and not slow:

            @wraps(func)
            def plain(*args: Any, **kwargs: Any) -> Any:
                b = getattr(local, "budget", None)
                if b is not None and _now() > b.deadline:
                    env.tick(b)
                rv = func(*args, **kwargs)
                return guard_iter(rv) if type(rv) is _GeneratorType else result(rv, b)

            return plain

        @wraps(func)
        def checked(*args: Any, **kwargs: Any) -> Any:
            b = getattr(local, "budget", None)
            if b is not None and _now() > b.deadline:
                env.tick(b)
            if len(args) > lead:
                value = args[lead]
                if stringifies and type(value) is not str:
                    env.check_chars(env.value_size(value), f"the text of the value of {name}")
                if slow:  # pure-Python work per character: a tighter bound
                    size = len(value) if isinstance(value, str) else env.value_size(value)
                    if size > env.max_value_chars // 4:
                        raise TemplateLimitError(
                            f"{name} of {size} characters is over its limit of {env.max_value_chars // 4}"
                        )
                if check is not None:
                    new = check(env, *args[lead:], **kwargs)
                    if new is not None:
                        args = args[:lead] + tuple(new[0])
                        kwargs = new[1]
            rv = func(*args, **kwargs)
            return guard_iter(rv) if type(rv) is _GeneratorType else result(rv, b)

        return checked

    def _comparing_test(self, op: str) -> Callable[[Any, Any], Any]:
        def test(value: Any, other: Any) -> Any:
            return self.compare(value, op, other)

        test.__name__ = test.__qualname__ = f"{op} test"
        return test

    def _lipsum(self, n: Any = 5, html: Any = True, min: Any = 20, max: Any = 100) -> str:  # noqa: A002
        """jinja's ``lipsum``, refused when it would pass a quarter of the size limit."""
        try:
            size = n * (max * 14 + 16) if n > 0 and max > 0 else 0
        except TypeError:
            size = 0  # generate_lorem_ipsum raises the TypeError
        if size > self.max_value_chars // 4:
            raise TemplateLimitError(
                f"lipsum({n!r}, max={max!r}) would have about {size} characters, "
                f"over its limit of {self.max_value_chars // 4}"
            )
        return generate_lorem_ipsum(n, html, min, max)


def _check_width(env: _Sandbox, s: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    width = args[0] if args else kwargs.get("width", 0)
    if isinstance(width, int):
        env.check_chars(width, "a padded string")
    return args


def _check_expandtabs(env: _Sandbox, s: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    tabsize = args[0] if args else kwargs.get("tabsize", 8)
    if isinstance(tabsize, int):
        env.check_chars(len(s) + s.count("\t" if isinstance(s, str) else b"\t") * max(tabsize, 0), "expandtabs()")
    return args


def _check_str_replace(env: _Sandbox, s: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    if len(args) >= 2 and isinstance(args[0], (str, bytes)) and isinstance(args[1], (str, bytes)):
        old, new = args[0], args[1]
        count = args[2] if len(args) > 2 else kwargs.get("count", -1)
        occurrences = len(s) + 1 if not old else s.count(old)
        if isinstance(count, int) and count >= 0:
            occurrences = min(occurrences, count)
        env.check_chars(len(s) + occurrences * (len(new) - len(old)), "replace()")
    return args


def _check_str_join(env: _Sandbox, s: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    if len(args) == 1:
        items = env.as_list(args[0])
        if all(isinstance(x, (str, bytes)) for x in items):
            env.check_chars(sum(map(len, items)) + len(s) * max(len(items) - 1, 0), "join()")
        return (items,)
    return args


def _check_translate(env: _Sandbox, s: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    if isinstance(s, str) and args:
        table = args[0]
        values = table.values() if isinstance(table, dict) else table if isinstance(table, (list, tuple)) else ()
        widest = max((len(v) for v in values if isinstance(v, str)), default=1)
        env.check_chars(len(s) * max(widest, 1), "translate()")
    return args


_SEQ_METHOD_CHECKS: dict[str, Callable[[_Sandbox, Any, tuple[Any, ...], dict[str, Any]], tuple[Any, ...]]] = {
    "ljust": _check_width,
    "rjust": _check_width,
    "center": _check_width,
    "zfill": _check_width,
    "expandtabs": _check_expandtabs,
    "replace": _check_str_replace,
    "join": _check_str_join,
    "translate": _check_translate,
}


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
                        "OUTPUT_TOO_LARGE", f"{config.template_name}: output passed {limit} characters; rendering stopped"
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
            raise GenerationError("MISSING_VARIABLE", self._where(config, e) + f"template variable: {e.message}") from None
        except TemplateLimitError as e:
            raise GenerationError("TEMPLATE_SECURITY", self._where(config, e) + f"resource limit: {e}") from None
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
