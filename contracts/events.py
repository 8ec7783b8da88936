"""Event payloads: the ``data`` of each CloudEvent, one Struct per event type.

Fields are only ever added, with defaults, so older consumers keep decoding
newer events (unknown fields are ignored on decode).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

ConfigId = Annotated[str, Meta(min_length=1, max_length=128, description="content config id, ^[a-z][a-z0-9-]*$")]
Status = Literal["success", "error"]


class ErrorInfo(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Why something failed: a stable machine code and a message for people."""

    code: Annotated[str, Meta(description="stable, UPPER_SNAKE error code, e.g. CONFIG_NOT_FOUND")]
    message: str


class GenerationRequested(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Please render content config ``content_config_id`` with ``context``.

    The CloudEvent id of this request is the ``request_id`` of its outcome.
    """

    content_config_id: ConfigId
    context: dict[str, Any] = {}


class ContentGenerated(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The outcome of one generation request, success or error: there is always one."""

    request_id: Annotated[str, Meta(description="id of the chora.generation.requested event")]
    content_config_id: str
    status: Status
    generator_type: str | None = None
    duration_ms: float = 0.0
    content: str | None = None
    content_hash: Annotated[str | None, Meta(description="sha256:<hex> of the UTF-8 content")] = None
    content_length: int | None = None
    error: ErrorInfo | None = None
