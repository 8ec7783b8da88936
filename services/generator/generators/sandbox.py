"""jinja2: the sandboxed environment every template renders in."""

from __future__ import annotations

import itertools
import re
import threading
import types
from functools import update_wrapper, wraps
from typing import Any, Callable

from jinja2.runtime import LoopContext, Macro, markup_join
from jinja2.sandbox import (
    ImmutableSandboxedEnvironment,
    SandboxedEnvironment,
)
from jinja2.utils import Namespace, generate_lorem_ipsum
from markupsafe import Markup

from services.generator.generators.base import MAX_OUTPUT_CHARS
from services.generator.generators.limits import (
    MAX_INT_BITS,
    MAX_TEMPLATE_TOKENS,
    TemplateLimitError,
    _BoundedEscapeFormatter,
    _BoundedFormatter,
    _Budget,
    _BuiltinMethod,
    _COMPARE,
    _COMPARING_TESTS,
    _CONTAINERS,
    _DICT_VIEWS,
    _FILTER_CHECKS,
    _GeneratorType,
    _GuardedCodeGenerator,
    _MAX_POWER,
    _SEQ_METHOD_CHECKS,
    _SHORT_LOOP,
    _SLOW_FILTERS,
    _STRINGIFYING_FILTERS,
    _TokenLimit,
    _digits,
    _now,
    _pprint_filter,
    _str_repr_len,
    _sum_filter,
)


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
        # macro, block and {% set %} bodies are joined with this (jinja2 reads it from the instance)
        self.concat = self.guard_join  # type: ignore[method-assign]
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
                        raise TemplateLimitError(f"a format width of {fmt[m : m + 12]}... is over the limit")
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
