"""Validation rules: the ``validation`` list of a content config, parsed once.

Each item of the list is one rule, told apart by its ``type``; every rule has
``severity`` (``error``, the default, or ``warning``) and an optional
``message`` that is shown in front of what was found::

    validation:
      - {type: length, min_words: 50, max_chars: 20000}
      - {type: required_sections, sections: [Added, Fixed], level: 2}
      - {type: regex, pattern: '^# ', flags: [m]}
      - {type: regex, pattern: 'internal\\.example', must: not_match, severity: warning}
      - {type: json_schema, schema: {type: object, required: [name]}}
      - {type: placeholders}                      # [TBD], TODO, lorem ipsum, a trailing "..."

Rule types:

- ``length``: ``min_chars``/``max_chars`` (characters), ``min_words``/``max_words``
  (runs of non-whitespace), ``min_lines``/``max_lines`` (a final newline does
  not start another line). At least one bound; a min never above its max.
- ``required_sections``: every text in ``sections`` must be the text of a
  markdown ATX heading (``#`` to ``######``), compared case-insensitively with
  runs of whitespace collapsed; with ``level``, at exactly that level.
  Headings inside fenced code blocks do not count.
- ``regex``: ``pattern`` (Python ``re`` syntax, searched anywhere in the
  content), ``must``: ``match`` (default) or ``not_match``, ``flags``: any of
  ``i`` (ignore case), ``m`` (``^``/``$`` at every line), ``s`` (``.`` matches
  a newline). Compiled once; a pattern that does not compile makes the config
  invalid. Patterns are trusted config, run as written: one that starts with
  literal text is searched fastest, one with nested repeats can be slow.
- ``json_schema``: the content must be JSON and match ``schema``. jsonschema is
  not a dependency of this project, so :class:`SchemaNode` implements the
  common keywords: ``type``, ``enum``, ``const``, ``required``,
  ``properties``, ``additionalProperties``, ``items``, ``minItems``,
  ``maxItems``, ``uniqueItems``, ``minLength``, ``maxLength``, ``pattern``,
  ``minimum``, ``maximum``, ``exclusiveMinimum``, ``exclusiveMaximum``,
  ``multipleOf``, ``minProperties``, ``maxProperties``, ``allOf``, ``anyOf``,
  ``oneOf``, ``not``; annotations (``title``, ``description``, ``$schema``,
  ``format``, ...) are accepted and ignored. Any other keyword (``$ref``,
  ``patternProperties``, ...) makes the config invalid rather than being
  silently not enforced.
- ``placeholders``: none of ``patterns`` may appear (literal text; unless
  ``case_sensitive``, the lower-cased pattern in the lower-cased content; as
  whole words where the pattern begins or ends with a letter or digit, so
  ``TODO`` does not match ``todos``; at one place the longest pattern wins,
  so ``[TBD]`` is not also reported as ``TBD``); default
  ``[TBD]``, ``TODO``, ``TBD``, ``FIXME``, ``XXX``, ``lorem ipsum``. With
  ``trailing_ellipsis`` (default true) a ``...`` or ``…`` ending the content or
  a line is a placeholder too.

A failed rule yields one :class:`ValidationIssue` (``rule`` = its type) whose
message says everything that is wrong. A rule set that cannot be built is a
:class:`RulesError` whose ``problems`` name the rule index and what is wrong,
e.g. ``validation[1] (regex): bad pattern '(': missing ), ...``.

:class:`RuleCache` keeps compiled rule sets per ``(config id, config hash)``;
:func:`config_hash` is the version of a loaded config.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import OrderedDict
from typing import Annotated, Any, Iterable, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, TypeAdapter, ValidationError, model_validator

from composition.configs import validation_problems
from contracts.events import ValidationIssue

Severity = Literal["error", "warning"]

DEFAULT_PLACEHOLDERS: tuple[str, ...] = ("[TBD]", "TODO", "TBD", "FIXME", "XXX", "lorem ipsum")
MAX_PATTERN_CHARS = 2000
MAX_SCHEMA_ERRORS = 5  # schema errors listed in one issue (the rest are counted)
MAX_DETAIL_CHARS = 1000  # one issue's message is cut to about this length
_EXCERPT = 60


def _short(value: Any, n: int = _EXCERPT) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    text = " ".join(text.split())
    return repr(text if len(text) <= n else text[: n - 1] + "…")


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


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


# --------------------------------------------------------------------------- a small JSON Schema validator


class SchemaError(ValueError):
    """A schema that cannot be used."""


_JSON_TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")
_ANNOTATIONS = frozenset(
    {"$schema", "$id", "$comment", "title", "description", "default", "examples", "format",
     "deprecated", "readOnly", "writeOnly", "contentMediaType", "contentEncoding"}
)
_KEYWORDS = (
    "type", "enum", "const", "required", "properties", "additionalProperties", "items", "minItems",
    "maxItems", "uniqueItems", "minLength", "maxLength", "pattern", "minimum", "maximum",
    "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "minProperties", "maxProperties",
    "allOf", "anyOf", "oneOf", "not",
)
_KEYWORD_SET = frozenset(_KEYWORDS)


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    if isinstance(v, float):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "array"
    if isinstance(v, dict):
        return "object"
    return type(v).__name__


def _is_type(v: Any, t: str) -> bool:
    if t == "string":
        return isinstance(v, str)
    if t == "object":
        return isinstance(v, dict)
    if t == "array":
        return isinstance(v, list)
    if t == "boolean":
        return isinstance(v, bool)
    if t == "null":
        return v is None
    if isinstance(v, bool):
        return False
    if t == "integer":
        return isinstance(v, int) or (isinstance(v, float) and v.is_integer())
    return isinstance(v, (int, float))  # number


def _json_equal(a: Any, b: Any) -> bool:
    """Equality as JSON sees it: ``true`` is not ``1``, ``1`` is ``1.0``."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def _pointer_token(key: str | int) -> str:
    return str(key).replace("~", "~0").replace("/", "~1")


