"""Subscription filters: which events, by the values of their data fields.

```yaml
filters: {status: [error], content_config_id: [release-notes]}   # every field listed must match
filters:                                                         # or a list: any one of them
  - {status: [error]}                  # content_generated, artifact_assembled, batch_completed errors
  - {valid: [false]}                   # content_validated with invalid content
```

A filter maps a field of the event's data (a dotted path into nested
objects, e.g. ``error.code``) to the values it may have. The rules:

- a field the event does not have (or that is null) does NOT match: ``status:
  [error]`` never lets a ``content_validated`` through, which has no status;
- values compare with their type: ``valid: [false]`` is the boolean (YAML
  ``false``), never the string ``"false"`` or the number 0;
- a path does not go into lists (``issues.severity`` matches nothing).

Each path and value is checked against the event types of the subscription
when the file is loaded: a field none of them has, or a value the field can
never take (``status: [eror]``, ``valid: ["false"]``), is an error there and
then instead of a subscription that silently never fires.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

import msgspec
from msgspec import inspect as mi
from pydantic import Field, StrictBool, StrictFloat, StrictInt, StrictStr, StringConstraints

from contracts.catalogue import CATALOGUE

FieldPath = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*$", max_length=200)]
Value = StrictBool | StrictInt | StrictFloat | StrictStr
#: one filter: field path -> allowed values; all of its fields must match
Filter = dict[FieldPath, Annotated[list[Value], Field(min_length=1, max_length=1000)]]

_MISSING = object()


def _value(data: Any, path: str) -> Any:
    for name in path.split("."):
        if isinstance(data, Mapping):
            data = data.get(name, _MISSING)
        elif isinstance(data, msgspec.Struct):
            data = getattr(data, name, _MISSING)
        else:
            return _MISSING
        if data is None or data is _MISSING:
            return _MISSING
    return data


def _same(a: Any, b: Any) -> bool:
    return isinstance(a, bool) == isinstance(b, bool) and a == b


def matches(filters: list[Filter], data: Any) -> bool:
    """Whether ``data`` passes any of ``filters`` (no filters: everything passes)."""
    if not filters:
        return True
    return any(all(any(_same(_value(data, path), v) for v in allowed) for path, allowed in f.items()) for f in filters)


# --------------------------------------------------------------------------- checking a config


def _field_type(t: mi.Type, path: str) -> mi.Type | None:
    """The type at ``path`` in ``t`` (a struct), None if there is no such field.
    Below a free-form mapping (e.g. ``context``) anything goes: AnyType."""
    for name in path.split("."):
        if isinstance(t, mi.Metadata):
            t = t.type
        if isinstance(t, (mi.DictType, mi.AnyType)):
            return mi.AnyType()
        structs = [u for u in (t.types if isinstance(t, mi.UnionType) else (t,)) if isinstance(u, mi.StructType)]
        field = next((f for s in structs for f in s.fields if f.name == name), None)
        if field is None:
            return None
        t = field.type
    return t


def _can_be(t: mi.Type, value: Any) -> bool:
    if isinstance(t, mi.Metadata):  # Annotated[..., Meta(...)]
        return _can_be(t.type, value)
    if isinstance(t, mi.UnionType):
        return any(_can_be(u, value) for u in t.types)
    if isinstance(t, mi.BoolType):
        return isinstance(value, bool)
    if isinstance(t, mi.LiteralType):
        return any(_same(value, v) for v in t.values)
    if isinstance(t, (mi.IntType, mi.FloatType)):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(t, mi.StrType):
        return isinstance(value, str)
    return isinstance(t, mi.AnyType)  # lists, nested objects, ...: no single value matches them


def check(filters: list[Filter], event_types: tuple[str, ...]) -> None:
    """Raise ValueError naming the field if a filter can never match an event of ``event_types``."""
    structs = [mi.type_info(CATALOGUE[t].struct) for t in event_types]
    for f in filters:
        for path, allowed in f.items():
            types = [ft for ft in (_field_type(s, path) for s in structs) if ft is not None]
            if not types:
                raise ValueError(f"field {path!r} is in none of the subscribed events ({', '.join(event_types)})")
            for v in allowed:
                if not any(_can_be(t, v) for t in types):
                    boolean = any(isinstance(getattr(t, "type", t), mi.BoolType) for t in types)
                    hint = " (a boolean: write true or false, without quotes)" if boolean else ""
                    raise ValueError(f"field {path!r} is never {v!r} in the subscribed events{hint}")
