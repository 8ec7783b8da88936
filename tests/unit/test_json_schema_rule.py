"""The json_schema rule on real schemas: every event schema in contracts/schemas/ used as a
rule (their $defs/$ref included), the keywords the old hand-written subset refused, drafts
named by $schema, format checking, refused remote references, and hostile documents."""

from __future__ import annotations

import json
import time

import msgspec
import pytest

from contracts import schemas
from contracts.catalogue import CATALOGUE
from contracts.events import (
    ArtifactAssembled,
    ArtifactRequested,
    BatchCompleted,
    BatchItem,
    BatchItemOutcome,
    CancelRequested,
    CompensationRequested,
    DeadlineRequested,
    Effect,
    EffectsCompensated,
    BatchRequested,
    ConfigValidated,
    ContentGenerated,
    ContentValidated,
    ErrorInfo,
    GenerationRequested,
    NotificationDelivered,
    NotificationFailed,
    Origin,
    ValidationIssue,
)
from referencing import Registry

from services.validator.rules import RulesError, compile_rules
from services.validator.rules.schema import MAX_DOC_DEPTH, MAX_DOC_VALUES

ERR = ErrorInfo(code="BOOM", message="it broke")
# One good payload per event type, and one bad one with the problem it must be reported as.
CASES: dict[str, tuple[msgspec.Struct, dict, str]] = {
    "chora.generation.requested": (
        GenerationRequested(content_config_id="hello-world", context={"name": "Ada"}),
        {"content_config_id": "hello-world", "context": []},
        "$.context: [] is not of type 'object' (type)",
    ),
    "chora.content_generated": (
        ContentGenerated(request_id="r1", content_config_id="c", status="success", content="hi", cached=False),
        {"request_id": "r1", "content_config_id": "c", "status": "maybe"},
        "$.status: 'maybe' is not one of ['error', 'success'] (enum)",
    ),
    "chora.content_validated": (
        ContentValidated(
            request_id="r1",
            content_config_id="c",
            valid=False,
            issues=[ValidationIssue(rule="length", severity="error", message="too short")],
        ),
        {"request_id": "r1", "content_config_id": "c", "valid": False, "issues": [{"rule": "x", "message": "m"}]},
        "$.issues[0]: 'severity' is a required property (required)",
    ),
    "chora.config_validated": (
        ConfigValidated(content_config_id="c", status="error", error=ERR),
        {"content_config_id": "c", "status": "error", "error": {"code": "BOOM"}},
        "$.error: 'message' is a required property (required)",
    ),
    "chora.artifact.requested": (
        ArtifactRequested(artifact_id="release-notes", context={"v": 1}),
        {"context": {}},
        "$: 'artifact_id' is a required property (required)",
    ),
    "chora.artifact_assembled": (
        ArtifactAssembled(request_id="r", artifact_id="a", status="success", parts_count=2, omitted_parts=["p"]),
        {"request_id": "r", "artifact_id": "a", "status": "success", "parts_count": "two"},
        "$.parts_count: 'two' is not of type 'integer' (type)",
    ),
    "chora.batch.requested": (
        BatchRequested(items=[BatchItem(content_config_id="a", context={"i": 1})]),
        {"items": [{"context": {}}]},
        "$.items[0]: 'content_config_id' is a required property (required)",
    ),
    "chora.batch_completed": (
        BatchCompleted(
            batch_id="b",
            status="success",
            total=1,
            successful=1,
            failed=0,
            items=[BatchItemOutcome(index=0, content_config_id="a", status="success", request_id="r")],
        ),
        {"batch_id": "b", "status": "success", "total": 1, "successful": 1, "failed": 0, "items": [{"index": "0"}]},
        "$.items[0].index: '0' is not of type 'integer' (type)",
    ),
    "chora.cancel.requested": (
        CancelRequested(kind="batch", id="b", reason="not needed"),
        {"kind": "run", "id": "b"},
        "$.kind: 'run' is not one of ['artifact', 'batch'] (enum)",
    ),
    "chora.deadline.requested": (
        DeadlineRequested(kind="artifact", id="r", at=1800000000.5),
        {"kind": "artifact", "id": "r"},
        "$: 'at' is a required property (required)",
    ),
    "chora.compensation.requested": (
        CompensationRequested(kind="batch", id="b", chunk=0, chunks=1, effects=[Effect(key="3", cache_key="c.k")]),
        {"kind": "batch", "id": "b", "chunk": -1},
        "$.chunk: -1 is less than the minimum of 0 (minimum)",
    ),
    "chora.effects_compensated": (
        EffectsCompensated(kind="batch", id="b", compensated=["3", "1"]),
        {"kind": "batch", "id": "b", "compensated": [3]},
        "$.compensated[0]: 3 is not of type 'string' (type)",
    ),
    "chora.notification_delivered": (
        NotificationDelivered(
            subscription="n8n", event_id="e", event_type="t", attempts=1, status_code=200, duration_ms=3.5
        ),
        {"subscription": "n8n", "event_id": "e", "event_type": "t", "attempts": 1, "status_code": 200},
        "$: 'duration_ms' is a required property (required)",
    ),
    "chora.notification_failed": (
        NotificationFailed(subscription="n8n", event_id="e", event_type="t", attempts=3, error=ERR),
        {"subscription": "n8n", "event_id": "e", "event_type": "t", "attempts": 3, "error": ["code", "message"]},
        "$.error: ['code', 'message'] is not of type 'object' (type)",
    ),
}