def _count(schema: dict, key: str, where: str) -> int | None:
    v = schema.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise SchemaError(f"{where}: {key} must be a non-negative integer, got {_short(v)}")
    return v


def _number(schema: dict, key: str, where: str) -> float | None:
    v = schema.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not math.isfinite(v)):
        raise SchemaError(f"{where}: {key} must be a number, got {_short(v)}")
    return v


class SchemaNode:
    """One compiled (sub)schema. Build it with ``SchemaNode(schema)``: raises
    :class:`SchemaError` naming where in the schema the problem is."""

    __slots__ = (
        "always", "types", "enum", "has_const", "const", "required", "properties", "additional",
        "items", "min_items", "max_items", "unique", "min_length", "max_length", "pattern",
        "minimum", "maximum", "xminimum", "xmaximum", "multiple_of", "min_props", "max_props",
        "all_of", "any_of", "one_of", "not_",
    )

    def __init__(self, schema: Any, where: str = "schema"):
        self.always: bool | None = None
        if isinstance(schema, bool):
            self.always = schema
            return
        if not isinstance(schema, dict):
            raise SchemaError(f"{where}: a schema must be an object or a boolean, got {_json_type(schema)}")
        for k in schema:
            if k not in _KEYWORD_SET and k not in _ANNOTATIONS:
                raise SchemaError(
                    f"{where}: unsupported keyword {k!r} (supported: {', '.join(_KEYWORDS)})"
                )
        t = schema.get("type")
        if t is None:
            self.types = None
        else:
            ts = [t] if isinstance(t, str) else t
            if not isinstance(ts, list) or not ts or not all(isinstance(x, str) and x in _JSON_TYPES for x in ts):
                raise SchemaError(f"{where}: type must be one of {', '.join(_JSON_TYPES)} (or a list of them), got {_short(t)}")
            self.types = tuple(ts)
        if "enum" in schema and (not isinstance(schema["enum"], list) or not schema["enum"]):
            raise SchemaError(f"{where}: enum must be a non-empty array")
        self.enum = schema.get("enum")
        self.has_const = "const" in schema
        self.const = schema.get("const")
        req = schema.get("required")
        if req is not None and (not isinstance(req, list) or not all(isinstance(x, str) for x in req)):
            raise SchemaError(f"{where}: required must be an array of property names")
        self.required = tuple(req or ())
        props = schema.get("properties")
        if props is not None and not isinstance(props, dict):
            raise SchemaError(f"{where}: properties must be an object of schemas")
        self.properties = {k: SchemaNode(v, f"{where}.properties.{k}") for k, v in (props or {}).items()}
        add = schema.get("additionalProperties")
        self.additional = None if add is None else SchemaNode(add, f"{where}.additionalProperties")
        items = schema.get("items")
        if isinstance(items, list):
            raise SchemaError(f"{where}: items must be one schema (tuple validation with an array is not supported)")
        self.items = None if items is None else SchemaNode(items, f"{where}.items")
        self.min_items = _count(schema, "minItems", where)
        self.max_items = _count(schema, "maxItems", where)
        self.min_length = _count(schema, "minLength", where)
        self.max_length = _count(schema, "maxLength", where)
        self.min_props = _count(schema, "minProperties", where)
        self.max_props = _count(schema, "maxProperties", where)
        u = schema.get("uniqueItems", False)
        if not isinstance(u, bool):
            raise SchemaError(f"{where}: uniqueItems must be true or false")
        self.unique = u
        p = schema.get("pattern")
        if p is not None:
            if not isinstance(p, str):
                raise SchemaError(f"{where}: pattern must be a string")
            try:
                self.pattern = re.compile(p)
            except re.error as e:
                raise SchemaError(f"{where}: bad pattern {_short(p)}: {e}") from None
        else:
            self.pattern = None
        self.minimum = _number(schema, "minimum", where)
        self.maximum = _number(schema, "maximum", where)
        self.xminimum = _number(schema, "exclusiveMinimum", where)
        self.xmaximum = _number(schema, "exclusiveMaximum", where)
        self.multiple_of = _number(schema, "multipleOf", where)
        if self.multiple_of is not None and self.multiple_of <= 0:
            raise SchemaError(f"{where}: multipleOf must be greater than 0")
        for key in ("allOf", "anyOf", "oneOf"):
            subs = schema.get(key)
            if subs is not None and (not isinstance(subs, list) or not subs):
                raise SchemaError(f"{where}: {key} must be a non-empty array of schemas")
        self.all_of = [SchemaNode(s, f"{where}.allOf[{i}]") for i, s in enumerate(schema.get("allOf") or ())]
        self.any_of = [SchemaNode(s, f"{where}.anyOf[{i}]") for i, s in enumerate(schema.get("anyOf") or ())]
        self.one_of = [SchemaNode(s, f"{where}.oneOf[{i}]") for i, s in enumerate(schema.get("oneOf") or ())]
        self.not_ = SchemaNode(schema["not"], f"{where}.not") if "not" in schema else None

    def errors(self, value: Any, limit: int = 50) -> list[tuple[str, str]]:
        """(JSON pointer, what is wrong) for up to ``limit`` problems."""
        out: list[tuple[str, str]] = []
        self._check(value, "", out, limit)
        return out

    def valid(self, value: Any) -> bool:
        return not self.errors(value, limit=1)

    def _check(self, v: Any, ptr: str, out: list[tuple[str, str]], limit: int) -> None:
        if len(out) >= limit:
            return
        if self.always is not None:
            if not self.always:
                out.append((ptr, "no value is allowed here"))
            return
        if self.types is not None and not any(_is_type(v, t) for t in self.types):
            out.append((ptr, f"expected {' or '.join(self.types)}, got {_json_type(v)}"))
            return
        if self.enum is not None and not any(_json_equal(v, e) for e in self.enum):
            out.append((ptr, f"{_short(v)} is not one of {_short(self.enum)}"))
        if self.has_const and not _json_equal(v, self.const):
            out.append((ptr, f"must be {_short(self.const)}, got {_short(v)}"))
        if isinstance(v, str):
            if self.min_length is not None and len(v) < self.min_length:
                out.append((ptr, f"string has {len(v)} characters, fewer than {self.min_length}"))
            if self.max_length is not None and len(v) > self.max_length:
                out.append((ptr, f"string has {len(v)} characters, more than {self.max_length}"))
            if self.pattern is not None and self.pattern.search(v) is None:
                out.append((ptr, f"{_short(v)} does not match the pattern {self.pattern.pattern!r}"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            if self.minimum is not None and v < self.minimum:
                out.append((ptr, f"{v} is less than the minimum {self.minimum}"))
            if self.maximum is not None and v > self.maximum:
                out.append((ptr, f"{v} is greater than the maximum {self.maximum}"))
            if self.xminimum is not None and v <= self.xminimum:
                out.append((ptr, f"{v} is not greater than {self.xminimum}"))
            if self.xmaximum is not None and v >= self.xmaximum:
                out.append((ptr, f"{v} is not less than {self.xmaximum}"))
            if self.multiple_of is not None:
                q = v / self.multiple_of
                if not (math.isfinite(q) and abs(q - round(q)) < 1e-9):
                    out.append((ptr, f"{v} is not a multiple of {self.multiple_of}"))
        elif isinstance(v, dict):
            for name in self.required:
                if name not in v:
                    out.append((ptr, f"missing required property {name!r}"))
            if self.min_props is not None and len(v) < self.min_props:
                out.append((ptr, f"object has {len(v)} properties, fewer than {self.min_props}"))
            if self.max_props is not None and len(v) > self.max_props:
                out.append((ptr, f"object has {len(v)} properties, more than {self.max_props}"))
            for k, sub in v.items():
                node = self.properties.get(k)
                if node is not None:
                    node._check(sub, f"{ptr}/{_pointer_token(k)}", out, limit)
                elif self.additional is not None:
                    if self.additional.always is False:
                        out.append((ptr, f"property {k!r} is not allowed"))
                    else:
                        self.additional._check(sub, f"{ptr}/{_pointer_token(k)}", out, limit)
        elif isinstance(v, list):
            if self.min_items is not None and len(v) < self.min_items:
                out.append((ptr, f"array has {len(v)} items, fewer than {self.min_items}"))
            if self.max_items is not None and len(v) > self.max_items:
                out.append((ptr, f"array has {len(v)} items, more than {self.max_items}"))
            if self.unique:
                for i in range(1, len(v)):
                    if any(_json_equal(v[i], v[j]) for j in range(i)):
                        out.append((ptr, f"items must be unique; item {i} repeats an earlier one"))
                        break
            if self.items is not None:
                for i, item in enumerate(v):
                    self.items._check(item, f"{ptr}/{i}", out, limit)
        for node in self.all_of:
            node._check(v, ptr, out, limit)
        if self.any_of and not any(node.valid(v) for node in self.any_of):
            out.append((ptr, "matches none of the anyOf schemas"))
        if self.one_of:
            n = sum(1 for node in self.one_of if node.valid(v))
            if n != 1:
                out.append((ptr, f"must match exactly one of the oneOf schemas, matches {n}"))
        if self.not_ is not None and self.not_.valid(v):
            out.append((ptr, "must not match the 'not' schema"))


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
            raise ValueError("a length rule needs at least one of min_chars, max_chars, min_words, max_words, min_lines, max_lines")
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
    _re: re.Pattern | None = PrivateAttr(default=None)

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
        m = self._re.search(c.text)
        if self.must == "match":
            return None if m else f"content does not match {self._shown()}"
        if m is None:
            return None
        return f"content matches {self._shown()} on line {_line_of(c.text, m.start())}: {_short(m.group(0))}"


class JsonSchemaRule(_Rule):
    type: Literal["json_schema"]
    json_schema: dict[str, Any] = Field(alias="schema")
    _node: SchemaNode | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _compile(self) -> "JsonSchemaRule":
        try:
            self._node = SchemaNode(self.json_schema)
        except SchemaError as e:
            raise ValueError(str(e)) from None
        except RecursionError:
            raise ValueError("schema is nested too deeply") from None
        return self

    def check(self, c: Content) -> str | None:
        ok, doc = c.json
        if not ok:
            return f"content is not valid JSON ({doc})"
        try:
            errs = self._node.errors(doc, limit=MAX_SCHEMA_ERRORS + 1)
        except RecursionError:
            return "content is nested too deeply to check against the schema"
        if not errs:
            return None
        shown = [f"{ptr or '(root)'}: {what}" for ptr, what in errs[:MAX_SCHEMA_ERRORS]]
        more = " (and more)" if len(errs) > MAX_SCHEMA_ERRORS else ""
        return "content does not match the JSON schema: " + "; ".join(shown) + more


_ELLIPSIS = r"(?:\.\.\.|…)[ \t\r]*$"


class PlaceholdersRule(_Rule):
    type: Literal["placeholders"]
    patterns: list[Annotated[str, Field(min_length=1, max_length=200)]] = list(DEFAULT_PLACEHOLDERS)
    trailing_ellipsis: bool = True
    case_sensitive: bool = False
    _re: re.Pattern | None = PrivateAttr(default=None)
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
        if not any(key in text for key in self._names) and not (
            self.trailing_ellipsis and ("..." in text or "\u2026" in text)
        ):
            return None
        hits: dict[str, list[int]] = {}  # name -> [count, first line]
        for m in self._re.finditer(text):
            name = self._names.get(m.group(0)) or "trailing ellipsis"
            h = hits.get(name)
            if h is None:
                hits[name] = [1, _line_of(text, m.start())]
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
RULE_TYPES: tuple[str, ...] = tuple(m.model_fields["type"].annotation.__args__[0] for m in RULE_MODELS)

Rule = Annotated[
    Union[LengthRule, RequiredSectionsRule, RegexRule, JsonSchemaRule, PlaceholdersRule],
    Field(discriminator="type"),
]
_rule_adapter: TypeAdapter = TypeAdapter(Rule)


# --------------------------------------------------------------------------- rule sets


class RulesError(ValueError):
    """The ``validation`` list of a config cannot be used. ``problems`` has one
    readable line per problem, each naming the rule index."""

    code = "INVALID_RULES"

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems
        self.message = "; ".join(problems)


def parse_rule(raw: Any, index: int) -> tuple[Any | None, list[str]]:
    """(the rule, []) or (None, problems naming ``validation[index]``)."""
    head = f"validation[{index}]"
    if not isinstance(raw, dict):
        return None, [f"{head}: a rule must be a mapping with a 'type', got {type(raw).__name__}"]
    kind = raw.get("type")
    known = ", ".join(RULE_TYPES)
    if kind is None:
        return None, [f"{head}: the rule has no 'type' (one of: {known})"]
    if kind not in RULE_TYPES:
        return None, [f"{head}: unknown rule type {kind!r} (known: {known})"]
    try:
        return _rule_adapter.validate_python(raw), []
    except ValidationError as e:
        return None, [f"{head} ({kind}): {p}" for p in validation_problems(e, drop=kind)]


class RuleSet:
    """The compiled rules of one config version."""

    __slots__ = ("rules",)

    def __init__(self, rules: Iterable[Any] = ()):
        self.rules = tuple(rules)

    def __len__(self) -> int:
        return len(self.rules)

    def apply(self, text: str) -> list[ValidationIssue]:
        """One issue per failed rule, in rule order."""
        if not self.rules:
            return []
        c = Content(text)
        issues = []
        for rule in self.rules:
            try:
                detail = rule.check(c)
            except Exception as e:  # a bug, or content too deep to analyse: report it, never loop on it
                detail = f"the rule could not be applied: {type(e).__name__}: {e}"
            if detail is None:
                continue
            if len(detail) > MAX_DETAIL_CHARS:
                detail = detail[: MAX_DETAIL_CHARS - 1] + "…"
            msg = f"{rule.message} ({detail})" if rule.message else detail
            issues.append(ValidationIssue(rule=rule.type, severity=rule.severity, message=msg))
        return issues


def compile_rules(raw: Any) -> RuleSet:
    """The rule set of a ``validation`` list; raises :class:`RulesError` listing every problem."""
    if raw is None:
        return RuleSet()
    if not isinstance(raw, list):
        raise RulesError([f"validation: must be a list of rules, got {type(raw).__name__}"])
    rules, problems = [], []
    for i, item in enumerate(raw):
        rule, errs = parse_rule(item, i)
        if rule is not None:
            rules.append(rule)
        problems.extend(errs)
    if problems:
        raise RulesError(problems)
    return RuleSet(rules)


def is_valid(issues: Iterable[ValidationIssue]) -> bool:
    """False when any issue has severity error; warnings never invalidate."""
    return not any(i.severity == "error" for i in issues)


class RuleCache:
    """Compiled rule sets (or the :class:`RulesError`) per ``(config id, config hash)``,
    the ``maxsize`` most recently used."""

    def __init__(self, maxsize: int = 1024):
        self.maxsize = maxsize
        self._cache: OrderedDict[tuple[str, str], RuleSet | RulesError] = OrderedDict()
        self.compiled = 0  # how many times a rule set was built (for tests and info)
        self._hashes: dict[str, tuple[Any, str]] = {}

    def get(self, config_id: str, config_hash: str, raw: Any) -> RuleSet:
        key = (config_id, config_hash)
        hit = self._cache.get(key)
        if hit is None:
            try:
                hit = compile_rules(raw)
            except RulesError as e:
                hit = e
            self.compiled += 1
            self._cache[key] = hit
            if len(self._cache) > self.maxsize:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        if isinstance(hit, RulesError):
            raise hit
        return hit

    def for_config(self, config: Any) -> tuple[str, RuleSet | RulesError]:
        """(config hash, its rule set or the error) for a loaded config. The hash is
        remembered per config object, which the config store keeps while the file
        is unchanged, so a cached lookup costs two dict hits."""
        known = self._hashes.get(config.id)
        if known is not None and known[0] is config:
            chash = known[1]
        else:
            chash = config_hash(config)
            self._hashes[config.id] = (config, chash)
            if len(self._hashes) > self.maxsize:
                self._hashes.pop(next(iter(self._hashes)))
        try:
            return chash, self.get(config.id, chash, config.spec.validation)
        except RulesError as e:
            return chash, e

    def __len__(self) -> int:
        return len(self._cache)


# --------------------------------------------------------------------------- config versions


def _canonical(doc: Any) -> bytes:
    try:
        return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode()
    except TypeError:  # keys of mixed types deep in a context: keep their order instead
        return json.dumps(doc, separators=(",", ":"), ensure_ascii=False, default=str).encode()


def config_hash(config: Any) -> str:
    """``sha256:<hex>`` of a loaded config: its parsed content (so reformatting the
    file or editing a comment is not a new version) and its template source."""
    h = hashlib.sha256(_canonical(config.spec.model_dump(mode="json")))
    h.update(b"\0")
    h.update((config.template_hash or "").encode())
    return "sha256:" + h.hexdigest()


def error_hash(code: str, message: str) -> str:
    """The version of a config that cannot be loaded: its error (the same broken file
    gives the same error; a different breakage gives a different one)."""
    return "sha256:" + hashlib.sha256(f"{code}\0{message}".encode("utf-8", "surrogatepass")).hexdigest()
