"""The subscription filter language (services/notifier/filters.py): matching and config-time checks."""

from __future__ import annotations

import pytest

from contracts.catalogue import (
    ARTIFACT_ASSEMBLED,
    BATCH_COMPLETED,
    CONTENT_GENERATED,
    CONTENT_VALIDATED,
    GENERATION_REQUESTED,
)
from contracts.events import ContentGenerated, ContentValidated, ErrorInfo, GenerationRequested, Origin
from services.notifier.filters import check, matches


def generated(status="error", code=None, **kw):
    error = ErrorInfo(code=code, message="m") if code else None
    return ContentGenerated(request_id="r", content_config_id="c", status=status, error=error, **kw)


def validated(valid: bool):
    return ContentValidated(request_id="r", content_config_id="c", valid=valid)


def test_no_filters_let_everything_through():
    assert matches([], validated(True)) and matches([], {"anything": 1})


def test_a_field_the_event_does_not_have_never_matches():
    errors = [{"status": ["error"]}]
    assert matches(errors, generated("error"))
    assert not matches(errors, validated(False)) and not matches(errors, validated(True))


def test_booleans_match_as_booleans_only():
    invalid = [{"valid": [False]}]
    assert matches(invalid, validated(False)) and not matches(invalid, validated(True))
    assert not matches([{"valid": ["false"]}], validated(False))
    assert not matches([{"valid": [0]}], {"valid": False})
    assert not matches([{"n": [True]}], {"n": 1})
    assert matches([{"n": [1]}], {"n": 1.0})


def test_every_field_of_a_filter_must_match_and_any_filter_will_do():
    both = [{"status": ["error"], "content_config_id": ["c"]}]
    assert matches(both, generated("error")) and not matches(both, generated("success"))
    assert not matches([{"status": ["error"], "content_config_id": ["other"]}], generated("error"))
    either = [{"status": ["error"]}, {"valid": [False]}]
    assert matches(either, generated("error")) and matches(either, validated(False))
    assert not matches(either, generated("success")) and not matches(either, validated(True))


def test_dotted_paths_reach_nested_fields_and_null_is_missing():
    by_code = [{"error.code": ["TEMPLATE_ERROR"]}]
    assert matches(by_code, generated("error", "TEMPLATE_ERROR"))
    assert not matches(by_code, generated("error", "CONFIG_NOT_FOUND"))
    assert not matches(by_code, generated("success"))  # error is null
    assert matches([{"origin.kind": ["batch"]}], generated(origin=Origin(kind="batch", id="b", key="0")))
    assert matches([{"context.env": ["prod"]}], GenerationRequested(content_config_id="c", context={"env": "prod"}))
    assert matches([{"a.b": ["x"]}], {"a": {"b": "x"}}) and not matches([{"a.b": ["x"]}], {"a": "x"})
    assert not matches([{"issues.severity": ["error"]}], {"issues": [{"severity": "error"}]})  # not into lists


@pytest.mark.parametrize(
    "filters, types",
    [
        ([{"status": ["error", "success"]}], (CONTENT_GENERATED, CONTENT_VALIDATED)),
        ([{"valid": [False]}], (CONTENT_GENERATED, CONTENT_VALIDATED)),
        ([{"error.code": ["ANY_CODE"]}], (ARTIFACT_ASSEMBLED,)),
        ([{"context.whatever.deep": [1]}], (GENERATION_REQUESTED,)),
        ([{"total": [3], "status": ["error"]}], (BATCH_COMPLETED,)),
    ],
)
def test_checks_pass_for_fields_and_values_the_events_can_have(filters, types):
    check(filters, types)


@pytest.mark.parametrize(
    "filters, types, message",
    [
        (
            [{"valid": [False]}],
            (CONTENT_GENERATED,),
            "'valid' is in none of the subscribed events (chora.content_generated)",
        ),
        ([{"valid": ["false"]}], (CONTENT_VALIDATED,), "a boolean: write true or false"),
        ([{"status": ["failed"]}], (CONTENT_GENERATED,), "'status' is never 'failed'"),
        ([{"total": ["3"]}], (BATCH_COMPLETED,), "'total' is never '3'"),
        ([{"error": ["X"]}], (CONTENT_GENERATED,), "'error' is never 'X'"),  # an object, not a value
        ([{"error.kode": ["X"]}], (CONTENT_GENERATED,), "'error.kode' is in none"),
    ],
)
def test_checks_name_a_filter_that_could_never_match(filters, types, message):
    with pytest.raises(ValueError) as e:
        check(filters, types)
    assert message in str(e.value)
