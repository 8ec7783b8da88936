"""The event catalogue: every event type, its subject and its payload Struct.

Subjects are derived from types: ``chora.generation.requested`` travels on
``<prefix>.generation.requested``; with the default prefix ``chora`` the subject
equals the type. Tests use their own prefix so that runs never meet.

The outcomes of generations (``content_generated``, ``content_validated``) carry one
more token, the kind of run they belong to (:data:`ORIGIN_KINDS`):
``<prefix>.content_generated.standalone`` for a request of its own,
``.artifact`` for an artifact's part, ``.batch`` for a batch item. The CloudEvents
type is the same on all three; ``<prefix>.content_generated.*`` reads them all.
A consumer that needs only one kind filters on it and is never sent the others
(the assembler reads only the parts and items of its runs).

A request that asks for a callback (its ``callback_url`` is set) travels on its
subject plus the token ``callback``: ``<prefix>.generation.requested.callback``;
one without stays on ``<prefix>.generation.requested``. The notifier, which records
(or, with callbacks off, refuses) callbacks, reads only the ``.callback`` subjects,
so requests without one never reach it. A request whose ``callback_url`` is set but
that came on the plain subject is dead-lettered by the consumer loop that reads it
(:func:`misrouted_callback`): its callback would otherwise never be recorded nor refused.
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

#: The last subject token of an outcome of a generation: the ``origin.kind`` it echoes,
#: or ``standalone`` for a request that is not part of a run.
STANDALONE = "standalone"
ORIGIN_KINDS = (STANDALONE, "artifact", "batch")
#: The last subject token of a request that carries a ``callback_url``.
CALLBACK = "callback"


@dataclass(frozen=True, slots=True)
class EventSpec:
    type: str
    struct: builtins.type[msgspec.Struct]  # (the field `type` hides the builtin in this body)
    description: str
    kind: str  # "request" or "fact"
    by_origin: bool = False  # its subject ends with the kind of run it belongs to (ORIGIN_KINDS)
    by_callback: bool = False  # one with a callback_url travels on <subject>.callback (CALLBACK)

    @property
    def suffix(self) -> str:
        return self.type.removeprefix(TYPE_PREFIX)

    def subject(self, prefix: str = "chora") -> str:
        """The subject every event of the type matches: what a stream, a consumer filter or a
        subscription names (``<prefix>.content_generated.*`` for one split by origin)."""
        return f"{prefix}.{self.suffix}.*" if self.by_origin else f"{prefix}.{self.suffix}"

    def subjects(self, prefix: str = "chora") -> list[str]:
        """Every subject the type travels on: what a stream or a reader of all of them names
        (a request that may ask for a callback has two: plain and ``.callback``)."""
        base = self.subject(prefix)
        return [base, f"{base}.{CALLBACK}"] if self.by_callback else [base]

    def callback_subject(self, prefix: str = "chora") -> str:
        """The subject of a request of the type that carries a ``callback_url``."""
        if not self.by_callback:
            raise ValueError(f"{self.type} has no callback subject")
        return f"{prefix}.{self.suffix}.{CALLBACK}"

    def subject_of(self, prefix: str = "chora", origin_kind: str | None = None) -> str:
        """The subject one event is published on: for a type split by origin, the token of its
        ``origin.kind`` (``standalone`` when it has none)."""
        if not self.by_origin:
            return f"{prefix}.{self.suffix}"
        kind = origin_kind or STANDALONE
        if kind not in ORIGIN_KINDS:
            raise ValueError(f"unknown origin kind {kind!r} (one of {', '.join(ORIGIN_KINDS)})")
        return f"{prefix}.{self.suffix}.{kind}"


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
        EventSpec(GENERATION_REQUESTED, GenerationRequested, "Render one content config.", "request", by_callback=True),
        EventSpec(CONTENT_GENERATED, ContentGenerated, "Outcome of a generation request.", "fact", by_origin=True),
        EventSpec(
            CONTENT_VALIDATED, ContentValidated, "Validation verdict on generated content.", "fact", by_origin=True
        ),
        EventSpec(
            CONFIG_VALIDATED,
            ConfigValidated,
            "A content config version was checked: once per version, valid (with its rules) or not (with why).",
            "fact",
        ),
        EventSpec(
            ARTIFACT_REQUESTED, ArtifactRequested, "Assemble an artifact from its parts.", "request", by_callback=True
        ),
        EventSpec(ARTIFACT_ASSEMBLED, ArtifactAssembled, "Outcome of an artifact request.", "fact"),
        EventSpec(BATCH_REQUESTED, BatchRequested, "Generate many items as one batch.", "request", by_callback=True),
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


def _spec(event_type: str) -> EventSpec:
    spec = CATALOGUE.get(event_type)
    if spec is None:
        raise KeyError(f"unknown event type {event_type!r}")
    return spec


def subject_for(event_type: str, prefix: str = "chora") -> str:
    """The type's subject (see :meth:`EventSpec.subject`). For a request that may ask for a
    callback that is the plain subject only: a reader of every such request names
    :func:`subjects_for`."""
    return _spec(event_type).subject(prefix)


def subjects_for(event_type: str, prefix: str = "chora") -> list[str]:
    """Every subject events of ``event_type`` travel on (see :meth:`EventSpec.subjects`)."""
    return _spec(event_type).subjects(prefix)


def event_subject(event_type: str, data: object, prefix: str = "chora") -> str:
    """The subject an event of ``event_type`` with payload ``data`` is published on."""
    spec = _spec(event_type)
    if spec.by_callback:
        url = data.get("callback_url") if isinstance(data, dict) else getattr(data, "callback_url", None)
        return spec.callback_subject(prefix) if url is not None else spec.subject(prefix)
    if not spec.by_origin:
        return f"{prefix}.{spec.suffix}"
    origin = getattr(data, "origin", None)
    if origin is None and isinstance(data, dict):
        origin = data.get("origin")
        origin_kind = origin.get("kind") if isinstance(origin, dict) else None
    else:
        origin_kind = getattr(origin, "kind", None)
    return spec.subject_of(prefix, origin_kind)


def type_of_subject(subject: str, prefix: str = "chora") -> str | None:
    """The event type published on ``subject`` (a concrete one), None if it is no catalogue subject."""
    for spec in CATALOGUE.values():
        base = f"{prefix}.{spec.suffix}"
        if spec.by_origin:
            head, _, kind = subject.rpartition(".")
            if head == base and kind in ORIGIN_KINDS:
                return spec.type
        elif subject == base or (spec.by_callback and subject == f"{base}.{CALLBACK}"):
            return spec.type
    return None


def all_subjects(prefix: str = "chora") -> list[str]:
    return [subject for s in CATALOGUE.values() for subject in s.subjects(prefix)]


#: The dead-letter code of a request that carries a ``callback_url`` but came on a plain
#: subject (see :func:`misrouted_callback`); a replay of it goes to the ``.callback`` subject.
MISROUTED_CALLBACK = "MISROUTED_CALLBACK"


def misrouted_callback(data: object, subject: str) -> str | None:
    """Why a request that carries a ``callback_url`` but came on a plain subject can't be
    taken (None when it can): the notifier reads only the ``.callback`` subjects, so its
    callback would be neither recorded nor refused. (A request without one on a
    ``.callback`` subject is harmless: the notifier finds nothing to record.)"""
    if getattr(data, "callback_url", None) is None or subject.endswith("." + CALLBACK):
        return None
    return (
        f"the request has a callback_url but came on {subject}: a request that asks for a callback is "
        f"published on {subject}.{CALLBACK}, the subject the notifier reads"
    )


def stream_base(prefix: str = "chora") -> str:
    """The stem of the JetStream names under ``prefix``: ``CHORA`` for the events stream
    ``CHORA_EVENTS``, the dead letters ``CHORA_DLQ`` and the buckets ``CHORA_<NAME>``."""
    return re.sub(r"[^A-Za-z0-9_]", "_", prefix).upper()


def events_stream(prefix: str = "chora") -> str:
    """The stream that stores every event under ``prefix``."""
    return stream_base(prefix) + "_EVENTS"
