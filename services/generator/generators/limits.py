"""jinja2: the resource limits of a render (deadline, sizes, allocations).

The guarded code generator, the token limit, bounded formatters, and the checks
of filters and str methods whose output can be large.
"""

from __future__ import annotations

import itertools
import operator
import pprint
import time
import types
from typing import IO, TYPE_CHECKING, Any, Callable, cast

from jinja2 import TemplateSyntaxError, nodes, pass_environment
from jinja2.compiler import CodeGenerator, Frame, optimizeconst
from jinja2.exceptions import SecurityError
from jinja2.ext import Extension
from jinja2.lexer import TokenStream
from jinja2.filters import make_attrgetter, make_multi_attrgetter, sync_do_sum
from jinja2.sandbox import (
    MAX_RANGE,
    SandboxedEscapeFormatter,
    SandboxedFormatter,
)

if TYPE_CHECKING:
    from services.generator.generators.sandbox import _Sandbox


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
_DICT_VIEWS: tuple[type, ...] = (type({}.keys()), type({}.values()), type({}.items()))
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
                    f"the template has more than {limit} tokens; split it up",
                    token.lineno,
                    stream.name,
                    stream.filename,
                )
            yield token


class _BoundedFormatter(SandboxedFormatter):
    """``str.format`` in the sandbox, refusing widths and totals past the size limit."""

    def __init__(self, env: "_Sandbox", **kwargs: Any) -> None:
        super().__init__(env, **kwargs)
        self._sandbox = env
        self._total = 0

    def vformat(self, format_string: str, args: Any, kwargs: Any) -> str:
        self._total = len(format_string)
        return super().vformat(format_string, args, kwargs)

    def convert_field(self, value: Any, conversion: str | None) -> Any:
        if conversion in ("r", "a"):
            size = self._sandbox.value_size(value, repr_=True)
            self._sandbox.check_chars(size * (10 if conversion == "a" else 1), "a formatted field")
        return super().convert_field(value, conversion)

    def format_field(self, value: Any, format_spec: str) -> Any:
        env = self._sandbox
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
        self.env, self.cap, self.n = env, cap, 0
        self.parts: list[str] = []

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
    env: "_Sandbox",
    s: Any,
    width: Any = 79,
    break_long_words: Any = True,
    wrapstring: Any = None,
    break_on_hyphens: Any = True,
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
def _check_join(
    env: "_Sandbox", value: Any, d: Any = "", attribute: Any = None
) -> tuple[tuple[Any, ...], dict[str, Any]]:
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
def _check_sort(
    env: "_Sandbox", value: Any, reverse: Any = False, case_sensitive: Any = False, attribute: Any = None
) -> Any:
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
def _check_groupby(
    env: "_Sandbox", value: Any, attribute: Any, default: Any = None, case_sensitive: Any = False
) -> Any:
    items = env.as_list(value)
    _sort_keys(env, items, attribute)
    return (items, attribute, default, case_sensitive), {}


@_filter_check("dictsort")
def _check_dictsort(
    env: "_Sandbox", value: Any, case_sensitive: Any = False, by: Any = "key", reverse: Any = False
) -> None:
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
    pprint.PrettyPrinter(stream=cast(IO[str], stream)).pprint(value)  # it only calls write()
    return "".join(stream.parts)[:-1]  # pprint() adds the newline pformat() does not


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
