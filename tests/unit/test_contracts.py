"""Contracts without a server: the CloudEvents codec, the catalogue, schemas, trace context."""

from __future__ import annotations

import json
import typing

import msgspec
import pytest
from cloudevents.core.bindings import http as ce_http
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent as SdkEvent

from contracts import schemas
from contracts.catalogue import (
    ARTIFACT_REQUESTED,
    BATCH_REQUESTED,
    CATALOGUE,
    CONTENT_GENERATED,
    CONTENT_VALIDATED,
    GENERATION_REQUESTED,
    ORIGIN_KINDS,
    all_subjects,
    event_subject,
    misrouted_callback,
    subject_for,
    subjects_for,
    type_of_subject,
)
from contracts.envelope import EnvelopeError, decode, encode_binary, encode_structured, new_event
from contracts.events import BatchItem, BatchRequested, ContentGenerated, GenerationRequested, Origin
from contracts.tracing import child_traceparent, parse_traceparent, w3c_trace_id


def req(**ctx):
    return new_event(
        GENERATION_REQUESTED, GenerationRequested(content_config_id="hello-world", context=ctx), source="t"
    )


def test_binary_round_trip_keeps_every_attribute():
    ev = req(name="wörld", n=3)
    ev.subject = 'needs "quoting" 100% ü'
    headers, body = encode_binary(ev)
    assert headers["Nats-Msg-Id"] == ev.id
    assert all(0x21 <= ord(c) <= 0x7E for v in headers.values() for c in v)
    assert decode(headers, body) == ev


def test_structured_mode_is_accepted():
    ev = req(a=1)
    headers, body = encode_structured(ev)
    assert decode(headers, body) == ev


@pytest.mark.parametrize(
    "mutate, code",
    [
        (lambda h, b: (h | {"ce-specversion": "0.3"}, b), "BAD_SPECVERSION"),
        (lambda h, b: ({k: v for k, v in h.items() if k != "ce-source"}, b), "MISSING_ATTRIBUTE"),
        (lambda h, b: ({k: v for k, v in h.items() if k != "ce-id"}, b), "MISSING_ATTRIBUTE"),
        (lambda h, b: (h, b"{not json"), "INVALID_JSON"),
        (lambda h, b: (h, b'{"context": {}}'), "INVALID_DATA"),
        (lambda h, b: (h | {"ce-datacontenttype": "text/plain"}, b), "BAD_CONTENT_TYPE"),
        (lambda h, b: (h | {"ce-type": "chora.nope"}, b), "UNKNOWN_TYPE"),
        (lambda h, b: (h | {"ce-subject": "%zz"}, b), "BAD_HEADER_ENCODING"),
        (lambda h, b: (h | {"ce-subject": "%C3%28"}, b), "BAD_HEADER_ENCODING"),
        (lambda h, b: ({}, b), "NOT_A_CLOUDEVENT"),
        (lambda h, b: (h, b" " * (2 << 20)), "OVERSIZED"),
        (lambda h, b: (h | {"ce-Bad_Name": "x"}, b), "BAD_ATTRIBUTE"),
    ],
)
def test_malformed_events_get_a_code(mutate, code):
    headers, body = mutate(*encode_binary(req()))
    with pytest.raises(EnvelopeError) as e:
        decode(headers, body)
    assert e.value.code == code


def test_events_from_the_official_sdk_are_accepted_in_both_modes():
    sdk_event = SdkEvent(
        {
            "id": "sdk-1",
            "source": "urn:sdk",
            "type": GENERATION_REQUESTED,
            "specversion": "1.0",
            "datacontenttype": "application/json",
        },
        {"content_config_id": "hello-world", "context": {"x": 1}},
    )
    binary = ce_http.to_binary(sdk_event, JSONFormat())
    ev = decode(dict(binary.headers), binary.body)
    assert ev.id == "sdk-1" and ev.data.context == {"x": 1}
    structured = ce_http.to_structured(sdk_event, JSONFormat())
    ev2 = decode(dict(structured.headers), structured.body)
    assert ev2.id == "sdk-1" and ev2.data == ev.data


def test_derived_ids_are_deterministic_and_trace_is_carried():
    cause = req()
    out = [
        new_event(
            CONTENT_GENERATED,
            ContentGenerated(request_id=cause.id, content_config_id="x", status="success"),
            source="g",
            cause=cause,
        )
        for _ in range(2)
    ]
    assert out[0].id == out[1].id != cause.id
    assert out[0].traceid == cause.traceid
    parent = parse_traceparent(cause.traceparent)
    child = parse_traceparent(out[0].traceparent)
    assert child[0] == parent[0] and child[1] != parent[1]


def test_a_cause_with_only_a_traceparent_keeps_its_trace():
    cause = req()
    cause.traceid = None
    cause.traceparent = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"
    out = new_event(
        CONTENT_GENERATED,
        ContentGenerated(request_id=cause.id, content_config_id="x", status="success"),
        source="g",
        cause=cause,
    )
    assert out.traceid == "ab" * 16
    assert out.traceparent.startswith("00-" + "ab" * 16 + "-")


def test_trace_ids_from_outside_map_to_w3c():
    assert w3c_trace_id("a" * 32) == "a" * 32
    tid = w3c_trace_id("my-run-42")
    assert len(tid) == 32 and int(tid, 16) >= 0
    assert parse_traceparent(child_traceparent("my-run-42"))[0] == tid


