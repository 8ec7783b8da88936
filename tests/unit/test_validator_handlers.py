"""The validator's handler and app: one verdict per successful generation, and
a broken config reported once per version (across redeliveries and instances)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from contracts.handling import Delivery, Reject, Retry
from composition.configs import ConfigStore
from services.settings import Settings
from contracts.catalogue import CONFIG_VALIDATED, CONTENT_GENERATED, CONTENT_VALIDATED, GENERATION_REQUESTED
from contracts.envelope import decode, encode_binary, new_event
from contracts.events import ConfigValidated, ContentGenerated, ContentValidated, GenerationRequested, Origin
from services.generator.generators import GeneratorRegistry
from services.generator import handlers as generator
from services.validator.handlers import (
    SOURCE,
    claim_report,
    config_report_id,
    Deps,
    on_content_generated,
    report_key,
)
from services.validator.rules import RuleCache
from services.validator.service import ValidatorApp, build
from tests.conftest import example_configs, self_contained_examples, write
from tests.fakes import MemoryState

EXAMPLES = example_configs()


class BrokenState:
    async def create(self, key, value):
        raise ConnectionError("no KV")

    async def get(self, key):
        raise ConnectionError("no KV")


@pytest.fixture
def cdir(tmp_path) -> Path:
    d = tmp_path / "configs"
    write(d / "plain.json", {"id": "plain", "generator": "jinja2", "template": "x"})
    write(
        d / "doc.json",
        {
            "id": "doc",
            "generator": "jinja2",
            "template": "x",
            "validation": [
                {"type": "required_sections", "sections": ["Summary"]},
                {"type": "placeholders", "severity": "warning"},
            ],
        },
    )
    write(
        d / "broken.json",
        {
            "id": "broken",
            "generator": "jinja2",
            "template": "x",
            "validation": [{"type": "contains", "value": "x"}, {"type": "regex", "pattern": "("}],
        },
    )
    write(d / "unparsable.yaml", "id: unparsable\ngenerator: [\n")
    return d


@pytest.fixture
def store(cdir) -> ConfigStore:
    return ConfigStore(cdir)


def generated(config_id="doc", content="# Summary\nAll good.\n", *, status="success", trace_id="trace-v", **kw):
    data = ContentGenerated(
        request_id=kw.pop("request_id", "req-1"),
        content_config_id=config_id,
        status=status,
        generator_type="jinja2",
        content=content if status == "success" else None,
        content_hash="sha256:abc" if status == "success" else None,
        content_length=len(content) if status == "success" and content is not None else None,
        **kw,
    )
    return new_event(CONTENT_GENERATED, data, source="chora://generator", trace_id=trace_id)


async def run(ev, store, state=None, rules=None):
    deps = Deps(store, rules if rules is not None else RuleCache(), state)
    return await on_content_generated(ev, Delivery.first("validator"), deps)


def verdict(out) -> ContentValidated:
    (ev,) = [e for e in out if e.type == CONTENT_VALIDATED]
    assert isinstance(ev.data, ContentValidated)
    return ev.data


def reports(out) -> list:
    return [e for e in out if e.type == CONFIG_VALIDATED]


# --------------------------------------------------------------------------- verdicts


async def test_valid_content_carries_everything_on(store):
    origin = Origin(kind="artifact", id="art-1", key="intro")
    ev = generated(origin=origin)
    out = await run(ev, store)
    # The first content of this config version also reports the version (status success).
    assert [e.type for e in out] == [CONFIG_VALIDATED, CONTENT_VALIDATED]
    res = out[1]
    assert res.source == SOURCE and res.traceid == "trace-v"
    d = res.data
    assert d.valid is True and d.issues == []
    assert (d.request_id, d.content_config_id, d.content, d.content_hash, d.content_length, d.origin) == (
        "req-1",
        "doc",
        "# Summary\nAll good.\n",
        "sha256:abc",
        len("# Summary\nAll good.\n"),
        origin,
    )
    # Caused by the content_generated: handling it again gives the same id (JetStream drops the re-publish).
    assert (await run(ev, store))[1].id == res.id
    # It survives the wire.
    h, b = encode_binary(res)
    assert decode(h, b).data == d


async def test_no_rules_is_valid_with_no_issues(store):
    d = verdict(await run(generated("plain", "anything TODO..."), store))
    assert d.valid is True and d.issues == []


async def test_failed_error_rule_makes_it_invalid(store):
    d = verdict(await run(generated("doc", "no heading here"), store))
    assert d.valid is False
    assert [(i.rule, i.severity) for i in d.issues] == [("required_sections", "error")]
    assert "'Summary'" in d.issues[0].message


async def test_warnings_alone_keep_it_valid(store):
    d = verdict(await run(generated("doc", "# Summary\nTODO"), store))
    assert d.valid is True
    assert [(i.rule, i.severity) for i in d.issues] == [("placeholders", "warning")]


async def test_error_outcomes_are_acked_with_nothing_published(store):
    assert await run(generated("doc", status="error"), store) == []


async def test_content_by_reference_goes_on_by_reference(store):
    ev = generated("doc", "# Summary\nbig", content_ref="obj://B/x")
    d = verdict(await run(ev, store))
    assert d.content is None and d.content_ref == "obj://B/x" and d.valid


async def test_unresolved_reference_is_rejected(store):
    ev = generated("doc", None, content_ref="obj://B/x")
    with pytest.raises(Reject) as e:
        await run(ev, store)
    assert e.value.code == "CONTENT_MISSING"


async def test_success_without_content_is_judged_as_empty(store):
    d = verdict(await run(generated("doc", None), store))
    assert d.valid is False and d.content == "" and d.content_length == 0


async def test_wrong_type_and_bad_data_are_rejected(store):
    req = new_event(GENERATION_REQUESTED, GenerationRequested(content_config_id="doc"), source="t")
    with pytest.raises(Reject) as e:
        await run(req, store)
    assert e.value.code == "UNEXPECTED_TYPE"
    ev = generated()
    ev.data = {"request_id": "r", "content_config_id": "doc", "status": "success", "content": "# Summary"}
    assert verdict(await run(ev, store)).valid
    ev.data = {"status": "sideways"}
    with pytest.raises(Reject) as e:
        await run(ev, store)
    assert e.value.code == "INVALID_DATA"


async def test_rules_compiled_once_for_many_events(store):
    rules = RuleCache()
    for n in range(20):
        await run(generated("doc", f"# Summary\n{n}"), store, rules=rules)
    assert rules.compiled == 1


# --------------------------------------------------------------------------- broken configs


async def test_invalid_rules_give_an_invalid_verdict_and_one_report(store):
    state = MemoryState()
    ev = generated("broken", "fine text")
    out = await run(ev, store, state)
    assert [e.type for e in out] == [CONFIG_VALIDATED, CONTENT_VALIDATED]
    d = verdict(out)
    assert d.valid is False
    (issue,) = d.issues
    assert issue.rule == "config" and issue.severity == "error"
    assert "has invalid validation rules" in issue.message
    assert (
        "validation[0]: unknown rule type 'contains'" in issue.message
        and "validation[1] (regex): bad pattern" in issue.message
    )
    (rep,) = reports(out)
    r: ConfigValidated = rep.data
    assert r.content_config_id == "broken" and r.status == "error"
    assert r.error.code == "INVALID_RULES" and "validation[1]" in r.error.message
    assert r.config_hash.startswith("sha256:")
    assert rep.id == config_report_id("broken", r.config_hash)
    assert rep.traceid == "trace-v"
    assert list(state.data) == [report_key("broken", r.config_hash)]
    assert json.loads(state.data[report_key("broken", r.config_hash)][0])["cause"] == ev.id


async def test_unloadable_config_is_reported_with_its_error_code(store):
    state = MemoryState()
    out = await run(generated("unparsable", "x"), store, state)
    (rep,) = reports(out)
    assert rep.data.error.code == "CONFIG_INVALID" and "not valid YAML" in rep.data.error.message
    assert "cannot be loaded" in verdict(out).issues[0].message
    out = await run(generated("gone", "x", request_id="r2"), store, state)
    (rep,) = reports(out)
    assert rep.data.error.code == "CONFIG_NOT_FOUND"
    assert verdict(out).valid is False


async def test_report_once_across_many_events_and_redeliveries(store):
    state = MemoryState()
    events = [generated("broken", f"text {n}", request_id=f"r{n}") for n in range(5)]
    outs = [await run(ev, store, state) for ev in events]
    assert all(verdict(o).valid is False for o in outs)
    assert [len(reports(o)) for o in outs] == [1, 0, 0, 0, 0]
    first = reports(outs[0])[0]
    # The claiming message comes back (its first handling crashed before the ack):
    # it publishes the report again, with the same id, so nothing is lost and JetStream dedups.
    again = reports(await run(events[0], store, state))
    assert [e.id for e in again] == [first.id]
    # A redelivery of any other event still does not.
    assert reports(await run(events[3], store, state)) == []


async def test_report_once_with_concurrent_handlers_sharing_the_state(store):
    state = MemoryState()
    events = [generated("broken", f"text {n}", request_id=f"r{n}") for n in range(10)]
    rules_a, rules_b = RuleCache(), RuleCache()  # two instances: their own caches, one state
    outs = await asyncio.gather(*(run(ev, store, state, rules_a if n % 2 else rules_b) for n, ev in enumerate(events)))
    assert sum(len(reports(o)) for o in outs) == 1
    assert state.creates >= 10


async def test_a_new_version_of_a_broken_config_is_reported_again(store, cdir):
    state = MemoryState()
    (r1,) = reports(await run(generated("broken", "x", request_id="r1"), store, state))
    write(
        cdir / "broken.json",
        {"id": "broken", "generator": "jinja2", "template": "x", "validation": [{"type": "length"}]},
    )
    (r2,) = reports(await run(generated("broken", "x", request_id="r2"), store, state))
    assert r1.data.config_hash != r2.data.config_hash and r1.id != r2.id
    assert "needs at least one" in r2.data.error.message
    assert reports(await run(generated("broken", "x", request_id="r3"), store, state)) == []
    # Fixed: a valid verdict and one success report for the fixed version, then none.
    write(
        cdir / "broken.json",
        {"id": "broken", "generator": "jinja2", "template": "x", "validation": [{"type": "length", "min_chars": 1}]},
    )
    out = await run(generated("broken", "x", request_id="r4"), store, state)
    (r4,) = reports(out)
    assert verdict(out).valid and r4.data.status == "success" and r4.data.rule_types == ["length"]
    assert reports(await run(generated("broken", "x", request_id="r5"), store, state)) == []


async def test_without_a_state_store_every_report_has_the_same_id(store):
    a = reports(await run(generated("broken", "x", request_id="r1"), store))
    b = reports(await run(generated("broken", "y", request_id="r2"), store))
    assert len(a) == len(b) == 1 and a[0].id == b[0].id


async def test_state_store_failure_is_a_retry_not_a_crash(store):
    with pytest.raises(Retry, match="state store unavailable"):
        await run(generated("broken", "x"), store, BrokenState())


async def test_claim_of_an_entry_that_someone_else_wrote_badly():
    state = MemoryState()
    state.data["k"] = (b"not json", 1)
    assert await claim_report(state, "k", "ev-1") is False
    assert await claim_report(None, "k", "ev-1") is True


def test_report_key_is_a_safe_kv_key_for_any_id():
    assert report_key("broken", "sha256:" + "ab" * 32) == "configcheck.broken." + "ab" * 8
    odd = report_key("../Weird id*", "sha256:" + "cd" * 32)
    assert odd.startswith("configcheck.id-") and "/" not in odd and "*" not in odd and " " not in odd


# --------------------------------------------------------------------------- the app


async def test_app_start_finds_broken_configs_and_uses_the_context_state(tmp_path, cdir):
    app = build(Settings(home=tmp_path / "var", configs_dir=cdir))
    assert isinstance(app, ValidatorApp) and app.name == "validator"

    class Ctx:
        state = MemoryState()

    await app.start(Ctx())
    assert app.deps.state is Ctx.state
    info = app.info()
    assert info["broken_configs"] == ["broken", "unparsable"]
    assert set(info["configs"]) == {"plain", "doc", "broken", "unparsable"}
    out = await app.handle(generated("broken", "x"), Delivery.first("validator"))
    assert len(reports(out)) == 1 and Ctx.state.data
    await app.close()


# --------------------------------------------------------------------------- the examples


@pytest.mark.parametrize("config_id", self_contained_examples())
async def test_every_self_contained_example_renders_valid_with_no_context(config_id):
    store = ConfigStore(EXAMPLES)
    req = new_event(GENERATION_REQUESTED, GenerationRequested(content_config_id=config_id), source="t")
    deps = generator.Deps(store, GeneratorRegistry(), "chora://generator")
    (gen,) = await generator.on_generation_requested(req, Delivery.first("generator"), deps)
    assert gen.data.status == "success", gen.data.error
    d = verdict(await run(gen, store, MemoryState()))
    assert d.valid, d.issues
    assert [i for i in d.issues if i.severity == "error"] == []


async def test_examples_rules_catch_bad_content():
    store = ConfigStore(EXAMPLES)
    rules = [r for c in store.list() for r in store.get(c).spec.validation]
    assert {r["type"] for r in rules} == {"length", "required_sections", "regex", "json_schema", "placeholders"}
    d = verdict(await run(generated("service-status", '{"service": "x", "status": "on fire"}'), store))
    assert not d.valid and "$.status: 'on fire' is not one of" in d.issues[0].message
    d = verdict(await run(generated("incident-summary", "# Incident\n\n## Impact\n\nTODO at db1.internal"), store))
    assert not d.valid
    assert {i.rule for i in d.issues} == {"required_sections", "length", "placeholders", "regex"}
