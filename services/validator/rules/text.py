"""The rules, one pydantic model per ``type``, and the content they look at (analysed lazily)."""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal, Union, get_args

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, TypeAdapter, model_validator

from services.validator.rules.common import (
    DEFAULT_PLACEHOLDERS,
    MAX_PATTERN_CHARS,
    MAX_SCHEMA_ERRORS,
    Severity,
    line_of,
    short,
)
from services.validator.rules.schema import MAX_DOC_CHARS, CompiledSchema, DocumentTooBig, SchemaError, SchemaFailed

# --------------------------------------------------------------------------- content, analysed lazily

_HEADING = re.compile(r" {0,3}(#{1,6})(?:[ \t]+(.*))?")  # fullmatch on one line
_CLOSING_HASHES = re.compile(r"(?:^|[ \t]+)#+$")
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")


def _norm(text: str) -> str:
    return " ".join(text.split()).casefold()


class Content:
    """The text under validation; derived views (lines, words, headings, JSON)
    are computed once, on first use, and shared by every rule."""

    __slots__ = ("text", "_lines", "_words", "_headings", "_json", "_lower")

    def __init__(self, text: str):
        self.text = text
        self._lines: int | None = None
        self._words: int | None = None
        self._headings: list[tuple[int, str]] | None = None
        self._json: tuple[bool, Any] | None = None
        self._lower: str | None = None

    @property
    def lower(self) -> str:
        """The text lower-cased (same number of lines, so line numbers still hold)."""
        if self._lower is None:
            self._lower = self.text.lower()
        return self._lower

    @property
    def lines(self) -> int:
        if self._lines is None:
            self._lines = len(self.text.splitlines())
        return self._lines

    @property
    def words(self) -> int:
        if self._words is None:
            self._words = len(self.text.split())
        return self._words

    @property
    def headings(self) -> list[tuple[int, str]]:
        """(level, normalised text) of every ATX heading outside fenced code."""
        if self._headings is None:
            text = self.text
            self._headings = _headings(text) if "#" in text else []
        return self._headings

    @property
    def json(self) -> tuple[bool, Any]:
        """(True, document) or (False, why it is not JSON)."""
        if self._json is None:
            try:
                self._json = (True, json.loads(self.text))
            except json.JSONDecodeError as e:
                self._json = (False, f"line {e.lineno}, column {e.colno}: {e.msg}")
            except RecursionError:
                self._json = (False, "nested too deeply")
        return self._json


def _heading_text(raw: str | None) -> str:
    if not raw:
        return ""
    return _norm(_CLOSING_HASHES.sub("", raw.rstrip()))


def _headings(text: str) -> list[tuple[int, str]]:
    out: list[tuple[int, str]] = []
    fences = "```" in text or "~~~" in text
    fence: str | None = None
    for line in text.splitlines():
        if fences:
            f = _FENCE.match(line)
            if fence is not None:
                if f and f.group(1)[0] == fence[0] and len(f.group(1)) >= len(fence) and not line[f.end() :].strip():
                    fence = None
                continue
            if f:
                fence = f.group(1)
                continue
        if "#" in line[:4]:
            m = _HEADING.fullmatch(line)
            if m:
                out.append((len(m.group(1)), _heading_text(m.group(2))))
    return out


# --------------------------------------------------------------------------- the rules


class _Rule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    severity: Severity = "error"
    message: str | None = None

    def check(self, c: Content) -> str | None:  # pragma: no cover - every rule overrides it
        """What is wrong with the content, or None when it passes."""
        raise NotImplementedError


NonNegative = Annotated[int, Field(ge=0)]


