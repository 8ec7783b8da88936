"""What the rule modules share: severities, limits, and quoting a piece of content in a message."""

from __future__ import annotations

import json
from typing import Any, Literal

Severity = Literal["error", "warning"]

DEFAULT_PLACEHOLDERS: tuple[str, ...] = ("[TBD]", "TODO", "TBD", "FIXME", "XXX", "lorem ipsum")
MAX_PATTERN_CHARS = 2000
MAX_SCHEMA_ERRORS = 5  # schema errors listed in one issue (the rest are counted)
MAX_DETAIL_CHARS = 1000  # one issue's message is cut to about this length
EXCERPT = 60


def short(value: Any, n: int = EXCERPT) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    text = " ".join(text.split())
    return repr(text if len(text) <= n else text[: n - 1] + "…")


def line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1