def check(schema, text: str) -> list[str]:
    return [i.message for i in compile_rules([{"type": "json_schema", "schema": schema}]).apply(text)]


def test_every_event_schema_has_a_case():
    assert set(CASES) == set(CATALOGUE) == {p.stem for p in schemas.SCHEMA_DIR.glob("*.json")}


@pytest.mark.parametrize("event_type", sorted(CASES))
def test_each_project_schema_works_as_a_rule(event_type):
    schema = json.loads((schemas.SCHEMA_DIR / f"{event_type}.json").read_text())
    good, bad, problem = CASES[event_type]
    good_doc = msgspec.json.encode(good).decode()
    assert check(schema, good_doc) == [], good_doc
    (message,) = check(schema, json.dumps(bad))
    assert message == f"content does not match the JSON schema: {problem}"


def test_an_origin_is_checked_through_its_ref():
    schema = json.loads((schemas.SCHEMA_DIR / "chora.generation.requested.json").read_text())
    ok = GenerationRequested(content_config_id="x", origin=Origin(kind="batch", id="b1", key="0"))
    assert check(schema, msgspec.json.encode(ok).decode()) == []
    (message,) = check(schema, '{"content_config_id": "x", "origin": {"kind": "shelf", "id": "b1", "key": "0"}}')
    assert "$.origin.kind: 'shelf' is not one of ['artifact', 'batch'] (enum)" in message


@pytest.mark.parametrize(
    "schema, good, bad, problem",
    [
        (
            {"patternProperties": {"^x-": {"type": "string"}}, "additionalProperties": False},
            '{"x-a": "1"}',
            '{"x-a": 1}',
            "$['x-a']: 1 is not of type 'string' (type)",
        ),
        (
            {
                "if": {"properties": {"kind": {"const": "pdf"}}},
                "then": {"required": ["pages"]},
                "else": {"required": ["words"]},
            },
            '{"kind": "pdf", "pages": 3}',
            '{"kind": "md", "pages": 3}',
            "$: 'words' is a required property (required)",
        ),
        (
            {"prefixItems": [{"type": "string"}, {"type": "integer"}], "items": False},
            '["a", 1]',
            '["a", "b"]',
            "$[1]: 'b' is not of type 'integer' (type)",
        ),
        (
            {
                "$defs": {"n": {"type": "object", "properties": {"name": {"type": "string"}}}},
                "items": {"$ref": "#/$defs/n"},
            },
            '[{"name": "a"}]',
            '[{}, {}, {"name": 3}]',
            "$[2].name: 3 is not of type 'string' (type)",
        ),
        ({"format": "email"}, '"ada@example.org"', '"ada at example"', "$: 'ada at example' is not a 'email' (format)"),
        ({"format": "date-time"}, '"2026-11-28T09:00:00Z"', '"yesterday"', "is not a 'date-time' (format)"),
        ({"uniqueItems": True}, '[{"a": 1}, {"a": 2}]', '[{"a": 1}, {"a": 1.0}]', "item 1 repeats an earlier one"),
        ({"uniqueItems": True}, "[1, true]", "[1, 1.0]", "(uniqueItems)"),
        (
            {"$schema": "http://json-schema.org/draft-07/schema#", "items": [{"type": "string"}]},
            '["a", 2]',
            "[1]",
            "$[0]: 1 is not of type 'string' (type)",
        ),
    ],
)
def test_keywords_beyond_the_old_subset(schema, good, bad, problem):
    assert check(schema, good) == []
    (message,) = check(schema, bad)
    assert problem in message, message


