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
# How a run (an artifact or a batch) ended. Consumers written before cancel and deadlines
# existed decode "cancelled" / "timed_out" only if they accept unknown strings.
RunStatus = Literal["success", "error", "cancelled", "timed_out"]
DeadlineS = Annotated[
    float,
    Meta(
        gt=0,
        le=7 * 24 * 3600,
        description="the run must be complete this many seconds after the assembler accepts it; "
        "past that it ends as timed_out (default: the config's deadline_s, else none)",
    ),
]
CallbackUrl = Annotated[
    str, Meta(max_length=2048, description="POST the outcome here (signed); only to hosts on the operator's allow-list")
]


class ErrorInfo(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Why something failed: a stable machine code and a message for people."""

    code: Annotated[str, Meta(description="stable, UPPER_SNAKE error code, e.g. CONFIG_NOT_FOUND")]
    message: str


class Origin(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The larger piece of work a generation belongs to; echoed by every outcome."""

    kind: Literal["artifact", "batch"]
    id: Annotated[str, Meta(description="id of the artifact.requested / batch.requested event")]
    key: Annotated[str, Meta(description="the part id, or the item index as a string")]


class GenerationRequested(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Please render content config ``content_config_id`` with ``context``.

    The CloudEvent id of this request is the ``request_id`` of its outcome.
    """

    content_config_id: ConfigId
    context: dict[str, Any] = {}
    origin: Origin | None = None
    no_cache: Annotated[
        bool, Meta(description="true: render afresh, never serve this request from the result cache")
    ] = False
    callback_url: CallbackUrl | None = None


class TokenUsage(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Tokens a model call used (what it costs)."""

    input_tokens: int
    output_tokens: int


class ContentGenerated(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The outcome of one generation request, success or error: there is always one."""

    request_id: Annotated[str, Meta(description="id of the chora.generation.requested event")]
    content_config_id: str
    status: Status
    generator_type: str | None = None
    duration_ms: float = 0.0
    content: str | None = None
    content_hash: Annotated[str | None, Meta(description="sha256:<hex> of the UTF-8 content")] = None
    content_length: Annotated[int | None, Meta(description="length in characters")] = None
    content_ref: Annotated[str | None, Meta(description="Object Store name when the content travels by reference")] = (
        None
    )
    error: ErrorInfo | None = None
    origin: Origin | None = None
    cached: Annotated[
        bool | None, Meta(description="success only: true when the content was not rendered for this request")
    ] = None
    # Generators that call a model (code_generation): which model answered, why it stopped, what it used.
    model: str | None = None
    stop_reason: Annotated[str | None, Meta(description="e.g. end_turn, max_tokens, stop_sequence")] = None
    usage: TokenUsage | None = None
    cache_key: Annotated[
        str | None,
        Meta(description="the result cache entry this request wrote (a run that ends badly has it removed)"),
    ] = None


class ValidationIssue(msgspec.Struct, kw_only=True, omit_defaults=True):
    rule: Annotated[
        str, Meta(description="rule type, e.g. length, required_sections, regex, json_schema, placeholders")
    ]
    severity: Literal["error", "warning"]
    message: str


class ContentValidated(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The validator's verdict on one successful content_generated.

    ``valid`` is False when any issue has severity error. The content (or its
    reference) is carried on, so that consumers need only this event.
    """

    request_id: str
    content_config_id: str
    valid: bool
    issues: list[ValidationIssue] = []
    content: str | None = None
    content_hash: str | None = None
    content_length: int | None = None
    content_ref: str | None = None
    origin: Origin | None = None


class ConfigValidated(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A content config version checked by the validator: reported once per config version,
    valid or not. Status success carries the result (its rules, and warnings if any); status
    error says why the config cannot be used (its rules are wrong, or it cannot be loaded)."""

    content_config_id: str
    status: Status
    config_hash: Annotated[
        str | None, Meta(description="sha256:<hex> naming the config version (of the error, if it cannot be loaded)")
    ] = None
    error: ErrorInfo | None = None
    rule_count: Annotated[int, Meta(ge=0, description="success: how many validation rules the config has")] = 0
    rule_types: Annotated[list[str], Meta(description="success: the type of each rule, in order")] = []
    warnings: Annotated[
        list[str], Meta(description="success: what is worth a look but does not make the config invalid")
    ] = []


class ArtifactRequested(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Please assemble artifact config ``artifact_id`` (its id doubles as the run id)."""

    artifact_id: ConfigId
    context: dict[str, Any] = {}
    callback_url: CallbackUrl | None = None
    deadline_s: DeadlineS | None = None


class ArtifactAssembled(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The outcome of one artifact request, published exactly once."""

    request_id: str
    artifact_id: str
    status: RunStatus
    parts_count: int = 0
    duration_ms: float = 0.0
    content: str | None = None
    content_hash: str | None = None
    content_length: int | None = None
    content_ref: str | None = None
    omitted_parts: list[str] = []
    failed_part: str | None = None
    error: ErrorInfo | None = None
    compensated_parts: Annotated[
        list[str], Meta(description="ids of the parts whose effects were compensated (run not successful)")
    ] = []


class BatchItem(msgspec.Struct, kw_only=True, omit_defaults=True):
    content_config_id: ConfigId
    context: dict[str, Any] = {}


MAX_BATCH_ITEMS = 100_000
BatchItems = Annotated[list[BatchItem], Meta(max_length=MAX_BATCH_ITEMS)]


class BatchRequested(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Generate every item; the event id is the batch id.

    The items travel inline (``items``) or, when they would make the event too large,
    by reference (``items_ref``: an Object Store object holding the JSON list of items);
    exactly one of the two.
    """

    items: BatchItems = []
    items_ref: Annotated[
        str | None, Meta(description="Object Store name of the JSON list of items, instead of items")
    ] = None
    item_count: Annotated[int, Meta(ge=1, le=MAX_BATCH_ITEMS, description="how many items items_ref holds")] | None = (
        None
    )
    context: dict[str, Any] = {}
    continue_on_error: bool = True
    callback_url: CallbackUrl | None = None
    deadline_s: DeadlineS | None = None

    def __post_init__(self) -> None:
        if self.items_ref is None and not self.items:
            raise ValueError("a batch needs at least one item (items, or items_ref)")
        if self.items_ref is not None and self.items:
            raise ValueError("items and items_ref are exclusive")


class BatchItemOutcome(msgspec.Struct, kw_only=True, omit_defaults=True):
    index: int
    content_config_id: str
    status: Literal["success", "error", "skipped"]
    request_id: str | None = None
    content_hash: str | None = None
    error: ErrorInfo | None = None


class BatchCompleted(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Every item has an outcome (or the batch stopped on an error). Published exactly once."""

    batch_id: str
    status: RunStatus
    total: int
    successful: int
    failed: int
    skipped: int = 0
    duration_ms: float = 0.0
    items: list[BatchItemOutcome] | None = None
    items_ref: Annotated[str | None, Meta(description="Object Store name of the JSON list of item outcomes")] = None
    error: ErrorInfo | None = None
    compensated_parts: Annotated[
        list[str], Meta(description="indexes (as strings) of the items whose effects were compensated")
    ] = []


class CancelRequested(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Please stop run ``id`` (an artifact or batch request id): nothing more is generated
    for it, its effects are compensated, and its completion says ``cancelled``.

    Cancelling a run that has already completed (or that does not exist) changes nothing.
    """

    kind: Literal["artifact", "batch"]
    id: Annotated[str, Meta(min_length=1, max_length=256, description="id of the artifact / batch request")]
    reason: Annotated[str, Meta(max_length=500)] | None = None


class DeadlineRequested(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The assembler's own timer: end run ``id`` as ``timed_out`` at ``at`` if it is still open.

    Published by the assembler when it accepts a run with a deadline, and read back by
    it (durable ``assembler-deadlines``), which holds it until ``at`` (a nak with that delay)."""

    kind: Literal["artifact", "batch"]
    id: Annotated[str, Meta(description="id of the artifact / batch request")]
    at: Annotated[float, Meta(description="the deadline, Unix time in seconds")]


class Effect(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One step's effect that a compensation undoes."""

    key: Annotated[str, Meta(description="the part id, or the item index as a string")]
    cache_key: Annotated[str | None, Meta(description="a result cache entry to remove")] = None
    content_ref: Annotated[str | None, Meta(description="an Object Store object to delete")] = None


class CompensationRequested(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Undo these effects of run ``id``, in this order (the reverse of the order they were
    made). A run's effects travel in ``chunks`` requests of at most 1,000 effects each."""

    kind: Literal["artifact", "batch"]
    id: Annotated[str, Meta(description="id of the artifact / batch request")]
    chunk: Annotated[int, Meta(ge=0)] = 0
    chunks: Annotated[int, Meta(ge=1)] = 1
    effects: list[Effect] = []


class EffectsCompensated(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The effects of one compensation request are undone: the compensating notification
    of the outputs a run withdrew (a webhook subscription may take it like any other fact)."""

    kind: Literal["artifact", "batch"]
    id: Annotated[str, Meta(description="id of the artifact / batch request")]
    chunk: int = 0
    chunks: int = 1
    compensated: Annotated[list[str], Meta(description="the keys of the effects undone, in the order undone")] = []
    failed: Annotated[list[str], Meta(description="keys whose effects could not be undone")] = []


class NotificationDelivered(msgspec.Struct, kw_only=True, omit_defaults=True):
    subscription: str
    event_id: str
    event_type: str
    attempts: int
    status_code: int
    duration_ms: float


class NotificationFailed(msgspec.Struct, kw_only=True, omit_defaults=True):
    subscription: str
    event_id: str
    event_type: str
    attempts: int
    error: ErrorInfo
    dead_lettered: bool = True
