"""jinja2: the sandboxed environment every template renders in.

jinja2's :class:`ImmutableSandboxedEnvironment` (attribute tricks and mutation of
shared values are refused) plus the cheap size checks of :mod:`.limits`, through
documented hooks only: ``intercepted_binops`` / ``call_binop`` and an extension.
"""

from __future__ import annotations

from typing import Any

from jinja2.sandbox import ImmutableSandboxedEnvironment

from services.generator.generators.base import MAX_OUTPUT_CHARS
from services.generator.generators.limits import (
    MAX_INT_BITS,
    MAX_POWER,
    MAX_TEMPLATE_TOKENS,
    TemplateLimitError,
    TokenLimit,
)

_SEQUENCES = (str, bytes, list, tuple)


class _Sandbox(ImmutableSandboxedEnvironment):
    """The sandbox. Immutable: ``{{ xs.append(1) }}`` is refused, because the config's
    default context is shared by every request and must not carry state between them."""

    intercepted_binops = frozenset({"*", "**", "+"})

    def __init__(
        self,
        *,
        max_value_chars: int = 4 * MAX_OUTPUT_CHARS,
        max_template_tokens: int = MAX_TEMPLATE_TOKENS,
        **kwargs: Any,
    ) -> None:
        kwargs["extensions"] = [*kwargs.get("extensions", ()), TokenLimit]
        super().__init__(**kwargs)
        self.max_value_chars = max_value_chars
        self.max_template_tokens = max_template_tokens

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            if isinstance(right, int) and isinstance(left, _SEQUENCES):
                self._check_size(len(left) * right, left)
            elif isinstance(left, int) and isinstance(right, _SEQUENCES):
                self._check_size(len(right) * left, right)
            elif isinstance(left, int) and isinstance(right, int):
                bits = left.bit_length() + right.bit_length()
                if bits > MAX_INT_BITS + 1:
                    raise TemplateLimitError(f"a product of {bits} bits is over the limit of {MAX_INT_BITS}")
        elif operator == "**":
            if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
                if right > MAX_POWER:
                    raise TemplateLimitError(f"power with an exponent of {right} is too large")
                bits = left.bit_length() * right
                if bits > MAX_INT_BITS:
                    raise TemplateLimitError(f"a power of about {bits} bits is over the limit of {MAX_INT_BITS}")
        elif operator == "+" and isinstance(left, _SEQUENCES) and isinstance(right, _SEQUENCES):
            self._check_size(len(left) + len(right), left)
        return super().call_binop(context, operator, left, right)

    def _check_size(self, n: int, kind: Any) -> None:
        if n > self.max_value_chars:
            raise TemplateLimitError(
                f"a {type(kind).__name__} of {n} items or characters is over the limit of {self.max_value_chars}"
            )