@pytest.mark.parametrize(
    "schema, problem",
    [
        (
            {"$ref": "https://schemas.example.org/thing.json"},
            "$ref 'https://schemas.example.org/thing.json' does not resolve",
        ),
        ({"properties": {"a": {"$ref": "other.json#/x"}}}, "$ref 'other.json#/x' does not resolve"),
        ({"$ref": "#/$defs/missing"}, "$ref '#/$defs/missing' does not resolve"),
        ({"type": "objekt"}, "schema.type: 'objekt' is not valid under any of the given schemas"),
        ({"properties": {"a": {"minimum": "5"}}}, "schema.properties.a.minimum: '5' is not of type 'number'"),
        ({"$schema": "https://schemas.example.org/mine"}, "$schema 'https://schemas.example.org/mine' is not a draft"),
        ({"$schema": 3}, "$schema '3' is not a draft"),
    ],
)
def test_an_unusable_schema_makes_the_config_invalid(schema, problem):
    with pytest.raises(RulesError) as e:
        compile_rules([{"type": "json_schema", "schema": schema}])
    assert problem in e.value.message, e.value.message


def test_a_reference_to_the_meta_schema_resolves_offline():
    (message,) = check({"$ref": "https://json-schema.org/draft/2020-12/schema"}, '{"type": 3}')
    assert message.startswith("content does not match the JSON schema: $.type: 3 is not valid")


@pytest.mark.parametrize(
    "doc, problem",
    [
        ("[" * (MAX_DOC_DEPTH + 1) + "]" * (MAX_DOC_DEPTH + 1), f"nested deeper than {MAX_DOC_DEPTH} levels"),
        ("[" * 100_000, "not valid JSON"),
        (json.dumps(list(range(MAX_DOC_VALUES + 1))), f"more than {MAX_DOC_VALUES} values"),
        ('"' + "x" * 1_000_001 + '"', "more than the 1000000 a JSON schema is checked on"),
    ],
)
def test_hostile_documents_get_a_clear_reason(doc, problem):
    (message,) = check({"type": ["array", "string"]}, doc)
    assert problem in message, message


def test_unique_items_on_many_objects_is_linear():
    """The library compares every pair for unsortable items; 20,000 objects would take minutes that way."""
    doc = json.dumps([{"a": i} for i in range(20_000)] + [{"a": 0}])
    started = time.perf_counter()
    (message,) = check({"uniqueItems": True}, doc)
    elapsed = time.perf_counter() - started
    assert "item 20000 repeats an earlier one" in message
    print(f"uniqueItems over 20,001 objects: {elapsed * 1000:.0f} ms")


def test_a_schema_that_fails_while_checking_is_a_verdict_not_a_crash():
    """A failure inside the library (here a reference that a validator cannot resolve at
    check time) becomes the rule's message; the validator goes on."""
    rules = compile_rules([{"type": "json_schema", "schema": {"type": "object"}}])
    (rule,) = rules.rules
    compiled = rule._compiled
    compiled.validator = compiled._cls({"$ref": "urn:elsewhere"}, registry=Registry())
    (issue,) = rules.apply("{}")
    assert issue.message.startswith("the JSON schema could not be applied to the content: ")
    assert "urn:elsewhere" in issue.message