class LengthRule(_Rule):
    type: Literal["length"]
    min_chars: NonNegative | None = None
    max_chars: NonNegative | None = None
    min_words: NonNegative | None = None
    max_words: NonNegative | None = None
    min_lines: NonNegative | None = None
    max_lines: NonNegative | None = None

    @model_validator(mode="after")
    def _bounds(self) -> "LengthRule":
        bounds = (self.min_chars, self.max_chars, self.min_words, self.max_words, self.min_lines, self.max_lines)
        if all(b is None for b in bounds):
            raise ValueError(
                "a length rule needs at least one of min_chars, max_chars, min_words, max_words, min_lines, max_lines"
            )
        for unit in ("chars", "words", "lines"):
            lo, hi = getattr(self, f"min_{unit}"), getattr(self, f"max_{unit}")
            if lo is not None and hi is not None and lo > hi:
                raise ValueError(f"min_{unit} ({lo}) is greater than max_{unit} ({hi})")
        return self

    def check(self, c: Content) -> str | None:
        found = []
        for unit, label in (("chars", "characters"), ("words", "words"), ("lines", "lines")):
            lo, hi = getattr(self, f"min_{unit}"), getattr(self, f"max_{unit}")
            if lo is None and hi is None:
                continue
            n = len(c.text) if unit == "chars" else getattr(c, unit)
            if lo is not None and n < lo:
                found.append(f"{n} {label}, fewer than the minimum of {lo}")
            elif hi is not None and n > hi:
                found.append(f"{n} {label}, more than the maximum of {hi}")
        return "content has " + "; ".join(found) if found else None


class RequiredSectionsRule(_Rule):
    type: Literal["required_sections"]
    sections: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)]
    level: Annotated[int, Field(ge=1, le=6)] | None = None
    _wanted: tuple[tuple[str, str], ...] = PrivateAttr(default=())

    @model_validator(mode="after")
    def _prepare(self) -> "RequiredSectionsRule":
        wanted = []
        for s in self.sections:
            n = _norm(s)
            if not n:
                raise ValueError(f"section {s!r} is blank")
            wanted.append((s.strip(), n))
        self._wanted = tuple(wanted)
        return self

    def check(self, c: Content) -> str | None:
        level = self.level
        have = {t for lv, t in c.headings if level is None or lv == level}
        missing = [shown for shown, n in self._wanted if n not in have]
        if not missing:
            return None
        at = f" (as a level-{level} heading, {'#' * level} ...)" if level else ""
        names = ", ".join(repr(m) for m in missing)
        return f"missing required section{'s' if len(missing) > 1 else ''}{at}: {names}"


