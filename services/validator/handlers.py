"""The validator's handler: a successful content_generated in, a verdict out.

For every ``chora.content_generated`` with status ``success`` the handler
publishes exactly one ``chora.content_validated`` caused by it: ``valid`` is
False iff an issue has severity ``error``. An error outcome is acked with
nothing published (there is no content to judge). A config with no rules
gives ``valid=True`` and no issues.

A config that cannot be loaded, or whose rules cannot be built, still gives
the content_validated (``valid=False``, one issue ``{rule: "config"}``), and
the handler also publishes one ``chora.config_validated`` (status error) for
that config version.

Once per config version: the guarantee
--------------------------------------
The report's key in the KV state store is
``configcheck.<config id>.<first 16 hex of the config hash>``; its value names
the event that claimed it (the content_generated's id). The handler includes
the config_validated in what it returns when

1. its ``create()`` of the key succeeds (it is the first, across every
   instance and every redelivery: create is a compare-and-set), or
2. the key exists and was claimed by this very event: a redelivery of the
   claiming message, whose first handling crashed (or whose publish failed)
   after the claim and before the ack.

Every handling of any other event for that version returns no
config_validated. The config_validated's id is derived from the config id and
the hash only (:func:`config_report_id`), never from the cause, so every copy
anyone ever publishes for one version has the same id.

What that gives, with the consumer loop's "publish, then ack":

- **at least once**: the claiming message is not acked until its events are
  stored, and every redelivery of it publishes the report again; so the
  report is stored unless that message ends in the dead-letter stream (after
  ``max_deliver`` failed attempts), where it can be replayed from;
- **exactly once in the stream** in every other case but one: the claiming
  message's publish succeeded, its ack was lost, and the redelivery came
  after the stream's duplicate window (``duplicate_window_s``, 120 s by
  default, against an ``ack_wait_s`` of 30 s). That second copy carries the
  same event id, so a consumer that keeps ids drops it;
- a config version is reported again only if its key is gone from the KV
  bucket (whose TTL is the stream's max age, 7 days by default).

The version of a config that cannot be loaded at all is its error
(:func:`~services.validator.rules.error_hash` of code and message).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Protocol

import msgspec

from composition.configs import ConfigError, ConfigStore, valid_config_id
from contracts.catalogue import CONFIG_VALIDATED, CONTENT_GENERATED, CONTENT_VALIDATED
from contracts.envelope import CloudEvent, new_event
from contracts.events import ConfigValidated, ContentGenerated, ContentValidated, ErrorInfo, ValidationIssue
from contracts.handling import Delivery, EventHandlers, Reject, Retry, expect
from services.validator.rules import RuleCache, RulesError, RuleSet, error_hash, is_valid

log = logging.getLogger("chora.validator")

SOURCE = "chora://validator"
KEY_PREFIX = "configcheck"
MAX_MESSAGE_CHARS = 2000
# Content longer than this is checked in a worker thread, so the event loop (heartbeats, acks,
# other messages) keeps running while a large document is checked (its bounds: rules/schema.py).
THREAD_ABOVE_CHARS = 64 * 1024
_REPORT_NAMESPACE = uuid.UUID("2b7c0f4e-8a51-4d7e-b3a6-5f0e9c1d2a47")
_encode = msgspec.json.encode


class StateLike(Protocol):
    """What the handler needs of :class:`bus.state.StateStore`."""

    async def create(self, key: str, value: bytes) -> int | None: ...

    async def get(self, key: str) -> tuple[bytes, int] | None: ...


@dataclass
class Deps:
    """What the validator's handler needs; ``state`` None: every handling reports a broken config."""

    store: ConfigStore
    rules: RuleCache = field(default_factory=RuleCache)
    state: StateLike | None = None
    source: str = SOURCE


def _cut(message: str) -> str:
    return message if len(message) <= MAX_MESSAGE_CHARS else message[: MAX_MESSAGE_CHARS - 1] + "…"


def _hex(config_hash: str) -> str:
    return config_hash.split(":", 1)[-1]


