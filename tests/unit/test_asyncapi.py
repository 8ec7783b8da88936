"""The AsyncAPI document: checked in and drift-free, built from the catalogue, and its one
table of who sends and receives what (contracts.asyncapi.SERVICES) matches the topology's
consumers and the events each service's code builds. (Its validity by the official parser
is a dev-time check: `make check-asyncapi`.)"""

from __future__ import annotations

import json
import re
from pathlib import Path

import msgspec

from bus.topology import Topology
from chora.cli import main
from contracts import asyncapi, catalogue
from contracts.catalogue import CATALOGUE
from services.notifier.config import Subscription
from services.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
SERVICES_WITH_TOPOLOGY = ("generator", "validator", "assembler", "notifier-callbacks")
# durable -> the party of contracts.asyncapi.SERVICES it belongs to, where the names differ
PARTY_OF = {
    "assembler-completions": "assembler",
    "assembler-cancels": "assembler",
    "assembler-deadlines": "assembler",
    "generator-compensations": "generator",
    "notifier-callback-requests": "notifier-callbacks",
}


def test_the_checked_in_document_matches_the_catalogue():
    on_disk = asyncapi.ASYNCAPI_FILE.read_text()
    assert on_disk == asyncapi.generate(), "asyncapi.json drifted: run `chora contracts asyncapi --write` and commit it"


def test_chora_contracts_asyncapi_prints_it(capsys):
    assert main(["contracts", "asyncapi"]) == 0
    assert capsys.readouterr().out == asyncapi.ASYNCAPI_FILE.read_text()
    assert main(["contracts", "asyncapi", "--prefix", "acme"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["channels"]["generation.requested"]["address"] == "acme.generation.requested"


def test_every_event_type_is_a_channel_with_its_cloudevent_message():
    doc = asyncapi.document()
    assert doc["asyncapi"] == "3.0.0"
    # a type split by origin: one channel, its last token a parameter (subscribing to all: <type>.*)
    addresses = {c["address"].replace("{origin_kind}", "*") for c in doc["channels"].values()}
    assert addresses == set(catalogue.all_subjects())
    assert doc["channels"]["generation.requested.callback"]["address"] == "chora.generation.requested.callback"
    outcomes = doc["channels"]["content_generated"]
    assert outcomes["address"] == "chora.content_generated.{origin_kind}"
    assert outcomes["parameters"]["origin_kind"]["enum"] == ["standalone", "artifact", "batch"]
    schemas = doc["components"]["schemas"]
    for event_type, spec in CATALOGUE.items():
        msg = doc["components"]["messages"][event_type]
        name = spec.struct.__name__
        assert msg["payload"] == {"$ref": f"#/components/schemas/{name}"}
        # the payload schema is the Struct's, as in contracts/schemas/<type>.json
        published = (ROOT / "contracts" / "schemas" / f"{event_type}.json").read_text()
        published = json.loads(published.replace('"#/$defs/', '"#/components/schemas/'))
        assert schemas[name] == published["$defs"][name]
        assert msg["headers"]["properties"]["ce-type"]["const"] == event_type
        assert set(msg["headers"]["required"]) == {"ce-specversion", "ce-id", "ce-source", "ce-type"}
    refs = re.findall(r'"\$ref": "#/components/schemas/(\w+)"', asyncapi.generate())
    assert set(refs) <= set(schemas)


def test_receivers_match_the_topology():
    topo = Topology.from_settings(Settings(prefix="chora"))
    derived: dict[str, dict[str, str]] = {}
    for spec in topo.consumers.values():
        service = PARTY_OF.get(spec.durable, spec.durable)
        for event_type in spec.event_types or CATALOGUE:
            derived.setdefault(service, {})[event_type] = spec.durable
        # the origin kinds a consumer narrows its outcomes to are the document's too
        assert asyncapi.SERVICES[service].kinds.get(spec.durable) == spec.origin_kinds, spec.durable
        # and so are the durables that read only the requests with a callback_url
        assert (spec.durable in asyncapi.SERVICES[service].callbacks_only) == spec.callbacks_only, spec.durable
    assert set(derived) == set(SERVICES_WITH_TOPOLOGY)
    for service in SERVICES_WITH_TOPOLOGY:
        assert asyncapi.SERVICES[service].receives == derived[service], service
    # the telemetry sink: no durable, every instance reads every event (bus.mirror)
    assert asyncapi.SERVICES["telemetry"].receives == dict.fromkeys(CATALOGUE, None)
    # the notifier: one durable per subscription, any event type
    sub = Subscription(name="ops", events=["chora.*"], url="https://hooks.example.com/x", secret_env="S")
    assert asyncapi.SERVICES["notifier"].receives == dict.fromkeys(CATALOGUE, "notify-<subscription>")
    assert sub.durable == "notify-ops"


def _types_built_in(service: str) -> set[str]:
    """The event types a service's code passes to new_event(...)."""
    names = set()
    for path in (ROOT / "services" / service).rglob("*.py"):
        names |= set(re.findall(r"new_event\(\s*([A-Z_]+)\b", path.read_text()))
    return {getattr(catalogue, n) for n in names}


def test_senders_match_what_each_service_builds():
    for service in ("generator", "validator", "assembler", "notifier", "telemetry"):
        assert set(asyncapi.SERVICES[service].sends) == _types_built_in(service), service


def test_operations_cover_each_party_both_ways():
    ops = asyncapi.document()["operations"]
    assert ops["generator.receive.generation.requested"]["bindings"]["nats"]["queue"] == "generator"
    assert ops["assembler.receive.batch_completed"]["bindings"]["nats"]["queue"] == "assembler-completions"
    assert ops["client.send.generation.requested"]["action"] == "send"
    # a request that may carry a callback_url has two channels: each party that sends or receives
    # it has an operation on each (the notifier's callback reader: on the .callback one only)
    split = {t for t, s in CATALOGUE.items() if s.by_callback}
    counted = sum(
        len(r.receives)
        + sum(1 for t, d in r.receives.items() if t in split and d not in r.callbacks_only)
        + len(r.sends)
        + (len(split & set(r.sends)) if r.sends_callbacks else 0)
        for r in asyncapi.SERVICES.values()
    )
    assert len(ops) == counted
    assert "notifier-callbacks.receive.generation.requested" not in ops
    reader = ops["notifier-callbacks.receive.generation.requested.callback"]
    assert reader["channel"] == {"$ref": "#/channels/generation.requested.callback"}
    assert reader["bindings"]["nats"]["queue"] == "notifier-callback-requests"
    assert "generator.receive.generation.requested.callback" in ops
    assert "client.send.batch.requested.callback" in ops
    assert "assembler.send.generation.requested.callback" not in ops  # parts and items have no callback
    assert msgspec.json.decode(asyncapi.generate())["operations"] == ops
