"""config_validated for every config version (services/validator/reports.py): the result
of a valid config, warnings, the scan of the configs directory, and once per version
between scans, traffic, instances and redeliveries (the KV store in memory here; on a
real nats-server in tests/integration/test_validator_service.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from composition.configs import ConfigStore
from contracts.catalogue import CONFIG_VALIDATED, CONTENT_GENERATED
from contracts.envelope import new_event
from contracts.events import ConfigValidated, ContentGenerated
from contracts.handling import Delivery
from services.validator.handlers import Deps, on_content_generated
from services.validator.reports import Claims, check_config, config_report_id, config_warnings, report_key
from services.validator.rules import RuleCache, compile_rules
from services.validator.service import ValidatorApp
from tests.conftest import wait_for, write
from tests.fakes import MemoryState


@pytest.fixture
def cdir(tmp_path) -> Path:
    d = tmp_path / "configs"
    write(d / "plain.json", {"id": "plain", "generator": "jinja2", "template": "x"})
    rules = [
        {"type": "required_sections", "sections": ["Summary"]},
        {"type": "placeholders", "severity": "warning"},
        {"type": "json_schema", "schema": {"type": "object"}},
    ]
    write(d / "doc.json", {"id": "doc", "generator": "jinja2", "template": "x", "validation": rules})
    write(
        d / "broken.json",
        {"id": "broken", "generator": "jinja2", "template": "x", "validation": [{"type": "contains"}]},
    )
    write(d / "unparsable.yaml", "id: unparsable\ngenerator: [\n")
    return d


class Ctx:
    """What the runtime hands the validator on start: the KV store and a publish function."""

    def __init__(self, state, fail_publish: bool = False):
        self.state = state
        self.published: list = []
        self.fail_publish = fail_publish

    async def publish(self, events):
        if self.fail_publish:
            raise ConnectionError("NATS is away")
        self.published.extend(events)


def generated(config_id: str, n: int = 0):
    data = ContentGenerated(request_id=f"r{n}", content_config_id=config_id, status="success", content="# Summary\n")
    return new_event(CONTENT_GENERATED, data, source="chora://generator")


def reports(out) -> list:
    return [e for e in out if e.type == CONFIG_VALIDATED]


def test_a_valid_config_reports_its_rules_and_warnings(cdir):
    c = check_config(ConfigStore(cdir), RuleCache(), "doc")
    r: ConfigValidated = c.report
    assert (r.content_config_id, r.status, r.error) == ("doc", "success", None)
    assert r.rule_count == 3 and r.rule_types == ["required_sections", "placeholders", "json_schema"]
    assert r.warnings == ["validation[2] (json_schema): output_format is 'markdown', so content that is not JSON fails"]
    assert r.config_hash == c.config_hash and c.rules is not None and len(c.rules) == 3
    ev = c.event("chora://validator")
    assert ev.type == CONFIG_VALIDATED and ev.id == config_report_id("doc", c.config_hash)


def test_an_unchanged_config_is_checked_once_and_a_changed_one_again(cdir):
    store, rules = ConfigStore(cdir), RuleCache()
    first = check_config(store, rules, "doc")
    assert check_config(store, rules, "doc") is first  # the same file: nothing derived again
    write(cdir / "doc.json", {"id": "doc", "generator": "jinja2", "template": "x", "validation": []})
    changed = check_config(store, rules, "doc")
    assert changed is not first and changed.config_hash != first.config_hash
    assert changed.report.rule_count == 0 and changed.report.warnings[0].startswith("no validation rules")


def test_warnings_for_no_rules_and_for_rules_that_can_never_invalidate(cdir):
    store = ConfigStore(cdir)
    plain = check_config(store, RuleCache(), "plain").report
    assert plain.status == "success" and plain.rule_count == 0 and plain.rule_types == []
    assert plain.warnings == ["no validation rules: every generated content is judged valid"]
    only_warnings = compile_rules([{"type": "placeholders", "severity": "warning"}])
    assert config_warnings(store.get("doc"), only_warnings) == [
        "every rule has severity warning: no content is ever judged invalid"
    ]


def test_broken_and_unloadable_configs_report_an_error(cdir):
    store = ConfigStore(cdir)
    broken = check_config(store, RuleCache(), "broken")
    assert broken.rules is None and broken.report.status == "error" and broken.report.error.code == "INVALID_RULES"
    assert check_config(store, RuleCache(), "unparsable").report.error.code == "CONFIG_INVALID"
    assert check_config(store, RuleCache(), "gone").report.error.code == "CONFIG_NOT_FOUND"


def test_claims_are_bounded_oldest_first():
    claims = Claims(maxsize=2)
    for k in ("a", "b", "c"):
        claims.set(k, "ev")
    assert "a" not in claims and claims.get("c") == "ev" and len(claims) == 2


async def test_a_known_version_costs_no_kv_round_trip(cdir):
    state = MemoryState()
    deps = Deps(ConfigStore(cdir), RuleCache(), state)
    first = await on_content_generated(generated("doc", 0), Delivery.first("validator"), deps)
    assert len(reports(first)) == 1 and state.creates == 1
    for n in range(1, 20):
        out = await on_content_generated(generated("doc", n), Delivery.first("validator"), deps)
        assert reports(out) == []
    assert state.creates == 1


async def test_scan_reports_every_version_once_across_rescans_and_instances(cdir):
    state = MemoryState()
    a = ValidatorApp(ConfigStore(cdir), rescan_interval_s=0)
    ctx = Ctx(state)
    a.publish = ctx.publish
    a.deps.state = state
    published = await a.scan()
    got = {e.data.content_config_id: e.data for e in ctx.published}
    assert len(published) == len(ctx.published) == 4
    assert {k: v.status for k, v in got.items()} == {
        "broken": "error",
        "doc": "success",
        "plain": "success",
        "unparsable": "error",
    }
    assert all(e.id == config_report_id(e.data.content_config_id, e.data.config_hash) for e in ctx.published)
    assert sorted(state.data) == sorted(report_key(k, v.config_hash) for k, v in got.items())
    # Again, and from a second instance with the same KV store: nothing new to report.
    assert await a.scan() == []
    b = ValidatorApp(ConfigStore(cdir), rescan_interval_s=0)
    b.publish, b.deps.state = ctx.publish, state
    assert await b.scan() == [] and len(ctx.published) == 4
    # Content for a scanned version: a verdict, no second report (neither instance).
    for app in (a, b):
        out = await app.handle(generated("doc"), Delivery.first("validator"))
        assert reports(out) == []
    # A new version (the file edited under the running service): one report, from one scan.
    write(cdir / "plain.json", {"id": "plain", "generator": "jinja2", "template": "y"})
    (new,) = await b.scan()
    assert new.config_id == "plain" and new.config_hash != got["plain"].config_hash
    assert await a.scan() == [] and len(ctx.published) == 5


async def test_a_version_reported_in_traffic_is_not_reported_by_a_scan(cdir):
    state = MemoryState()
    deps = Deps(ConfigStore(cdir), RuleCache(), state)
    (rep,) = reports(await on_content_generated(generated("doc"), Delivery.first("validator"), deps))
    app = ValidatorApp(ConfigStore(cdir), rescan_interval_s=0)
    ctx = Ctx(state)
    app.publish, app.deps.state = ctx.publish, state
    await app.scan()
    assert "doc" not in {e.data.content_config_id for e in ctx.published} and len(ctx.published) == 3


async def test_a_failed_publish_claims_nothing_and_the_next_scan_reports(cdir):
    state = MemoryState()
    app = ValidatorApp(ConfigStore(cdir), rescan_interval_s=0)
    down = Ctx(state, fail_publish=True)
    app.publish, app.deps.state = down.publish, state
    with pytest.raises(ConnectionError):
        await app.scan()
    assert state.data == {}
    up = Ctx(state)
    app.publish = up.publish
    assert len(await app.scan()) == 4 and len(state.data) == 4


async def test_start_scans_in_the_background_and_close_stops_it(cdir):
    state = MemoryState()
    app = ValidatorApp(ConfigStore(cdir), rescan_interval_s=3600)
    ctx = Ctx(state)
    await app.start(ctx)
    try:
        task = app._scan_task
        assert task is not None
        await wait_for(lambda: app.scans == 1, timeout=5, what="the first scan")
        assert app.reported == 4 and len(ctx.published) == 4
        assert app.info()["broken_configs"] == ["broken", "unparsable"]
    finally:
        await app.close()
    assert task.done()
