"""The CloudEvent envelope and its NATS binding.

Binary mode (what chora publishes): every attribute in a ``ce-<name>`` header,
the data as the body. Structured mode (accepted on input): a message whose
``Content-Type`` starts with ``application/cloudevents`` carries the whole
event as JSON in its body. Header values are percent-encoded outside
U+0021..U+007E and for space, ``"`` and ``%``.

Decoding never raises anything but :class:`EnvelopeError`, whose ``code``
says what was wrong; the bus turns it into a dead letter.
"""

from __future__ import annotations

import base64
import hashlib
import re
import time
import uuid
from typing import Any, Mapping

import msgspec

from contracts.catalogue import CATALOGUE
from contracts.tracing import child_traceparent, new_trace_id, parse_traceparent

SPECVERSION = "1.0"
JSON = "application/json"
_CORE = ("id", "source", "specversion", "type", "time", "datacontenttype", "subject", "dataschema")
_NOT_EXTENSIONS = frozenset((*_CORE, "traceid", "traceparent"))
_EXT_NAME = re.compile(r"^[a-z0-9]{1,20}$")
_NEEDS_QUOTING = re.compile(r'[^\x21-\x7e]|["%]')
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_ID_NAMESPACE = uuid.UUID("6f1c2a8e-5d0b-4f2e-9a57-0c1d3b4e5f60")


