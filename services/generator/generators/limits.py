"""jinja2: the limits a template meets inside the sandbox.

Time and memory are the operating system's business: jinja2 renders run in worker
processes (:mod:`services.generator.isolation`) with an address-space limit
(``RLIMIT_AS``), a CPU limit (``RLIMIT_CPU``) and a wall-clock deadline enforced by
the parent, which kills the worker and starts another. Inside the template only
what gives a clearer error than "killed" is left, all through jinja2's documented
extension points:

- the template's size in tokens (an :class:`~jinja2.ext.Extension`'s
  ``filter_stream``): compiling costs about 15 µs and 3 KB per token;
- repetition, powers and products of huge operands (``'a' * 10**9``,
  ``9 ** 9 ** 9``), refused before they allocate (the sandbox's
  ``intercepted_binops`` and ``call_binop``);
- the output cap, in :class:`~services.generator.generators.jinja.Jinja2Generator`
  (``Template.generate()`` streams; rendering stops at the cap).

A refusal is a :class:`TemplateLimitError` (a ``SecurityError``): the outcome is
TEMPLATE_SECURITY, naming the template line.
"""

from __future__ import annotations

from typing import Any

from jinja2 import TemplateSyntaxError
from jinja2.exceptions import SecurityError
from jinja2.ext import Extension
from jinja2.lexer import TokenStream

MAX_RENDER_SECONDS = 1.0  # default wall-clock deadline of one render (compile included)
MAX_TEMPLATE_TOKENS = 20_000  # a template's size in jinja tokens (the examples have under 100)
MAX_POWER = 4096  # largest exponent of an integer power with a base other than -1, 0, 1
MAX_INT_BITS = 1 << 16  # largest integer a template may compute (~19700 decimal digits)


class TemplateLimitError(SecurityError):
    """A render (or compile) refused by a limit checked inside the template."""


class TokenLimit(Extension):
    """Refuses a template of more than ``max_template_tokens`` tokens before it is parsed.
    The token stream is lazy, so a huge template is not even lexed to its end."""

    def filter_stream(self, stream: TokenStream) -> Any:
        limit = getattr(self.environment, "max_template_tokens", MAX_TEMPLATE_TOKENS)
        for n, token in enumerate(stream, 1):
            if n > limit:
                raise TemplateSyntaxError(
                    f"the template has more than {limit} tokens; split it up",
                    token.lineno,
                    stream.name,
                    stream.filename,
                )
            yield token
