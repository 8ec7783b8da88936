"""The notifier's subscriptions file: patterns, filters, validation, secrets."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest

from contracts.catalogue import (
    BATCH_COMPLETED,
    CONTENT_GENERATED,
    CONTENT_VALIDATED,
    NOTIFICATION_DELIVERED,
    NOTIFICATION_FAILED,
)
from contracts.events import BatchCompleted, ContentGenerated, ContentValidated
from services.notifier.config import NotifierConfigError, load_config, load_secrets, parse_config

GOOD = """
subscriptions:
  - name: batches
    events: [chora.batch_completed]
    url: https://hooks.example.com/b
    secret_env: BATCH_SECRET
  - name: content-errors
    events: ["chora.content_*"]
    filters: {status: [error], content_config_id: [release-notes]}
    url: http://127.0.0.1:9/x
    secret_env: CONTENT_SECRET
    timeout_s: 2
    max_attempts: 3
    backoff: {initial_s: 0.1, max_s: 1, multiplier: 3, jitter: 0}
    circuit: {failure_threshold: 2, reset_timeout_s: 5, half_open_max_calls: 2, max_deferrals: 7}
"""


def test_good_config_with_defaults_and_overrides():
    cfg = parse_config(GOOD)
    b, c = cfg.subscriptions
    assert b.durable == "notify-batches"
    assert b.event_types == (BATCH_COMPLETED,)
    assert (b.timeout_s, b.max_attempts) == (5.0, 6)
    assert (b.backoff.initial_s, b.backoff.max_s, b.backoff.multiplier, b.backoff.jitter) == (0.5, 60.0, 2.0, 0.2)
    assert (b.circuit.failure_threshold, b.circuit.reset_timeout_s, b.circuit.half_open_max_calls) == (5, 30.0, 1)
    assert c.event_types == (CONTENT_GENERATED, CONTENT_VALIDATED)
    assert c.circuit.max_deferrals == 7 and c.backoff.multiplier == 3


def test_wildcards_never_match_notification_events_but_names_do():
    cfg = parse_config(
        """
subscriptions:
  - {name: all, events: ["chora.*"], url: "http://h/", secret_env: S}
  - {name: notes, events: [chora.notification_failed], url: "http://h/", secret_env: S}