class EnvelopeError(Exception):
    """A message that is not a valid chora CloudEvent. ``code`` is stable."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class CloudEvent(msgspec.Struct, kw_only=True):
    id: str
    source: str
    type: str
    data: Any = None  # the payload Struct of ``type``
    specversion: str = SPECVERSION
    time: str | None = None
    datacontenttype: str | None = JSON
    subject: str | None = None
    dataschema: str | None = None
    traceid: str | None = None
    traceparent: str | None = None
    extensions: dict[str, str] = {}


# --------------------------------------------------------------------------- building


_second: list = [-1, ""]  # the last whole second formatted, and its text: one strftime per second


def now_rfc3339(ts: float | None = None) -> str:
    ts = time.time() if ts is None else ts
    secs = int(ts)
    if _second[0] != secs:
        _second[:] = [secs, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs))]
    return f"{_second[1]}.{int((ts - secs) * 1e6):06d}Z"


_NS_BYTES = _ID_NAMESPACE.bytes


def derived_id(name: str) -> str:
    """``str(uuid.uuid5(_ID_NAMESPACE, name))``, without the UUID object (a handler makes one per
    outcome): SHA-1 of namespace + name, version 5, RFC 4122 variant."""
    h = bytearray(hashlib.sha1(_NS_BYTES + name.encode("utf-8")).digest()[:16])
    h[6] = (h[6] & 0x0F) | 0x50
    h[8] = (h[8] & 0x3F) | 0x80
    x = h.hex()
    return f"{x[:8]}-{x[8:12]}-{x[12:16]}-{x[16:20]}-{x[20:]}"


def new_event(
    event_type: str,
    data: msgspec.Struct,
    *,
    source: str,
    cause: CloudEvent | None = None,
    trace_id: str | None = None,
    seq: int = 0,
    subject: str | None = None,
    event_id: str | None = None,
) -> CloudEvent:
    """Build an event. With a ``cause``, the id is derived from the cause's id,
    so handling the same cause twice yields the same id (and JetStream drops the
    second publish), and the trace is carried on."""
    if event_id is None:
        if cause is not None:
            event_id = derived_id(f"{cause.id}/{event_type}/{seq}")
        else:
            event_id = str(uuid.uuid4())
    traceid = None
    if cause is not None:
        parsed = parse_traceparent(cause.traceparent) if cause.traceparent else None
        traceid = cause.traceid or (parsed[0] if parsed else None)
    traceid = traceid or trace_id or new_trace_id()
    parent = cause.traceparent if cause else None
    return CloudEvent(
        id=event_id,
        source=source,
        type=event_type,
        data=data,
        time=now_rfc3339(),
        subject=subject,
        traceid=traceid,
        traceparent=child_traceparent(traceid, parent),
    )


# --------------------------------------------------------------------------- encoding

_encoder = msgspec.json.Encoder()


def _quote(value: str) -> str:
    if not _NEEDS_QUOTING.search(value):
        return value
    out = []
    for ch in value:
        if "\x21" <= ch <= "\x7e" and ch not in '"%':
            out.append(ch)
        else:
            out.extend(f"%{b:02X}" for b in ch.encode("utf-8"))
    return "".join(out)


def _unquote(name: str, value: str) -> str:
    if "%" not in value:
        return value
    if _BAD_PERCENT.search(value):
        raise EnvelopeError("BAD_HEADER_ENCODING", f"header {name}: invalid percent-encoding")
    raw = re.sub(rb"%([0-9A-Fa-f]{2})", lambda m: bytes([int(m.group(1), 16)]), value.encode("utf-8"))
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise EnvelopeError("BAD_HEADER_ENCODING", f"header {name}: percent-encoded bytes are not UTF-8") from None


def encode_binary(event: CloudEvent) -> tuple[dict[str, str], bytes]:
    """Headers and body of ``event`` in binary mode. ``Nats-Msg-Id`` is the event id."""
    h = {
        "ce-specversion": event.specversion,
        "ce-id": _quote(event.id),
        "ce-source": _quote(event.source),
        "ce-type": _quote(event.type),
        "Nats-Msg-Id": event.id,
    }
    if event.time:
        h["ce-time"] = event.time
    if event.datacontenttype:
        h["ce-datacontenttype"] = event.datacontenttype
    if event.subject:
        h["ce-subject"] = _quote(event.subject)
    if event.dataschema:
        h["ce-dataschema"] = _quote(event.dataschema)
    if event.traceid:
        h["ce-traceid"] = _quote(event.traceid)
    if event.traceparent:
        h["ce-traceparent"] = event.traceparent
    for k, v in event.extensions.items():
        h["ce-" + k] = _quote(v)
    body = b"" if event.data is None else _encoder.encode(event.data)
    return h, body


def encode_structured(event: CloudEvent) -> tuple[dict[str, str], bytes]:
    """Structured mode: the whole event as JSON (used by tests and foreign producers)."""
    doc: dict[str, Any] = {k: getattr(event, k) for k in _CORE if getattr(event, k) is not None}
    for k in ("traceid", "traceparent"):
        if getattr(event, k):
            doc[k] = getattr(event, k)
    doc.update(event.extensions)
    if event.data is not None:
        doc["data"] = msgspec.to_builtins(event.data)
    return {"Content-Type": "application/cloudevents+json", "Nats-Msg-Id": event.id}, _encoder.encode(doc)


# --------------------------------------------------------------------------- decoding


def _is_json(ct: str) -> bool:
    base = ct.split(";", 1)[0].strip().lower()
    return base == JSON or base == "text/json" or (base.startswith("application/") and base.endswith("+json"))


def _decode_data(event_type: str, body: bytes | Any, *, raw: bool) -> Any:
    spec = CATALOGUE.get(event_type)
    if spec is None:
        raise EnvelopeError("UNKNOWN_TYPE", f"unknown event type {event_type!r}")
    try:
        if raw:
            return msgspec.json.decode(body, type=spec.struct)
        return msgspec.convert(body, spec.struct)
    except msgspec.ValidationError as e:
        raise EnvelopeError("INVALID_DATA", f"data does not match {event_type}: {e}") from None
    except msgspec.DecodeError as e:
        raise EnvelopeError("INVALID_JSON", f"data is not valid JSON: {e}") from None


def _check(attrs: Mapping[str, Any]) -> None:
    for name in ("id", "source", "specversion", "type"):
        v = attrs.get(name)
        if v is None or v == "":
            raise EnvelopeError("MISSING_ATTRIBUTE", f"required attribute {name!r} is missing")
        if not isinstance(v, str):
            raise EnvelopeError("BAD_ATTRIBUTE", f"attribute {name!r} must be a string")
    if attrs["specversion"] != SPECVERSION:
        raise EnvelopeError("BAD_SPECVERSION", f"specversion {attrs['specversion']!r} is not {SPECVERSION!r}")
    ct = attrs.get("datacontenttype")
    if ct is not None and not _is_json(ct):
        raise EnvelopeError("BAD_CONTENT_TYPE", f"datacontenttype {ct!r} is not JSON")


def decode(
    headers: Mapping[str, str] | None, body: bytes, *, max_bytes: int = 1 << 20, typed: bool = True
) -> CloudEvent:
    """Decode a NATS message (binary or structured mode) into a CloudEvent.

    ``typed=False`` (for a mirror, which copies what it reads): the data stays plain JSON
    (a dict, usually), checked neither against its type's Struct nor the catalogue."""
    if len(body) > max_bytes:
        raise EnvelopeError("OVERSIZED", f"body of {len(body)} bytes exceeds the limit of {max_bytes}")
    headers = headers or {}
    attrs: dict[str, str] = {}
    content_type = None
    for k, v in headers.items():
        if k.startswith("ce-") and k.islower():  # as chora writes them: no lower() needed
            attrs[k[3:]] = v if "%" not in v else _unquote(k, v)
            continue
        lk = k.lower()
        if lk.startswith("ce-"):
            name = lk[3:]
            attrs[name] = _unquote(k, v)
        elif lk == "content-type":
            content_type = v
    if content_type and content_type.lower().startswith("application/cloudevents"):
        return _decode_structured(body, typed)
    if content_type and "datacontenttype" not in attrs:
        attrs["datacontenttype"] = content_type
    if not attrs:
        raise EnvelopeError("NOT_A_CLOUDEVENT", "no ce-* headers and no structured-mode Content-Type")
    _check(attrs)
    if not typed:
        return _from_attrs(attrs, _plain_data(body) if body else None)
    data = _decode_data(attrs["type"], body, raw=True) if body else _decode_data(attrs["type"], {}, raw=False)
    return _from_attrs(attrs, data)


