"""The event catalogue: every event type, its subject and its payload Struct.

Subjects are derived from types: ``chora.content_generated`` travels on
``<prefix>.content_generated``; with the default prefix ``chora`` the subject
equals the type. Tests use their own prefix so that runs never meet.
"""

from __future__ import annotations

import builtins
import re
from dataclasses import dataclass

import msgspec

from contracts.events import (
    ArtifactAssembled,
    ArtifactRequested,
    BatchCompleted,
    BatchRequested,
    CancelRequested,
    CompensationRequested,
    ConfigValidated,
    ContentGenerated,
    ContentValidated,
    DeadlineRequested,
    EffectsCompensated,
    GenerationRequested,
    NotificationDelivered,
    NotificationFailed,
)

TYPE_PREFIX = "chora."


@dataclass(frozen=True, slots=True)
class EventSpec:
    type: str
    struct: builtins.type[msgspec.Struct]  # (the field `type` hides the builtin in this body)
    description: str
    kind: str  # "request" or "fact"

    @property
    def suffix(self) -> str:
        return self.type.removeprefix(TYPE_PREFIX)

    def subject(self, prefix: str = "chora") -> str:
        return f"{prefix}.{self.suffix}"


GENERATION_REQUESTED = "chora.generation.requested"
CONTENT_GENERATED = "chora.content_generated"
CONTENT_VALIDATED = "chora.content_validated"
CONFIG_VALIDATED = "chora.config_validated"
ARTIFACT_REQUESTED = "chora.artifact.requested"
ARTIFACT_ASSEMBLED = "chora.artifact_assembled"
BATCH_REQUESTED = "chora.batch.requested"
BATCH_COMPLETED = "chora.batch_completed"
CANCEL_REQUESTED = "chora.cancel.requested"
DEADLINE_REQUESTED = "chora.deadline.requested"
COMPENSATION_REQUESTED = "chora.compensation.requested"
EFFECTS_COMPENSATED = "chora.effects_compensated"
NOTIFICATION_DELIVERED = "chora.notification_delivered"
NOTIFICATION_FAILED = "chora.notification_failed"

CATALOGUE: dict[str, EventSpec] = {
    s.type: s
    for s in (
        EventSpec(GENERATION_REQUESTED, GenerationRequested, "Render one content config.", "request"),
        EventSpec(CONTENT_GENERATED, ContentGenerated, "Outcome of a generation request.", "fact"),
        EventSpec(CONTENT_VALIDATED, ContentValidated, "Validation verdict on generated content.", "fact"),
        EventSpec(
            CONFIG_VALIDATED,
            ConfigValidated,
            "A content config version was checked: once per version, valid (with its rules) or not (with why).",
            "fact",
        ),
        EventSpec(ARTIFACT_REQUESTED, ArtifactRequested, "Assemble an artifact from its parts.", "request"),
        EventSpec(ARTIFACT_ASSEMBLED, ArtifactAssembled, "Outcome of an artifact request.", "fact"),
        EventSpec(BATCH_REQUESTED, BatchRequested, "Generate many items as one batch.", "request"),
        EventSpec(BATCH_COMPLETED, BatchCompleted, "Outcome of a batch: every item accounted for.", "fact"),
        EventSpec(CANCEL_REQUESTED, CancelRequested, "Stop an artifact or batch run and compensate it.", "request"),
        EventSpec(DEADLINE_REQUESTED, DeadlineRequested, "The assembler's timer: time a run out when due.", "request"),
        EventSpec(
            COMPENSATION_REQUESTED, CompensationRequested, "Undo the effects of a run that ended badly.", "request"
        ),
        EventSpec(EFFECTS_COMPENSATED, EffectsCompensated, "Effects of a run were undone (withdrawn).", "fact"),
        EventSpec(NOTIFICATION_DELIVERED, NotificationDelivered, "An event reached a webhook.", "fact"),
        EventSpec(NOTIFICATION_FAILED, NotificationFailed, "An event could not be delivered to a webhook.", "fact"),
    )
}


def spec_for(event_type: str) -> EventSpec | None:
    return CATALOGUE.get(event_type)


def subject_for(event_type: str, prefix: str = "chora") -> str:
    spec = CATALOGUE.get(event_type)
    if spec is None:
        raise KeyError(f"unknown event type {event_type!r}")
    return spec.subject(prefix)


def all_subjects(prefix: str = "chora") -> list[str]:
    return [s.subject(prefix) for s in CATALOGUE.values()]


def stream_base(prefix: str = "chora") -> str:
    """The stem of the JetStream names under ``prefix``: ``CHORA`` for the events stream
    ``CHORA_EVENTS``, the dead letters ``CHORA_DLQ`` and the buckets ``CHORA_<NAME>``."""
    return re.sub(r"[^A-Za-z0-9_]", "_", prefix).upper()


def events_stream(prefix: str = "chora") -> str:
    """The stream that stores every event under ``prefix``."""
    return stream_base(prefix) + "_EVENTS"
