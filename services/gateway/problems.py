"""RFC 9457 problem details: every error the gateway answers, with the events' codes.

``{"type", "title", "status", "detail", "code", "trace_id", ...}`` as
``application/problem+json``; ``type`` is ``https://chora-compose.dev/problems/<code>``
(an identifier, like the schemas' ``$id``), ``code`` the stable UPPER_SNAKE code.
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from services.gateway.model import GatewayError

PROBLEM_TYPE = "https://chora-compose.dev/problems/"
MEDIA_TYPE = "application/problem+json"


def problem_doc(
    status: int, code: str, detail: str, *, title: str | None = None, trace_id: str | None = None, **extra: Any
) -> dict[str, Any]:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    doc: dict[str, Any] = {
        "type": PROBLEM_TYPE + code.lower().replace("_", "-"),
        "title": title or phrase,
        "status": status,
        "detail": detail,
        "code": code,
    }
    if trace_id:
        doc["trace_id"] = trace_id
    doc.update(extra)
    return doc


def problem(
    status: int,
    code: str,
    detail: str,
    *,
    trace_id: str | None = None,
    title: str | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> Response:
    doc = problem_doc(status, code, detail, title=title, trace_id=trace_id, **extra)
    body = json.dumps(doc, separators=(",", ":"), default=str).encode()
    return Response(body, status_code=status, media_type=MEDIA_TYPE, headers=headers)


def from_error(e: GatewayError, trace_id: str | None) -> Response:
    return problem(e.status, e.code, e.detail, trace_id=trace_id, title=e.title, headers=e.headers, **e.extra)


def trace_of(request: Request) -> str | None:
    trace = getattr(request.state, "trace", None)
    return getattr(trace, "trace_id", None)


# FastAPI/Starlette's own errors, as problems with a code
HTTP_CODES = {
    400: "BAD_REQUEST",
    401: "UNAUTHORIZED",
    403: "FORBIDDEN",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    406: "NOT_ACCEPTABLE",
    413: "BODY_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
    422: "INVALID_REQUEST",
    429: "RATE_LIMITED",
}