_FLAG_BITS = {"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL}


class RegexRule(_Rule):
    type: Literal["regex"]
    pattern: Annotated[str, Field(min_length=1, max_length=MAX_PATTERN_CHARS)]
    must: Literal["match", "not_match"] = "match"
    flags: list[Literal["i", "m", "s"]] = []
    _re: re.Pattern[str] = PrivateAttr()  # set by the validator below

    @model_validator(mode="after")
    def _compile(self) -> "RegexRule":
        bits = 0
        for f in self.flags:
            bits |= _FLAG_BITS[f]
        try:
            self._re = re.compile(self.pattern, bits)
        except re.error as e:
            raise ValueError(f"bad pattern {self.pattern!r}: {e}") from None
        except (RecursionError, OverflowError) as e:
            raise ValueError(f"bad pattern {self.pattern!r}: {type(e).__name__}") from None
        return self

    def _shown(self) -> str:
        flags = "".join(self.flags)
        return f"/{self.pattern}/{flags}"

    def check(self, c: Content) -> str | None:
        # (private attributes read as self._x go through pydantic's __getattr__, a few us per
        # read on every message: read from the documented __pydantic_private__ instead)
        private = self.__pydantic_private__
        assert private is not None  # set by _compile
        m = private["_re"].search(c.text)
        if self.must == "match":
            return None if m else f"content does not match {self._shown()}"
        if m is None:
            return None
        return f"content matches {self._shown()} on line {line_of(c.text, m.start())}: {short(m.group(0))}"


class JsonSchemaRule(_Rule):
    type: Literal["json_schema"]
    json_schema: dict[str, Any] = Field(alias="schema")
    _compiled: CompiledSchema = PrivateAttr()  # set by the validator below

    @model_validator(mode="after")
    def _compile(self) -> "JsonSchemaRule":
        try:
            self._compiled = CompiledSchema(self.json_schema)
        except SchemaError as e:
            raise ValueError(str(e)) from None
        except RecursionError:
            raise ValueError("schema is nested too deeply") from None
        return self

    def check(self, c: Content) -> str | None:
        if len(c.text) > MAX_DOC_CHARS:
            return f"content has {len(c.text)} characters, more than the {MAX_DOC_CHARS} a JSON schema is checked on"
        ok, doc = c.json
        if not ok:
            return f"content is not valid JSON ({doc})"
        try:
            errs = self._compiled.errors(doc, limit=MAX_SCHEMA_ERRORS + 1)
        except DocumentTooBig as e:
            return f"content is not checked against the JSON schema: {e}"
        except SchemaFailed as e:
            return f"the JSON schema could not be applied to the content: {e}"
        except RecursionError:
            return "content is nested too deeply to check against the schema"
        if not errs:
            return None
        shown = [f"{path}: {what}" for path, what in errs[:MAX_SCHEMA_ERRORS]]
        more = " (and more)" if len(errs) > MAX_SCHEMA_ERRORS else ""
        return "content does not match the JSON schema: " + "; ".join(shown) + more


_ELLIPSIS = r"(?:\.\.\.|…)[ \t\r]*$"


class PlaceholdersRule(_Rule):
    type: Literal["placeholders"]
    patterns: list[Annotated[str, Field(min_length=1, max_length=200)]] = list(DEFAULT_PLACEHOLDERS)
    trailing_ellipsis: bool = True
    case_sensitive: bool = False
    _re: re.Pattern[str] = PrivateAttr()  # set by the validator below
    _names: dict[str, str] = PrivateAttr(default_factory=dict)  # pattern as searched -> as written

    @model_validator(mode="after")
    def _compile(self) -> "PlaceholdersRule":
        if not self.patterns and not self.trailing_ellipsis:
            raise ValueError("a placeholders rule with no patterns and trailing_ellipsis false checks nothing")
        # Case-insensitive means: the lower-cased pattern searched in the lower-cased text,
        # which lets a plain substring test skip the regex for clean content.
        for p in self.patterns:
            self._names.setdefault(p if self.case_sensitive else p.lower(), p)
        alts = []
        # Longest first: at one position "[TBD]" wins over "TBD".
        for key in sorted(self._names, key=len, reverse=True):
            before = r"(?<!\w)" if (key[0].isalnum() or key[0] == "_") else ""
            after = r"(?!\w)" if (key[-1].isalnum() or key[-1] == "_") else ""
            alts.append(before + re.escape(key) + after)
        if self.trailing_ellipsis:
            alts.append(_ELLIPSIS)
        self._re = re.compile("|".join(alts), re.M)
        return self

    def check(self, c: Content) -> str | None:
        text = c.text if self.case_sensitive else c.lower
        private = self.__pydantic_private__  # see RegexRule.check
        assert private is not None
        if not any(key in text for key in private["_names"]) and not (
            self.trailing_ellipsis and ("..." in text or "\u2026" in text)
        ):
            return None
        hits: dict[str, list[int]] = {}  # name -> [count, first line]
        for m in self._re.finditer(text):
            name = self._names.get(m.group(0)) or "trailing ellipsis"
            h = hits.get(name)
            if h is None:
                hits[name] = [1, line_of(text, m.start())]
            else:
                h[0] += 1
        if not hits:
            return None
        parts = []
        for name, (n, line) in hits.items():
            what = name if name == "trailing ellipsis" else repr(name)
            parts.append(f"{what} on line {line}" + (f" ({n} times)" if n > 1 else ""))
        return "placeholder text found: " + ", ".join(parts)


RULE_MODELS = (LengthRule, RequiredSectionsRule, RegexRule, JsonSchemaRule, PlaceholdersRule)
RULE_TYPES: tuple[str, ...] = tuple(get_args(m.model_fields["type"].annotation)[0] for m in RULE_MODELS)

Rule = Annotated[
    Union[LengthRule, RequiredSectionsRule, RegexRule, JsonSchemaRule, PlaceholdersRule],
    Field(discriminator="type"),
]
rule_adapter: TypeAdapter = TypeAdapter(Rule)