"""
    )
    everything, notes = cfg.subscriptions
    assert NOTIFICATION_DELIVERED not in everything.event_types
    assert NOTIFICATION_FAILED not in everything.event_types
    # every type but the two notification facts (the saga's compensating notification included)
    assert BATCH_COMPLETED in everything.event_types and len(everything.event_types) == 12
    assert "chora.effects_compensated" in everything.event_types
    assert notes.event_types == (NOTIFICATION_FAILED,)


def test_filters_match_fields_the_event_has_and_never_a_missing_one():
    sub = parse_config(GOOD).subscriptions[1]
    err = ContentGenerated(request_id="r", content_config_id="release-notes", status="error")
    ok = ContentGenerated(request_id="r", content_config_id="release-notes", status="success")
    other = ContentGenerated(request_id="r", content_config_id="hello-world", status="error")
    assert sub.matches(CONTENT_GENERATED, err)
    assert not sub.matches(CONTENT_GENERATED, ok)
    assert not sub.matches(CONTENT_GENERATED, other)
    # content_validated has no status: `status: [error]` never lets it through
    assert not sub.matches(
        CONTENT_VALIDATED, ContentValidated(request_id="r", content_config_id="release-notes", valid=False)
    )
    assert not sub.matches(
        BATCH_COMPLETED, BatchCompleted(batch_id="b", status="error", total=1, successful=0, failed=1)
    )
    assert sub.matches(CONTENT_GENERATED, {"status": "error", "content_config_id": "release-notes"})


@pytest.mark.parametrize(
    "entry, expected",
    [
        ({"name": "Bad_Name"}, "subscription 'Bad_Name': name"),
        ({"events": ["chora.nope_*"]}, "matches no event type"),
        ({"url": "ftp://example.com/x"}, "http:// or https://"),
        ({"secret_env": "not a var"}, "secret_env"),
        ({"timeout_s": 0}, "timeout_s"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"backoff": {"jitter": 2}}, "backoff.jitter"),
        ({"circuit": {"failure_threshold": 0}}, "circuit.failure_threshold"),
        ({"filters": {"colour": ["red"]}}, "filters: Value error, field 'colour' is in none of the subscribed events"),
        ({"filters": {"status": ["eror"]}}, "field 'status' is never 'eror'"),
        ({"filters": {"status": []}}, "filters.0.status"),
        ({"filters": {"Status": ["error"]}}, "filters.0.Status"),
        ({"filters": [{"status": ["error"]}, "valid"]}, "filters.1"),
        ({"surprise": 1}, "surprise"),
        ({"start": "latest"}, "subscription 'hook': start"),
        ({"start": "2026-01-01T00:00:00"}, "timezone"),
    ],
)
def test_invalid_entries_are_named(entry, expected):
    sub = {"name": "hook", "events": ["chora.batch_completed"], "url": "http://h/", "secret_env": "S", **entry}
    with pytest.raises(NotifierConfigError) as e:
        parse_config(json.dumps({"subscriptions": [sub]}), "subs.json")
    assert "subs.json" in str(e.value)
    assert expected in str(e.value)
    if "name" not in entry:
        assert "subscription 'hook'" in str(e.value)


def test_start_is_new_all_or_a_time_with_its_zone():
    def start(value: str):
        doc = f"subscriptions: [{{name: a, events: [chora.batch_completed], url: 'http://h/', secret_env: S, {value}}}]"
        return parse_config(doc, "s.yaml").subscriptions[0].start

    assert start("") is None  # "new" for a new consumer; an existing one goes on from where it is
    assert start("start: new") == "new" and start("start: all") == "all"
    assert start("start: 2026-01-01T10:00:00+02:00") == datetime(2026, 1, 1, 8, 0, tzinfo=timezone.utc)
    assert start("start: '2026-01-01T08:00:00Z'") == datetime(2026, 1, 1, 8, 0, tzinfo=timezone.utc)


def test_duplicate_names_and_bad_documents():
    dup = {"subscriptions": [{"name": "a", "events": ["chora.*"], "url": "http://h/", "secret_env": "S"}] * 2}
    with pytest.raises(NotifierConfigError, match="'a' is used twice"):
        parse_config(json.dumps(dup), "x.json")
    with pytest.raises(NotifierConfigError, match="not valid YAML/JSON"):
        parse_config("subscriptions: [", "x.yaml")
    with pytest.raises(NotifierConfigError, match="expected a mapping"):
        parse_config("- just a list", "x.yaml")
    assert parse_config("", "empty.yaml").subscriptions == []


def test_files(tmp_path):
    assert load_config(None).subscriptions == []
    with pytest.raises(NotifierConfigError, match="no such file"):
        load_config(tmp_path / "missing.yaml")
    p = tmp_path / "subs.yaml"
    p.write_text(GOOD)
    assert [s.name for s in load_config(p).subscriptions] == ["batches", "content-errors"]


def test_secrets_come_from_the_environment_and_never_appear_in_errors():
    cfg = parse_config(GOOD)
    env = {"BATCH_SECRET": "hunter2-batch", "CONTENT_SECRET": "hunter2-content whsec_aHVudGVyMw=="}
    assert load_secrets(cfg, env) == {
        "batches": (b"hunter2-batch",),
        "content-errors": (b"hunter2-content", b"hunter3"),
    }
    with pytest.raises(NotifierConfigError) as e:
        load_secrets(cfg, {"BATCH_SECRET": "hunter2-batch", "CONTENT_SECRET": ""})
    msg = str(e.value)
    assert "subscription 'content-errors'" in msg and "CONTENT_SECRET" in msg and "empty" in msg
    assert "hunter2" not in msg and "batches" not in msg
    with pytest.raises(NotifierConfigError, match="BATCH_SECRET .* is not set"):
        load_secrets(cfg, {"CONTENT_SECRET": "x"})
    with pytest.raises(
        NotifierConfigError, match="CONTENT_SECRET .*: secret 2 starts with whsec_ but the rest is not base64"
    ):
        load_secrets(cfg, {"BATCH_SECRET": "x", "CONTENT_SECRET": "hunter2 whsec_hunter2!"})


def test_credentials_in_the_url_are_hidden_from_logs():
    cfg = parse_config(
        json.dumps(
            {
                "subscriptions": [
                    {"name": "a", "events": ["chora.*"], "url": "https://u:pw@h.example:8443/p?q=1", "secret_env": "S"}
                ]
            }
        )
    )
    assert cfg.subscriptions[0].safe_url == "https://***@h.example:8443/p?q=1"


def test_the_example_file_is_valid():
    from tests.conftest import ROOT

    cfg = load_config(ROOT / "examples" / "notifier.yaml")
    assert [s.name for s in cfg.subscriptions] == ["release-hook", "failures-to-n8n"]
    assert all(s.secret_env.endswith("_SECRET") for s in cfg.subscriptions)


@pytest.mark.parametrize(
    "event_type, data, delivered",
    [
        (CONTENT_GENERATED, ContentGenerated(request_id="r", content_config_id="release-notes", status="error"), True),
        (
            CONTENT_GENERATED,
            ContentGenerated(request_id="r", content_config_id="release-notes", status="success"),
            False,
        ),
        (CONTENT_GENERATED, ContentGenerated(request_id="r", content_config_id="hello-world", status="error"), False),
        (CONTENT_VALIDATED, ContentValidated(request_id="r", content_config_id="api-endpoint-doc", valid=False), True),
        (CONTENT_VALIDATED, ContentValidated(request_id="r", content_config_id="api-endpoint-doc", valid=True), False),
        (CONTENT_VALIDATED, ContentValidated(request_id="r", content_config_id="hello-world", valid=False), False),
        (BATCH_COMPLETED, BatchCompleted(batch_id="b", status="error", total=1, successful=0, failed=1), False),
    ],
)
def test_the_example_failures_subscription_takes_errors_and_invalid_content_only(event_type, data, delivered):
    from tests.conftest import ROOT

    failures = load_config(ROOT / "examples" / "notifier.yaml").subscriptions[1]
    assert failures.name == "failures-to-n8n"
    assert failures.matches(event_type, data) is delivered