def _plain_data(body: bytes) -> Any:
    try:
        return msgspec.json.decode(body)
    except msgspec.DecodeError as e:
        raise EnvelopeError("INVALID_JSON", f"data is not valid JSON: {e}") from None


def _decode_structured(body: bytes, typed: bool = True) -> CloudEvent:
    try:
        doc = msgspec.json.decode(body)
    except msgspec.DecodeError as e:
        raise EnvelopeError("INVALID_JSON", f"structured event is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise EnvelopeError("INVALID_JSON", "structured event must be a JSON object")
    _check(doc)
    if "data_base64" in doc:
        try:
            raw = base64.b64decode(doc["data_base64"], validate=True)
        except (ValueError, TypeError):
            raise EnvelopeError("INVALID_DATA", "data_base64 is not valid base64") from None
        data = _decode_data(doc["type"], raw, raw=True) if typed else _plain_data(raw)
    elif typed:
        data = _decode_data(doc["type"], doc.get("data", {}), raw=False)
    else:
        data = doc.get("data")
    attrs = {}
    for k, v in doc.items():
        if k in ("data", "data_base64"):
            continue
        if not isinstance(v, str):
            v = msgspec.json.encode(v).decode() if not isinstance(v, (int, float, bool)) else str(v).lower()
        attrs[k] = v
    return _from_attrs(attrs, data)


def _from_attrs(attrs: dict[str, str], data: Any) -> CloudEvent:
    ext = {k: v for k, v in attrs.items() if k not in _NOT_EXTENSIONS}
    for k in ext:
        if not _EXT_NAME.match(k):
            raise EnvelopeError("BAD_ATTRIBUTE", f"attribute name {k!r} is not lower-case alphanumeric (1-20)")
    return CloudEvent(
        id=attrs["id"],
        source=attrs["source"],
        type=attrs["type"],
        specversion=attrs["specversion"],
        data=data,
        time=attrs.get("time"),
        datacontenttype=attrs.get("datacontenttype"),
        subject=attrs.get("subject"),
        dataschema=attrs.get("dataschema"),
        traceid=attrs.get("traceid"),
        traceparent=attrs.get("traceparent"),
        extensions=ext,
    )
