"""Property-based tests (hypothesis): the envelope decoder and the config loader
turn any input into either a value or their one documented error, never a crash."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from composition.configs import ConfigError, ConfigStore
from contracts.catalogue import CATALOGUE, GENERATION_REQUESTED
from contracts.envelope import EnvelopeError, decode, encode_binary, encode_structured, new_event
from contracts.events import GenerationRequested

header_names = st.one_of(
    st.sampled_from(
        [
            "ce-id",
            "ce-source",
            "ce-type",
            "ce-specversion",
            "ce-time",
            "ce-datacontenttype",
            "ce-subject",
            "ce-traceid",
            "ce-traceparent",
            "Content-Type",
            "ce-x",
            "Nats-Msg-Id",
        ]
    ),
    st.text(min_size=1, max_size=20),
)
header_values = st.one_of(
    st.sampled_from(
        [
            "1.0",
            "0.3",
            GENERATION_REQUESTED,
            "chora.nope",
            "application/json",
            "application/cloudevents+json",
            "text/plain",
            "%",
            "%zz",
            "%C3%28",
            "%E2%82%AC",
        ]
    ),
    st.text(max_size=40),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
bodies = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({"content_config_id": st.text(max_size=20), "context": json_values}).map(
        lambda v: json.dumps(v).encode()
    ),
)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(header_names, header_values, max_size=8), bodies)
def test_decode_returns_an_event_or_an_envelope_error(headers, body):
    try:
        ev = decode(headers, body)
    except EnvelopeError as e:
        assert e.code.isupper() and e.message
    else:
        assert ev.id and ev.source and ev.type in CATALOGUE and ev.specversion == "1.0"


@settings(max_examples=200, deadline=None)
@given(
    st.text(min_size=1, max_size=40),
    st.dictionaries(st.text(max_size=10), json_values, max_size=5),
    st.text(max_size=30),
    st.booleans(),
)
def test_any_valid_event_round_trips_in_both_modes(config_id, context, subject, structured):
    ev = new_event(
        GENERATION_REQUESTED,
        GenerationRequested(content_config_id=config_id, context=context),
        source="p",
        subject=subject or None,
    )
    headers, body = (encode_structured if structured else encode_binary)(ev)
    back = decode(headers, body)
    assert back.id == ev.id and back.subject == ev.subject and back.traceid == ev.traceid
    assert back.data == ev.data


config_docs = st.one_of(
    st.text(max_size=200),
    json_values.map(json.dumps),
    st.fixed_dictionaries(
        {
            "id": st.sampled_from(["p", "x", "P", "../p"]),
            "generator": st.sampled_from(["jinja2", "template_fill", "nope", 3]),
        },
        optional={
            "template": st.one_of(st.text(max_size=30), st.integers()),
            "template_file": st.text(max_size=30),
            "context": json_values,
            "extra": st.text(max_size=5),
            "validation": json_values,
        },
    ).map(lambda d: yaml.safe_dump(d)),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(config_docs, st.sampled_from(["p.yaml", "p.json", "p.yml"]))
def test_config_loader_loads_or_says_why(doc, name):
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / name).write_text(doc)
        try:
            cfg = ConfigStore(Path(d)).get("p")
        except ConfigError as e:
            assert e.code in {
                "CONFIG_INVALID",
                "CONFIG_NOT_FOUND",
                "TEMPLATE_NOT_FOUND",
                "PATH_OUTSIDE_CONFIGS",
                "INVALID_CONFIG_ID",
            }
            assert e.message
        else:
            assert cfg.id == "p"


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_no_config_id_reaches_outside_the_directory(config_id):
    with tempfile.TemporaryDirectory() as root:
        inside = Path(root) / "configs"
        inside.mkdir()
        (Path(root) / "secret.yaml").write_text("id: secret\ngenerator: demonstration\nexample_output: leaked\n")
        try:
            cfg = ConfigStore(inside).get(config_id)
        except ConfigError:
            return
        assert Path(cfg.path).resolve().is_relative_to(inside.resolve())
