"""The JSON Schema subset of the ``json_schema`` rule (see :mod:`services.validator.rules`)."""

from __future__ import annotations

import math
import re
from typing import Any

from services.validator.rules.common import short


class SchemaError(ValueError):
    """A schema that cannot be used."""


_JSON_TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")
_ANNOTATIONS = frozenset(
    {
        "$schema",
        "$id",
        "$comment",
        "title",
        "description",
        "default",
        "examples",
        "format",
        "deprecated",
        "readOnly",
        "writeOnly",
        "contentMediaType",
        "contentEncoding",
    }
)
_KEYWORDS = (
    "type",
    "enum",
    "const",
    "required",
    "properties",
    "additionalProperties",
    "items",
    "minItems",
    "maxItems",
    "uniqueItems",
    "minLength",
    "maxLength",
    "pattern",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "multipleOf",
    "minProperties",
    "maxProperties",
    "allOf",
    "anyOf",
    "oneOf",
    "not",
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
        raise SchemaError(f"{where}: {key} must be a non-negative integer, got {short(v)}")
    return v


def _number(schema: dict, key: str, where: str) -> float | None:
    v = schema.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not math.isfinite(v)):
        raise SchemaError(f"{where}: {key} must be a number, got {short(v)}")
    return v


class SchemaNode:
    """One compiled (sub)schema. Build it with ``SchemaNode(schema)``: raises
    :class:`SchemaError` naming where in the schema the problem is."""

    __slots__ = (
        "always",
        "types",
        "enum",
        "has_const",
        "const",
        "required",
        "properties",
        "additional",
        "items",
        "min_items",
        "max_items",
        "unique",
        "min_length",
        "max_length",
        "pattern",
        "minimum",
        "maximum",
        "xminimum",
        "xmaximum",
        "multiple_of",
        "min_props",
        "max_props",
        "all_of",
        "any_of",
        "one_of",
        "not_",
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
                raise SchemaError(f"{where}: unsupported keyword {k!r} (supported: {', '.join(_KEYWORDS)})")
        t = schema.get("type")
        if t is None:
            self.types = None
        else:
            ts = [t] if isinstance(t, str) else t
            if not isinstance(ts, list) or not ts or not all(isinstance(x, str) and x in _JSON_TYPES for x in ts):
                raise SchemaError(
                    f"{where}: type must be one of {', '.join(_JSON_TYPES)} (or a list of them), got {short(t)}"
                )
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
        self.pattern: re.Pattern[str] | None = None
        if p is not None:
            if not isinstance(p, str):
                raise SchemaError(f"{where}: pattern must be a string")
            try:
                self.pattern = re.compile(p)
            except re.error as e:
                raise SchemaError(f"{where}: bad pattern {short(p)}: {e}") from None
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
            out.append((ptr, f"{short(v)} is not one of {short(self.enum)}"))
        if self.has_const and not _json_equal(v, self.const):
            out.append((ptr, f"must be {short(self.const)}, got {short(v)}"))
        if isinstance(v, str):
            if self.min_length is not None and len(v) < self.min_length:
                out.append((ptr, f"string has {len(v)} characters, fewer than {self.min_length}"))
            if self.max_length is not None and len(v) > self.max_length:
                out.append((ptr, f"string has {len(v)} characters, more than {self.max_length}"))
            if self.pattern is not None and self.pattern.search(v) is None:
                out.append((ptr, f"{short(v)} does not match the pattern {self.pattern.pattern!r}"))
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
