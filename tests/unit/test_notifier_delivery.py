"""Backoff with jitter, Retry-After, and the CloudEvents HTTP request (SDK structured mode, signed)."""

from __future__ import annotations

import email.utils
import json
import random

import pytest
from cloudevents.core.bindings.http import HTTPMessage, from_structured
from cloudevents.core.formats.json import JSONFormat

from contracts.catalogue import BATCH_COMPLETED
from contracts.envelope import CloudEvent, new_event
from contracts.events import BatchCompleted
from services.notifier.config import Backoff
from services.notifier.delivery import (
    UndeliverableEvent,
    backoff_delay,
    build_request,
    parse_retry_after,
    to_sdk_event,
)
from services.notifier.signing import verify

SECRET = b"unit-secret"


def batch_event() -> CloudEvent:
    return new_event(
        BATCH_COMPLETED,
        BatchCompleted(batch_id="b-1", status="success", total=2, successful=2, failed=0),
        source="chora://assembler",
        trace_id="trace-42",
    )


# --------------------------------------------------------------------------- backoff


def test_backoff_without_jitter_is_exponential_and_capped():
    cfg = Backoff(initial_s=0.5, max_s=3.0, multiplier=2.0, jitter=0.0)
    assert [backoff_delay(n, cfg) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert backoff_delay(10_000, cfg) == 3.0  # no overflow
    assert backoff_delay(0, cfg) == 0.5


@pytest.mark.parametrize("attempt", [1, 2, 3, 4, 8])
def test_backoff_jitter_stays_within_bounds_and_varies(attempt):
    cfg = Backoff(initial_s=0.5, max_s=4.0, multiplier=2.0, jitter=0.2)
    rng = random.Random(7)
    base = min(4.0, 0.5 * 2 ** (attempt - 1))
    samples = [backoff_delay(attempt, cfg, rng) for _ in range(2000)]
    assert min(samples) >= base * 0.8 - 1e-12
    assert max(samples) <= min(4.0, base * 1.2) + 1e-12
    assert len(set(samples)) > 100  # it is random
    if base * 1.2 <= 4.0:  # both ends of the range are reached
        assert min(samples) < base * 0.82 and max(samples) > base * 1.18


# --------------------------------------------------------------------------- Retry-After


def test_retry_after_seconds_and_http_dates():
    now = 1_700_000_000.0
    assert parse_retry_after("0") == 0.0
    assert parse_retry_after(" 120 ") == 120.0
    assert parse_retry_after(email.utils.formatdate(now + 30, usegmt=True), now=now) == pytest.approx(30.0)
    assert parse_retry_after(email.utils.formatdate(now - 30, usegmt=True), now=now) == 0.0
    for bad in (None, "", "soon", "-5", "1.5", "Mon, 99 Foo 2024"):
        assert parse_retry_after(bad, now=now) is None


# --------------------------------------------------------------------------- the request


def test_request_is_cloudevents_structured_mode_with_signature_and_idempotency_key():
    ev = batch_event()
    ev.subject = "notes é 1"
    headers, body = build_request(ev, "batches", SECRET, now=1_700_000_000)
    assert headers["content-type"] == "application/cloudevents+json"
    assert not [h for h in headers if h.lower().startswith("ce-")]  # every attribute is in the signed body
    assert headers["Idempotency-Key"] == headers["webhook-id"] == f"{ev.id}:batches"
    assert headers["webhook-timestamp"] == "1700000000"
    assert verify(SECRET, headers, body, now=1_700_000_000)
    doc = json.loads(body)
    assert doc["id"] == ev.id and doc["type"] == BATCH_COMPLETED and doc["source"] == "chora://assembler"
    assert doc["traceid"] == "trace-42" and doc["traceparent"] == ev.traceparent
    assert doc["data"] == {"batch_id": "b-1", "status": "success", "total": 2, "successful": 2, "failed": 0}
    # the official SDK reads it back as the same event
    back = from_structured(HTTPMessage(headers=headers, body=body), JSONFormat())
    assert back.get_id() == ev.id and back.get_type() == BATCH_COMPLETED and back.get_source() == ev.source
    assert back.get_subject() == "notes é 1"
    assert back.get_time().isoformat().startswith(ev.time[:19])


def test_extensions_are_attributes_in_the_signed_body():
    ev = batch_event()
    ev.extensions = {"tenant": "acme"}
    headers, body = build_request(ev, "batches", SECRET)
    assert json.loads(body)["tenant"] == "acme" and verify(SECRET, headers, body)


def test_every_secret_of_a_rotation_signs():
    old, new = b"old-secret", b"new-secret"
    headers, body = build_request(batch_event(), "batches", (old, new))
    assert len(headers["webhook-signature"].split(" ")) == 2
    assert verify(old, headers, body) and verify(new, headers, body) and not verify(b"other", headers, body)


def test_event_the_sdk_cannot_express_is_undeliverable():
    ev = batch_event()
    ev.time = "yesterday at noon"
    with pytest.raises(UndeliverableEvent, match="time"):
        to_sdk_event(ev)


def test_the_secret_is_not_in_the_request_except_as_hmac():
    headers, body = build_request(batch_event(), "batches", SECRET)
    assert SECRET.decode() not in json.dumps(headers) and SECRET not in body


def test_url_credentials_become_basic_auth_and_leave_the_url():
    import base64

    from services.notifier.delivery import split_credentials

    url, auth = split_credentials("https://hooks:p%40ss@example.test:8443/in?x=1")
    assert url == "https://example.test:8443/in?x=1"
    request = next(auth.auth_flow(__import__("httpx2").Request("POST", url)))
    assert request.headers["Authorization"] == "Basic " + base64.b64encode(b"hooks:p@ss").decode()
    assert split_credentials("http://127.0.0.1:9/x") == ("http://127.0.0.1:9/x", None)