def test_catalogue_subjects_follow_types():
    assert subject_for(GENERATION_REQUESTED) == "chora.generation.requested"
    assert subject_for(GENERATION_REQUESTED, "t1") == "t1.generation.requested"
    assert all(t.startswith("chora.") for t in CATALOGUE)


def test_outcomes_travel_on_the_subject_of_their_kind_of_run():
    """content_generated / content_validated: one more token, the origin kind (standalone when
    none); the type's subject, for streams, filters and subscriptions, matches all three."""
    assert subject_for(CONTENT_GENERATED) == "chora.content_generated.*"
    assert subject_for(CONTENT_VALIDATED, "t1") == "t1.content_validated.*"
    batch = ContentGenerated(
        request_id="r", content_config_id="c", status="success", origin=Origin(kind="batch", id="b", key="0")
    )
    assert event_subject(CONTENT_GENERATED, batch) == "chora.content_generated.batch"
    assert (
        event_subject(CONTENT_GENERATED, msgspec.structs.replace(batch, origin=None), "t1")
        == "t1.content_generated.standalone"
    )
    assert event_subject(CONTENT_VALIDATED, {"origin": {"kind": "artifact"}}) == "chora.content_validated.artifact"
    assert event_subject(GENERATION_REQUESTED, batch) == "chora.generation.requested"  # requests are not split
    with pytest.raises(ValueError, match="unknown origin kind 'job'"):
        event_subject(CONTENT_GENERATED, {"origin": {"kind": "job"}})
    # the tokens are the payload's origin kinds, and "standalone" for none: one list, not two
    assert set(ORIGIN_KINDS) == {"standalone", *typing.get_args(typing.get_type_hints(Origin)["kind"])}


def test_a_request_with_a_callback_url_travels_on_its_callback_subject():
    """The notifier reads only the .callback subjects: a request without a callback never reaches it."""
    plain = GenerationRequested(content_config_id="c")
    asks = GenerationRequested(content_config_id="c", callback_url="https://hooks.example.com/x")
    assert event_subject(GENERATION_REQUESTED, plain) == "chora.generation.requested"
    assert event_subject(GENERATION_REQUESTED, asks, "t1") == "t1.generation.requested.callback"
    assert (
        event_subject(BATCH_REQUESTED, {"items": [], "callback_url": "https://h/x"}) == "chora.batch.requested.callback"
    )
    assert event_subject(ARTIFACT_REQUESTED, {"artifact_id": "a"}) == "chora.artifact.requested"
    # both are the type's: in the stream, in a reader of all of them, back from the subject
    assert subjects_for(GENERATION_REQUESTED) == ["chora.generation.requested", "chora.generation.requested.callback"]
    assert subjects_for(CONTENT_GENERATED) == ["chora.content_generated.*"]
    assert {"chora.batch.requested", "chora.batch.requested.callback"} <= set(all_subjects())
    assert type_of_subject("chora.artifact.requested.callback") == ARTIFACT_REQUESTED
    assert type_of_subject("chora.artifact.requested") == ARTIFACT_REQUESTED
    assert type_of_subject("chora.cancel.requested.callback") is None  # cancels have no callback
    # a callback_url on the plain subject is refused with the subject to use; the other way is harmless
    why = misrouted_callback(asks, "chora.generation.requested")
    assert why is not None and "chora.generation.requested.callback" in why
    assert misrouted_callback(asks, "chora.generation.requested.callback") is None
    assert misrouted_callback(plain, "chora.generation.requested.callback") is None


def test_schema_files_match_the_structs():
    expected = schemas.generate()
    on_disk = {p.name: p.read_text() for p in schemas.SCHEMA_DIR.glob("*.json")}
    assert on_disk == expected, "schemas drifted: run `chora contracts schemas` and commit the result"


def test_schema_validates_what_the_struct_encodes():
    doc = json.loads(schemas.generate()[f"{CONTENT_GENERATED}.json"])
    assert set(doc["$defs"]["ContentGenerated"]["required"]) == {"request_id", "content_config_id", "status"}
    payload = msgspec.json.encode(ContentGenerated(request_id="r", content_config_id="c", status="error"))
    assert json.loads(payload)["status"] == "error"


@pytest.mark.parametrize(
    "data, problem",
    [
        ({"items": []}, "at least one item"),
        ({}, "at least one item"),
        ({"items": [{"content_config_id": "a"}], "items_ref": "obj://B/x"}, "exclusive"),
        ({"items_ref": "obj://B/x", "item_count": 0}, ">= 1"),
    ],
)
def test_a_batch_request_has_its_items_inline_or_by_reference(data, problem):
    with pytest.raises(msgspec.ValidationError, match=problem):
        msgspec.json.decode(json.dumps(data), type=BatchRequested)
    by_ref = msgspec.json.decode(b'{"items_ref": "obj://B/x", "item_count": 3}', type=BatchRequested)
    assert by_ref.items == [] and by_ref.item_count == 3
    inline = msgspec.json.decode(b'{"items": [{"content_config_id": "a"}]}', type=BatchRequested)
    assert inline.items == [BatchItem(content_config_id="a")] and inline.items_ref is None
