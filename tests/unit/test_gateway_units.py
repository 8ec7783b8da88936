"""The gateway's pieces without a server: the checked-in OpenAPI document, keys, the rate
limit, Prefer/timeout, trace parsing."""

from __future__ import annotations

import json

import pytest

from services.gateway import openapi
from services.gateway.app import wait_time
from services.gateway.model import GatewayError, Trace
from services.gateway.security import KeyRing, KeysError, RateLimiter, hash_key, load_keys
from services.gateway.settings import GatewaySettings


def test_the_checked_in_openapi_document_matches_the_app():
    on_disk = openapi.OPENAPI_PATH.read_text()
    assert on_disk == openapi.text(), "the OpenAPI document drifted: run `chora contracts openapi` and commit it"
    doc = json.loads(on_disk)
    assert {"/v1/generate", "/v1/artifacts", "/v1/batches", "/v1/events", "/v1/capabilities"} <= set(doc["paths"])
    assert {"HTTPBearer", "APIKeyHeader"} <= set(doc["components"]["securitySchemes"])


def test_keys_file_is_hashed_keys_with_scopes_and_bad_ones_are_named(tmp_path):
    good = tmp_path / "keys.yaml"
    good.write_text(f"- {{name: ci, key_sha256: {hash_key('s3cret')}, scopes: [generate, read]}}\n")
    ring = KeyRing(load_keys(good))
    p = ring.identify("s3cret")
    assert p.name == "ci" and p.allows("generate") and p.allows("read") and not p.allows("batch")
    with pytest.raises(GatewayError) as e:
        ring.identify("S3cret")
    assert e.value.status == 401
    with pytest.raises(GatewayError) as e:
        ring.identify(None)
    assert e.value.status == 401 and "WWW-Authenticate" in e.value.headers
    for text, why in [
        ("- {name: x, key_sha256: abc, scopes: [read]}", "64 hex"),
        (f"- {{name: x, key_sha256: '{'0' * 64}', scopes: [root]}}", "scopes"),
        ("{not: a list}", "expected a list"),
    ]:
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(KeysError, match=why):
            load_keys(bad)


def test_admin_holds_every_scope_and_auth_off_is_anonymous():
    ring = KeyRing([], enabled=False)
    assert ring.identify(None).allows("batch")


def test_the_token_bucket_allows_a_burst_then_429_with_retry_after():
    limiter = RateLimiter(rate=0.5, burst=2)
    limiter.take("a")
    limiter.take("a")
    with pytest.raises(GatewayError) as e:
        limiter.take("a")
    assert e.value.status == 429 and int(e.value.headers["Retry-After"]) >= 1
    limiter.take("b")  # its own bucket


@pytest.mark.parametrize(
    "timeout, prefer, expected",
    [
        (5.0, "wait=1", (5.0, None)),
        (None, "wait=7", (7.0, "wait=7")),
        (None, "respond-async, wait=3", (3.0, "wait=3")),
        (None, "wait=100000", (300.0, "wait=300")),
        (None, "respond-async", (0.0, "respond-async")),
        (None, None, (None, None)),
        (None, "handling=lenient", (None, None)),
    ],
)
def test_timeout_query_wins_then_prefer_wait_capped(timeout, prefer, expected):
    assert wait_time(timeout, prefer, GatewaySettings()) == expected


def test_trace_from_headers():
    assert Trace.parse("abc-1").trace_id == "abc-1"
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    assert Trace.parse(None, tp) == Trace("0af7651916cd43dd8448eb211c80319c", tp)
    assert len(Trace.parse(None, "garbage").trace_id) == 32
    with pytest.raises(GatewayError) as e:
        Trace.parse("no spaces allowed")
    assert (e.value.status, e.value.code) == (400, "BAD_TRACE_ID")
