"""Request context in the JSONL: a digest and the key names by default, the values only
for configs that opt in (services/telemetry/privacy.py), redaction by key name on top."""

from __future__ import annotations

import hashlib
import json

import msgspec
import pytest
from prometheus_client import generate_latest

from composition.artifacts import ArtifactStore
from composition.configs import ConfigError, ConfigStore
from contracts.catalogue import ARTIFACT_REQUESTED, BATCH_REQUESTED, GENERATION_REQUESTED
from contracts.envelope import new_event
from contracts.events import ArtifactRequested, BatchItem, BatchRequested, GenerationRequested
from services.telemetry.lines import to_record
from services.telemetry.metrics import TelemetryMetrics
from services.telemetry.privacy import ConfigOptIn, canonical_json, context_digest, private_data
from tests.conftest import write

CTX = {"name": "Ada Lovelace", "account": {"email": "ada@example.org", "tier": 3}}


def sha(ctx) -> str:
    return (
        "sha256:"
        + hashlib.sha256(
            json.dumps(ctx, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        ).hexdigest()
    )


def keeps(*opted: str):
    return lambda kind, config_id: f"{kind}:{config_id}" in opted


def test_digest_is_sha256_of_canonical_json_and_top_level_keys_sorted():
    d = context_digest({"b": 1, "a": {"d": [1, "é"], "c": None}})
    assert d == {"context_sha256": sha({"b": 1, "a": {"d": [1, "é"], "c": None}}), "context_keys": ["a", "b"]}
    # Key order does not change the digest; a value does.
    assert context_digest({"a": {"c": None, "d": [1, "é"]}, "b": 1}) == d
    assert context_digest({"b": 2, "a": {"d": [1, "é"], "c": None}})["context_sha256"] != d["context_sha256"]
    assert canonical_json({"b": 1, "a": "é"}) == '{"a":"é","b":1}'.encode()


def test_generation_request_context_becomes_a_digest_in_place():
    data = {"content_config_id": "report", "context": CTX, "no_cache": True}
    out = private_data(data)
    assert list(out) == ["content_config_id", "context_sha256", "context_keys", "no_cache"]
    assert out["context_sha256"] == sha(CTX) and out["context_keys"] == ["account", "name"]
    assert data["context"] is CTX  # the payload itself is left alone


def test_opted_in_content_config_keeps_the_values():
    data = {"content_config_id": "report", "context": CTX}
    assert private_data(data, keeps("content:report")) == data
    assert "context" not in private_data(data, keeps("artifact:report"))  # the artifact namesake does not count


def test_artifact_request_follows_its_artifact_config():
    data = {"artifact_id": "docs", "context": CTX}
    assert private_data(data, keeps("artifact:docs"))["context"] == CTX
    assert "context" not in private_data(data, keeps("content:docs"))


def test_batch_items_follow_their_own_configs_and_the_shared_context_needs_them_all():
    data = {
        "items": [
            {"content_config_id": "open", "context": {"n": 1}},
            {"content_config_id": "closed", "context": {"n": 2}},
            {"content_config_id": "open"},
        ],
        "context": CTX,
    }
    out = private_data(data, keeps("content:open"))
    assert out["items"][0] == {"content_config_id": "open", "context": {"n": 1}}
    assert out["items"][1] == {"content_config_id": "closed", **context_digest({"n": 2})}
    assert out["items"][2] == {"content_config_id": "open"}
    assert "context" not in out and out["context_keys"] == ["account", "name"]  # "closed" did not opt in
    everyone = private_data(data, keeps("content:open", "content:closed"))
    assert everyone == data


def test_batch_by_reference_keeps_its_reference_and_hashes_the_shared_context():
    data = {"items_ref": "batch-items/abc", "item_count": 5, "context": CTX}
    out = private_data(data, keeps("content:open"))
    assert out["items_ref"] == "batch-items/abc" and out["item_count"] == 5
    assert "context" not in out and out["context_sha256"] == sha(CTX)


def test_payload_without_context_is_returned_as_is():
    data = {"batch_id": "b", "items": [{"index": 0, "content_config_id": "x", "status": "success"}]}
    assert private_data(data) is data


def test_a_failing_policy_keeps_nothing():
    def broken(kind, config_id):
        raise RuntimeError("boom")

    assert "context" not in private_data({"content_config_id": "x", "context": CTX}, broken)


def test_lines_hash_every_request_kind_and_redaction_still_applies_to_kept_values():
    secret = {"name": "Ada", "password": "hunter2"}
    events = [
        new_event(GENERATION_REQUESTED, GenerationRequested(content_config_id="gen", context=secret), source="t"),
        new_event(ARTIFACT_REQUESTED, ArtifactRequested(artifact_id="art", context=secret), source="t"),
        new_event(
            BATCH_REQUESTED,
            BatchRequested(items=[BatchItem(content_config_id="gen", context=secret)], context=secret),
            source="t",
        ),
    ]
    for ev in events:
        text = json.dumps(to_record(ev))
        assert "Ada" not in text and "hunter2" not in text and sha(secret) in text, ev.type
    kept = [to_record(ev, keep_context=keeps("content:gen", "artifact:art")) for ev in events]
    assert kept[0]["context"] == kept[1]["context"] == {"name": "Ada", "password": "[REDACTED]"}
    assert kept[2]["context"] == kept[2]["items"][0]["context"] == {"name": "Ada", "password": "[REDACTED]"}


def test_prometheus_labels_carry_no_context_value():
    metrics = TelemetryMetrics()
    ctx = {"name": "Zebediah-Quux", "tier": "platinum-9"}
    for ev in (
        new_event(GENERATION_REQUESTED, GenerationRequested(content_config_id="gen", context=ctx), source="t"),
        new_event(ARTIFACT_REQUESTED, ArtifactRequested(artifact_id="art", context=ctx), source="t"),
        new_event(BATCH_REQUESTED, BatchRequested(items=[BatchItem(content_config_id="g", context=ctx)]), source="t"),
    ):
        metrics.mirrored([(ev.type, msgspec.to_builtins(ev.data), 0)], 0.0)
    text = generate_latest(metrics.registry).decode()
    assert 'chora_events_total{event_type="chora.generation.requested",status="ok"} 1.0' in text
    assert "Zebediah" not in text and "platinum" not in text


# --------------------------------------------------------------------------- opting in, from the configs


@pytest.fixture
def cdir(tmp_path):
    d = tmp_path / "configs"
    write(d / "open.json", {"id": "open", "generator": "jinja2", "template": "x", "telemetry": {"keep_context": True}})
    write(d / "closed.json", {"id": "closed", "generator": "jinja2", "template": "x"})
    write(d / "broken.yaml", "id: broken\ngenerator: [\n")
    parts = [{"id": "p", "content_config_id": "closed"}]
    write(d / "artifacts" / "art.json", {"id": "art", "parts": parts, "telemetry": {"keep_context": True}})
    write(d / "artifacts" / "plain.json", {"id": "plain", "parts": parts})
    return d


def test_config_opt_in_reads_content_and_artifact_configs(cdir):
    now = [0.0]
    opt_in = ConfigOptIn(cdir, ttl_s=5.0, clock=lambda: now[0])
    assert opt_in("content", "open") is True
    assert opt_in("content", "closed") is False
    assert opt_in("artifact", "art") is True
    assert opt_in("artifact", "plain") is False
    # Unknown, broken, invalid ids: not opted in, and no exception reaches the sink.
    for kind, cid in [("content", "nope"), ("content", "broken"), ("artifact", "open"), ("content", "../etc/x")]:
        assert opt_in(kind, cid) is False  # type: ignore[arg-type]
    # An edit counts once the remembered answer expires.
    write(
        cdir / "closed.json",
        {"id": "closed", "generator": "jinja2", "template": "x", "telemetry": {"keep_context": True}},
    )
    assert opt_in("content", "closed") is False
    now[0] = 6.0
    assert opt_in("content", "closed") is True


def test_telemetry_setting_is_validated_like_every_config_field(cdir):
    write(cdir / "typo.json", {"id": "typo", "generator": "jinja2", "template": "x", "telemetry": {"keep": True}})
    with pytest.raises(ConfigError, match="telemetry.keep: unknown field"):
        ConfigStore(cdir).get("typo")
    assert ConfigStore(cdir).get("closed").spec.telemetry.keep_context is False
    assert ArtifactStore(cdir).get("art").spec.telemetry.keep_context is True
