"""The ``json_schema`` rule's engine: the ``jsonschema`` library, bounded (see :mod:`services.validator.rules`).

- Draft 2020-12 unless the schema's ``$schema`` names another draft (4, 6, 7, 2019-09).
- ``$ref``/``$defs`` (and ``$id``, ``$anchor``, ``$dynamicRef``) resolve inside the schema
  and to the published meta-schemas; nothing is ever fetched: the registry has no
  retriever, and a reference that does not resolve offline makes the schema invalid
  when the config is loaded, not when the first document arrives.
- ``format`` is checked (the draft's FormatChecker with the checkers available offline).
- The schema itself must be valid against its meta-schema.
- Validation runs on the validator's event loop, so a document is bounded before it is
  checked: at most :data:`MAX_DOC_CHARS` characters, :data:`MAX_DOC_DEPTH` levels of
  nesting and :data:`MAX_DOC_VALUES` values; ``uniqueItems`` is checked in linear time
  (the library falls back to comparing every pair for arrays of objects).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from urllib.parse import urljoin

from jsonschema import exceptions as js_exceptions
from jsonschema import validators
from jsonschema.protocols import Validator
from jsonschema_specifications import REGISTRY as META_SCHEMAS
from referencing import Registry, Resource
from referencing.exceptions import Unresolvable
from referencing.jsonschema import DRAFT202012, specification_with

from services.validator.rules.common import short

MAX_DOC_CHARS = 1_000_000
MAX_DOC_DEPTH = 64
MAX_DOC_VALUES = 50_000
_BASE = "urn:chora:json-schema-rule"  # the base URI of a schema without an absolute $id
_NOT_KEYWORDS = frozenset({"enum", "const", "examples", "default"})  # values that are data, not schemas


_UNKNOWN: Any = object()  # validator_for() returns it for a $schema it does not know


class SchemaError(ValueError):
    """A schema that cannot be used."""


class DocumentTooBig(ValueError):
    """A document past one of the bounds: not checked."""


class SchemaFailed(ValueError):
    """The schema could not be applied to a document (e.g. a dynamic reference that resolves
    only at validation time and does not): a verdict, not a crash of the validator."""


def _canonical(v: Any) -> Any:
    """A hashable form in which JSON-equal values are equal: 1 == 1.0, true != 1, key order ignored."""
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return (type(v).__name__, v)
    if isinstance(v, (int, float)):
        return ("number", int(v) if isinstance(v, float) and v.is_integer() else v)
    if isinstance(v, list):
        return ("array", tuple(_canonical(x) for x in v))
    if isinstance(v, dict):
        return ("object", frozenset((k, _canonical(x)) for k, x in v.items()))
    return ("other", repr(v))


def _unique_items(validator: Any, unique: Any, instance: Any, schema: Any) -> Iterator[js_exceptions.ValidationError]:
    if not unique or not validator.is_type(instance, "array"):
        return
    seen: set[Any] = set()
    for i, item in enumerate(instance):
        key = _canonical(item)
        if key in seen:
            yield js_exceptions.ValidationError(f"has non-unique elements (item {i} repeats an earlier one)")
            return
        seen.add(key)


def _walk_refs(node: Any, base: str, out: list[tuple[str, str]]) -> None:
    """(base URI, reference) of every $ref / $dynamicRef in a schema, following $id."""
    stack = [(node, base)]
    while stack:
        node, base = stack.pop()
        if isinstance(node, list):
            stack.extend((x, base) for x in node)
            continue
        if not isinstance(node, dict):
            continue
        if isinstance(node.get("$id"), str):
            base = urljoin(base, node["$id"])
        for key, value in node.items():
            if key in ("$ref", "$dynamicRef") and isinstance(value, str):
                out.append((base, value))
            elif key not in _NOT_KEYWORDS:
                stack.append((value, base))


def _check_bounds(doc: Any) -> None:
    count = 0
    stack = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > MAX_DOC_VALUES:
            raise DocumentTooBig(f"the document has more than {MAX_DOC_VALUES} values, the most a schema is checked on")
        if isinstance(node, (dict, list)):
            if depth > MAX_DOC_DEPTH:
                raise DocumentTooBig(f"the document is nested deeper than {MAX_DOC_DEPTH} levels")
            stack.extend((x, depth + 1) for x in (node.values() if isinstance(node, dict) else node))


def _check_refs(schema: Any, root: str, registry: Registry[Any]) -> None:
    refs: list[tuple[str, str]] = []
    _walk_refs(schema, root, refs)
    for base, ref in refs:
        try:
            registry.resolver(base_uri=base).lookup(ref)
        except Unresolvable:
            raise SchemaError(
                f"$ref {ref!r} does not resolve inside the schema; references are resolved offline "
                "(to $defs, $id or $anchor in the schema itself): nothing is fetched"
            ) from None


class CompiledSchema:
    """A checked schema and its validator. ``CompiledSchema(schema)`` raises :class:`SchemaError`."""

    def __init__(self, schema: dict[str, Any]):
        if not isinstance(schema, dict):
            raise SchemaError(f"a schema must be an object, got {short(schema)}")
        named = schema.get("$schema")
        known: Any = None if named is None else _UNKNOWN
        if isinstance(named, str):
            known = validators.validator_for(schema, default=_UNKNOWN)
        if known is _UNKNOWN:
            raise SchemaError(
                f"$schema {short(schema['$schema'])} is not a draft this validator knows "
                "(2020-12, 2019-09, 7, 6, 4 or 3 by their meta-schema URIs; leave it out for 2020-12)"
            )
        cls = known or validators.Draft202012Validator
        try:
            cls.check_schema(schema)
        except js_exceptions.SchemaError as e:
            where = e.json_path.replace("$", "schema", 1)
            raise SchemaError(f"{where}: {e.message} (keyword {e.validator!r} of the meta-schema)") from None
        # uniqueItems in linear time; everything else as the draft says.
        self._cls: Any = validators.extend(cls, {"uniqueItems": _unique_items})
        spec = specification_with(cls.META_SCHEMA.get("$schema", ""), default=DRAFT202012)
        resource: Resource[Any] = spec.create_resource(schema)
        root = resource.id() or _BASE
        registry: Registry[Any] = Registry().with_resource(root, resource).crawl()
        _check_refs(schema, root, META_SCHEMAS.combine(registry))
        self.validator: Validator = self._cls(schema, registry=registry, format_checker=cls.FORMAT_CHECKER)
        self.draft = cls.__name__

    def errors(self, doc: Any, limit: int) -> list[tuple[str, str]]:
        """(JSON path, what is wrong and by which keyword) for up to ``limit`` problems.
        Raises :class:`DocumentTooBig` for a document past the bounds."""
        _check_bounds(doc)
        out: list[tuple[str, str]] = []
        try:
            for error in self.validator.iter_errors(doc):
                # For anyOf/oneOf, the most relevant failure inside (e.g. the array branch of
                # "array or null") says more than "is not valid under any of the given schemas".
                error = js_exceptions.best_match([error]) or error
                # error.json_path: where in the document, e.g. $.items[2].name
                out.append((error.json_path, f"{_cut(error.message)} ({error.validator})"))
                if len(out) >= limit:
                    break
        except (RecursionError, DocumentTooBig):
            raise
        except Exception as e:
            raise SchemaFailed(f"{type(e).__name__}: {_cut(str(e))}") from None
        return out


def _cut(message: str, n: int = 200) -> str:
    return message if len(message) <= n else message[: n - 1] + "…"
