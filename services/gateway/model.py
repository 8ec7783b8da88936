"""The values the gateway's operations take and give (re-exported by :mod:`.operations`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from contracts.tracing import new_trace_id, parse_traceparent, valid_trace_id

API_VERSION = "v1"


class GatewayError(Exception):
    """A refused or failed operation: an HTTP status, a stable code and a detail for people.

    ``extra`` holds more members for the problem document (e.g. the outcome of a failed
    generation); ``headers`` more response headers (e.g. Retry-After)."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        *,
        title: str | None = None,
        extra: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(f"{code}: {detail}")
        self.status, self.code, self.detail = status, code, detail
        self.title = title
        self.extra = extra or {}
        self.headers = headers or {}


@dataclass(frozen=True)
class Trace:
    """The trace a request joins: chora's trace id and the caller's W3C traceparent, if any."""

    trace_id: str
    traceparent: str | None = None

    @classmethod
    def parse(cls, trace_id: str | None = None, traceparent: str | None = None) -> "Trace":
        """From ``X-Trace-ID`` and ``traceparent``: a new trace when neither is given; a
        ``traceparent`` that does not parse is ignored (W3C: restart the trace), a bad trace
        id is refused (400 BAD_TRACE_ID)."""
        parent = traceparent if traceparent and parse_traceparent(traceparent.strip()) else None
        if trace_id:
            if not valid_trace_id(trace_id):
                raise GatewayError(400, "BAD_TRACE_ID", "X-Trace-ID must be 1-128 characters of [A-Za-z0-9._:-]")
            return cls(trace_id, parent)
        if parent:
            parsed = parse_traceparent(parent.strip())
            assert parsed is not None
            return cls(parsed[0], parent.strip())
        return cls(new_trace_id())


@dataclass
class Outcome:
    """An outcome event's data, as the caller gets it (content resolved when not too large)."""

    request_id: str
    kind: str
    event_type: str
    trace_id: str | None
    data: dict[str, Any]

    @property
    def ok(self) -> bool:
        return self.data.get("status") == "success"


@dataclass
class Pending:
    """No outcome within the timeout: poll ``location``."""

    request_id: str
    kind: str
    trace_id: str | None

    @property
    def location(self) -> str:
        return f"/{API_VERSION}/requests/{self.request_id}"


@dataclass
class Accepted:
    """A batch taken in: its progress is at ``location``."""

    batch_id: str
    trace_id: str | None
    total: int

    @property
    def location(self) -> str:
        return f"/{API_VERSION}/batches/{self.batch_id}"


class RequestRecord(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What the gateway keeps of a request it published (KV ``req.<id>``)."""

    request_id: str
    kind: str  # generate | assemble | batch
    trace_id: str | None = None
    seq: int = 0  # the request's stream sequence: its outcome comes after it
    created_at: float = 0.0
    state: str = "pending"  # pending | done
    outcome: dict[str, Any] | None = None
    total: int | None = None  # batches: how many items
