"""Webhook signatures to the Standard Webhooks spec: v1,<base64 HMAC-SHA256 of id.timestamp.body>,
secrets as whsec_<base64> or raw, several during a rotation; checked by the spec's own
Python package as a receiver would."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from services.notifier.signing import SecretError, parse_secrets, signature, signature_headers, verify

KEY = b"s3cret-key-for-tests-0123456789ab"
WHSEC = "whsec_" + base64.b64encode(KEY).decode()
BODY = b'{"id":"e1","type":"chora.batch_completed","data":{"batch_id":"b1"}}'


def test_signature_is_base64_hmac_sha256_over_id_timestamp_body():
    expected = base64.b64encode(hmac.new(KEY, b"e1:hook.1700000000." + BODY, hashlib.sha256).digest()).decode()
    assert signature(KEY, "e1:hook", 1700000000, BODY) == "v1," + expected


def test_headers_carry_id_timestamp_and_one_signature_per_secret():
    h = signature_headers((KEY, b"next"), "e1:hook", BODY, now=1700000123.9)
    assert h["webhook-id"] == "e1:hook" and h["webhook-timestamp"] == "1700000123"
    assert h["webhook-signature"].split(" ") == [
        signature(KEY, "e1:hook", 1700000123, BODY),
        signature(b"next", "e1:hook", 1700000123, BODY),
    ]


def test_whsec_secrets_are_decoded_and_others_are_raw_bytes():
    assert parse_secrets(WHSEC) == (KEY,)
    assert parse_secrets(WHSEC.rstrip("=")) == (KEY,)  # unpadded base64, as some tools print it
    assert parse_secrets("hunter2") == (b"hunter2",)
    assert parse_secrets(f"  {WHSEC}\n hunter2 ") == (KEY, b"hunter2")  # a rotation: both sign


@pytest.mark.parametrize(
    "value, problem", [("", "no secret"), ("  ", "no secret"), ("whsec_", "empty key"), ("whsec_!!", "not base64")]
)
def test_unusable_secrets_are_refused_without_showing_them(value, problem):
    with pytest.raises(SecretError, match=problem) as e:
        parse_secrets(value)
    assert "!!" not in str(e.value)


@pytest.mark.parametrize("receiver_secret", [WHSEC, KEY])
def test_the_standardwebhooks_package_verifies_our_signatures(receiver_secret):
    headers = signature_headers(parse_secrets(WHSEC), "e1:hook", BODY)
    assert Webhook(receiver_secret).verify(BODY, headers) == {
        "id": "e1",
        "type": "chora.batch_completed",
        "data": {"batch_id": "b1"},
    }


def test_a_raw_secret_verifies_as_raw_bytes():
    headers = signature_headers(parse_secrets("hunter2"), "e1:hook", BODY)
    Webhook(b"hunter2").verify(BODY, headers)


def test_a_receiver_with_either_secret_of_a_rotation_accepts():
    other = "whsec_" + base64.b64encode(b"the-new-key").decode()
    headers = signature_headers(parse_secrets(f"{WHSEC} {other}"), "e1:hook", BODY)
    Webhook(WHSEC).verify(BODY, headers)
    Webhook(other).verify(BODY, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(base64.b64encode(b"a-third-key").decode()).verify(BODY, headers)


@pytest.mark.parametrize(
    "tamper",
    [
        lambda h, b: (h | {"webhook-id": "e2:hook"}, b),
        lambda h, b: (h | {"webhook-timestamp": str(int(h["webhook-timestamp"]) + 1)}, b),
        lambda h, b: (h, b.replace(b"b1", b"b2")),
        lambda h, b: (h, b.replace(b"chora.batch_completed", b"chora.content_generated")),
    ],
    ids=["id", "timestamp", "data", "type attribute"],
)
def test_tampered_requests_are_refused(tamper):
    headers, body = tamper(signature_headers(parse_secrets(WHSEC), "e1:hook", BODY), BODY)
    with pytest.raises(WebhookVerificationError):
        Webhook(WHSEC).verify(body, headers)
    assert not verify(KEY, headers, body)


def test_verify_refuses_stale_timestamps_unless_told_not_to():
    headers = signature_headers(KEY, "e1:hook", BODY, now=1700000000)
    assert verify(KEY, headers, BODY, now=1700000010)
    assert not verify(KEY, headers, BODY, now=1700000301)
    assert verify(KEY, headers, BODY, now=1700000301, tolerance_s=None)
    with pytest.raises(WebhookVerificationError, match="too old"):
        Webhook(WHSEC).verify(BODY, headers)
