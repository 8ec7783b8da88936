"""Webhook signatures: HMAC-SHA256 over "<timestamp>." + body."""

from __future__ import annotations

import hashlib
import hmac

from services.notifier.signing import SIGNATURE_HEADER, TIMESTAMP_HEADER, signature, signature_headers, verify

SECRET = b"s3cret-for-tests"
BODY = b'{"batch_id":"b1","status":"success"}'


def test_signature_is_hmac_sha256_over_timestamp_dot_body():
    expected = hmac.new(SECRET, b"1700000000." + BODY, hashlib.sha256).hexdigest()
    assert signature(SECRET, 1700000000, BODY) == "sha256=" + expected


def test_headers_carry_timestamp_and_matching_signature():
    h = signature_headers(SECRET, BODY, now=1700000123.9)
    assert h[TIMESTAMP_HEADER] == "1700000123"
    assert h[SIGNATURE_HEADER] == signature(SECRET, 1700000123, BODY)


def test_verify_accepts_the_right_secret_and_refuses_everything_else():
    ts = 1700000000
    sig = signature(SECRET, ts, BODY)
    assert verify(SECRET, str(ts), BODY, sig, now=ts + 10)
    assert not verify(b"other", str(ts), BODY, sig, now=ts)  # wrong secret
    assert not verify(SECRET, str(ts), BODY + b" ", sig, now=ts)  # body changed
    assert not verify(SECRET, str(ts + 1), BODY, sig, now=ts)  # timestamp changed
    assert not verify(SECRET, str(ts), BODY, sig.removeprefix("sha256="), now=ts)  # no scheme
    assert not verify(SECRET, "soon", BODY, sig, now=ts)  # not a number


def test_verify_refuses_stale_timestamps_unless_told_not_to():
    ts = 1700000000
    sig = signature(SECRET, ts, BODY)
    assert not verify(SECRET, ts, BODY, sig, now=ts + 301)
    assert verify(SECRET, ts, BODY, sig, now=ts + 301, tolerance_s=None)