def report_key(config_id: str, config_hash: str) -> str:
    """The KV key that records the report of one config version."""
    safe = config_id if valid_config_id(config_id) else "id-" + error_hash("ID", config_id)[7:23]
    return f"{KEY_PREFIX}.{safe}.{_hex(config_hash)[:16]}"


def config_report_id(config_id: str, config_hash: str) -> str:
    """The event id of the config_validated for one config version: the same for
    every instance and every redelivery."""
    return str(uuid.uuid5(_REPORT_NAMESPACE, f"{config_id}/{config_hash}/{CONFIG_VALIDATED}"))


async def claim_report(state: StateLike | None, key: str, event_id: str) -> bool:
    """True when the handling of ``event_id`` is the one that reports this config
    version (see the module docstring). Without a state store every handling
    reports, and only the deterministic event id deduplicates."""
    if state is None:
        return True
    record = _encode({"cause": event_id, "at": time.time()})
    try:
        for _ in range(3):
            if await state.create(key, record) is not None:
                return True
            got = await state.get(key)
            if got is None:  # expired or deleted between the two calls: claim again
                continue
            try:
                owner = msgspec.json.decode(got[0]).get("cause")
            except (msgspec.DecodeError, AttributeError):
                owner = None
            return owner == event_id
    except (Retry, Reject):
        raise
    except Exception as e:
        raise Retry(f"state store unavailable while claiming {key}: {type(e).__name__}: {e}") from None
    raise Retry(f"could not claim {key}: it keeps disappearing")


async def on_content_generated(event: CloudEvent, delivery: Delivery, deps: Deps) -> list[CloudEvent]:
    """Validate one content_generated; see the module docstring for what is returned."""
    store, rules, state, source = deps.store, deps.rules, deps.state, deps.source
    data = expect(event, CONTENT_GENERATED, ContentGenerated, "validator")
    if data.status != "success":
        return []
    text = data.content
    if text is None:
        if data.content_ref:
            # The consumer loop resolves references before the handler runs; this one was not.
            raise Reject("CONTENT_MISSING", f"content {data.content_ref} was not resolved")
        text = ""

    config_id = data.content_config_id
    ruleset: RuleSet | tuple[str, str]  # the rules, or the problem (code, message) of a broken config
    try:
        config = store.get(config_id)
    except ConfigError as e:
        ruleset = (e.code, e.message)
        chash = error_hash(e.code, e.message)
    else:
        chash, built = rules.for_config(config)
        ruleset = (built.code, built.message) if isinstance(built, RulesError) else built

    out: list[CloudEvent] = []
    if isinstance(ruleset, RuleSet):
        issues = await asyncio.to_thread(ruleset.apply, text) if len(text) > THREAD_ABOVE_CHARS else ruleset.apply(text)
    else:
        code, message = ruleset
        what = "has invalid validation rules" if code == RulesError.code else "cannot be loaded"
        issues = [
            ValidationIssue(rule="config", severity="error", message=_cut(f"config {config_id!r} {what}: {message}"))
        ]
        if await claim_report(state, report_key(config_id, chash), event.id):
            log.warning("content config %r (%s) is broken: %s: %s", config_id, chash[:19], code, message)
            report = ConfigValidated(
                content_config_id=config_id,
                status="error",
                config_hash=chash,
                error=ErrorInfo(code=code, message=_cut(message)),
            )
            out.append(
                new_event(
                    CONFIG_VALIDATED, report, source=source, cause=event, event_id=config_report_id(config_id, chash)
                )
            )

    verdict = ContentValidated(
        request_id=data.request_id,
        content_config_id=config_id,
        valid=is_valid(issues),
        issues=issues,
        # Content that came by reference goes on by reference (no second copy in the Object Store).
        content=None if data.content_ref else text,
        content_hash=data.content_hash,
        content_length=data.content_length if data.content_length is not None else len(text),
        content_ref=data.content_ref,
        origin=data.origin,
    )
    out.append(new_event(CONTENT_VALIDATED, verdict, source=source, cause=event))
    return out


EVENT_HANDLERS: EventHandlers[Deps] = {CONTENT_GENERATED: on_content_generated}
