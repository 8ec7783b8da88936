"""The validator's handler: a successful content_generated in, a verdict out.

For every ``chora.content_generated`` with status ``success`` the handler
publishes exactly one ``chora.content_validated`` caused by it: ``valid`` is
False iff an issue has severity ``error``. An error outcome is acked with
nothing published (there is no content to judge). A config with no rules
gives ``valid=True`` and no issues.

A config that cannot be loaded, or whose rules cannot be built, still gives
the content_validated (``valid=False``, one issue ``{rule: "config"}``).

Every config version is reported once as ``chora.config_validated`` (status
success with its rules, or error): see :mod:`services.validator.reports`, which
also scans the configs directory. A content_generated naming a version that
this instance has not seen claimed yet claims its report key; the handler
includes the config_validated (before the verdict) in what it returns when

1. its ``create()`` of the key succeeds (it is the first, across every
   instance and every redelivery: create is a compare-and-set), or
2. the key exists and was claimed by this very event: a redelivery of the
   claiming message, whose first handling crashed (or whose publish failed)
   after the claim and before the ack.

Every handling of any other event for that version returns no
config_validated (the instance remembers the owner of each key it met, so a
known version costs no KV round trip). The config_validated's id is derived
from the config id and the hash only (:func:`config_report_id`), never from
the cause, so every copy anyone ever publishes for one version has the same id.

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
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from composition.configs import ConfigStore
from contracts.catalogue import CONTENT_GENERATED, CONTENT_VALIDATED
from contracts.envelope import CloudEvent, new_event
from contracts.events import ContentGenerated, ContentValidated, ValidationIssue
from contracts.handling import Delivery, EventHandlers, Reject, expect
from services.validator.reports import (
    KEY_PREFIX,
    Claims,
    StateLike,
    check_config,
    claim_once,
    claim_report,
    config_report_id,
    cut,
    report_key,
)
from services.validator.rules import RuleCache, RulesError, is_valid

log = logging.getLogger("chora.validator")

SOURCE = "chora://validator"
# Content longer than this is checked in a worker thread, so the event loop (heartbeats, acks,
# other messages) keeps running while a large document is checked (its bounds: rules/schema.py).
THREAD_ABOVE_CHARS = 64 * 1024

__all__ = [
    "EVENT_HANDLERS",
    "KEY_PREFIX",
    "SOURCE",
    "Deps",
    "StateLike",
    "claim_report",
    "config_report_id",
    "on_content_generated",
    "report_key",
]


@dataclass
class Deps:
    """What the validator's handler needs. ``state`` None: no KV store, so each instance
    reports each version once (with the first event that names it) on its own."""

    store: ConfigStore
    rules: RuleCache = field(default_factory=RuleCache)
    state: StateLike | None = None
    source: str = SOURCE
    claims: Claims = field(default_factory=Claims)


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
    checked = check_config(store, rules, config_id)
    out: list[CloudEvent] = []
    if await claim_once(state, deps.claims, checked.key, event.id):
        if checked.rules is None:
            err = checked.report.error
            log.warning("content config %r (%s) is broken: %s", config_id, checked.config_hash[:19], err)
        out.append(checked.event(source, cause=event))
    if checked.rules is not None:
        ruleset = checked.rules
        issues = await asyncio.to_thread(ruleset.apply, text) if len(text) > THREAD_ABOVE_CHARS else ruleset.apply(text)
    else:
        err = checked.report.error
        code, message = (err.code, err.message) if err is not None else ("CONFIG_INVALID", "unknown")
        what = "has invalid validation rules" if code == RulesError.code else "cannot be loaded"
        issues = [
            ValidationIssue(rule="config", severity="error", message=cut(f"config {config_id!r} {what}: {message}"))
        ]

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
