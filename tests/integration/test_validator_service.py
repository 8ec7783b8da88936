"""The validator against a real nats-server: the generator and two validator
instances run in-process (run_service), requests go in, verdicts come out,
and every config version (broken or valid) is reported exactly once."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import nats
import pytest

from bus.publisher import Publisher
from bus.state import StateStore
from bus.topology import Topology, provision
from composition.configs import ConfigStore
from contracts.catalogue import CONFIG_VALIDATED, CONTENT_GENERATED, CONTENT_VALIDATED, GENERATION_REQUESTED
from contracts.envelope import decode, new_event
from contracts.events import ContentGenerated, GenerationRequested
from services.runtime import run_service
from contracts.handling import Delivery
from services.validator.handlers import Deps, config_report_id, on_content_generated, report_key
from services.validator.service import ValidatorApp
from services.validator.rules import RuleCache
from tests.conftest import wait_for, write

FIRST = Delivery.first("validator")

REPORT = {
    "id": "report",
    "generator": "jinja2",
    "template": "# Report for {{ name }}\n\n## Summary\n\n{{ body }}\n",
    "context": {"name": "Ada", "body": ""},
    "validation": [
        {"type": "required_sections", "sections": ["Summary"], "level": 2},
        {"type": "length", "min_words": 8},
        {"type": "placeholders", "severity": "warning"},
    ],
}
BROKEN = {
    "id": "broken",
    "generator": "jinja2",
    "template": "Some text.",
    "validation": [{"type": "contains", "value": "x"}, {"type": "regex", "pattern": "(unclosed"}],
}


@pytest.fixture
def cdir(tmp_path) -> Path:
    d = tmp_path / "configs"
    write(d / "report.json", REPORT)
    write(d / "broken.json", BROKEN)
    write(d / "needs-var.json", {"id": "needs-var", "generator": "jinja2", "template": "{{ nope }}"})
    return d


@pytest.fixture
def vsettings(settings, cdir):
    settings.configs_dir = cdir
    return settings


def request(config_id: str, **ctx):
    return new_event(GENERATION_REQUESTED, GenerationRequested(content_config_id=config_id, context=ctx), source="test")


async def count(js, topo: Topology, event_type: str) -> int:
    subject = topo.subject(event_type)
    info = await js.stream_info(topo.events_stream, subjects_filter=subject)
    return sum((info.state.subjects or {}).values())  # every subject the filter matches


async def read_all(js, topo: Topology, event_type: str) -> list:
    n = await count(js, topo, event_type)
    if n == 0:
        return []
    sub = await js.pull_subscribe(topo.subject(event_type), stream=topo.events_stream)
    out = []
    try:
        while len(out) < n:
            for m in await sub.fetch(n - len(out), timeout=5):
                out.append(decode(m.headers, m.data))
                await m.ack()
    finally:
        await sub.unsubscribe()
    return out


async def settled(js, topo: Topology, durable: str) -> bool:
    ci = await js.consumer_info(topo.events_stream, durable)
    return ci.num_pending == 0 and ci.num_ack_pending == 0


async def test_generator_and_two_validators(nc, vsettings, cdir):
    js = nc.jetstream()
    topo = Topology.from_settings(vsettings)
    await provision(js, topo)
    stop = asyncio.Event()
    tasks = [asyncio.create_task(run_service(n, vsettings, stop=stop)) for n in ("generator", "validator", "validator")]
    try:

        async def pulling(durable: str, n: int) -> bool:
            return (await js.consumer_info(topo.events_stream, durable)).num_waiting >= n

        await wait_for(lambda: pulling("validator", 2), timeout=20, what="two validator instances pulling")
        await wait_for(lambda: pulling("generator", 1), timeout=20, what="the generator pulling")

        good = [request("report", body="Everything shipped on time this week.") for _ in range(2)]
        warn = request("report", body="Everything shipped on time, TODO add the numbers.")
        short = request("report")  # no body: too few words
        broken = [request("broken", n=i) for i in range(5)]
        failing = request("needs-var")  # a generation error: no verdict
        await Publisher(js, topo.prefix).publish_many([*broken, *good, warn, short, failing])

        await wait_for(lambda: _eq(count(js, topo, CONTENT_VALIDATED), 9), timeout=20, what="9 verdicts")
        await wait_for(lambda: settled(js, topo, "validator"), timeout=20, what="the validators settled")

        verdicts = {e.data.request_id: e for e in await read_all(js, topo, CONTENT_VALIDATED)}
        assert len(verdicts) == 9 and failing.id not in verdicts
        for r in good:
            d = verdicts[r.id].data
            assert d.valid and d.issues == [] and "Everything shipped" in d.content
            assert d.content_hash.startswith("sha256:")
        d = verdicts[warn.id].data
        assert d.valid and [(i.rule, i.severity) for i in d.issues] == [("placeholders", "warning")]
        d = verdicts[short.id].data
        assert not d.valid and [(i.rule, i.severity) for i in d.issues] == [("length", "error")]
        for r in broken:
            d = verdicts[r.id].data
            assert (
                not d.valid and d.issues[0].rule == "config" and "unknown rule type 'contains'" in d.issues[0].message
            )
            assert verdicts[r.id].traceid == r.traceid

        # Exactly one report per config version, however many requests and instances: the two
        # validators scanned the directory when they started, and content of each version went by.
        await wait_for(lambda: _eq(count(js, topo, CONFIG_VALIDATED), 3), timeout=20, what="3 config reports")
        reports = {r.data.content_config_id: r for r in await read_all(js, topo, CONFIG_VALIDATED)}
        assert sorted(reports) == ["broken", "needs-var", "report"]
        rep = reports["broken"]
        assert rep.data.status == "error" and rep.data.error.code == "INVALID_RULES"
        assert "validation[0]: unknown rule type 'contains'" in rep.data.error.message
        assert "validation[1] (regex): bad pattern '(unclosed'" in rep.data.error.message
        for r in reports.values():
            assert r.id == config_report_id(r.data.content_config_id, r.data.config_hash)
        ok = reports["report"].data
        assert ok.status == "success" and ok.error is None and ok.warnings == []
        assert ok.rule_count == 3 and ok.rule_types == ["required_sections", "length", "placeholders"]
        assert reports["needs-var"].data.warnings == ["no validation rules: every generated content is judged valid"]

        # A new version of the broken config: reported once more, whatever the number of requests.
        write(cdir / "broken.json", {**BROKEN, "validation": [{"type": "length", "min_chars": 9, "max_chars": 1}]})
        await Publisher(js, topo.prefix).publish_many([request("broken", n=10 + i) for i in range(3)])
        await wait_for(lambda: _eq(count(js, topo, CONTENT_VALIDATED), 12), timeout=20, what="12 verdicts")
        await wait_for(lambda: settled(js, topo, "validator"), timeout=20, what="the validators settled")
        broken = [r for r in await read_all(js, topo, CONFIG_VALIDATED) if r.data.content_config_id == "broken"]
        assert len(broken) == 2
        assert len({r.data.config_hash for r in broken}) == 2
        assert any("min_chars (9) is greater than max_chars (1)" in r.data.error.message for r in broken)
        # One claim per version in the KV bucket, naming who reported it: a scan, or a
        # content_generated of that config.
        claims = await StateStore(js, topo.state_bucket).items("configcheck.broken")
        assert len(claims) == 2
        causes = {json.loads(v)["cause"] for v in claims.values()}
        outcomes = {e.id for e in await read_all(js, topo, CONTENT_GENERATED) if e.data.content_config_id == "broken"}
        assert all(c.startswith("scan:") or c in outcomes for c in causes), causes

        dlq = await js.stream_info(topo.dlq_stream)
        assert dlq.state.messages == 0
    finally:
        stop.set()
        await asyncio.gather(*tasks)


async def _eq(aw, n: int) -> bool:
    return (await aw) == n


@pytest.mark.parametrize("config_id", ["broken", "report"])
async def test_two_instances_racing_on_the_real_kv_report_once(nc, nats_server, vsettings, cdir, config_id):
    """Twenty verdicts on one config version (broken, or valid), handled concurrently by two
    instances (own connections, own caches, one KV bucket); then the claiming event is
    handled again as after a crash before its ack. Everything returned is
    published: the stream holds exactly one config_validated."""
    js = nc.jetstream()
    topo = Topology.from_settings(vsettings)
    await provision(js, topo)
    nc2 = await nats.connect(nats_server.url)
    try:
        states = [StateStore(js, topo.state_bucket), StateStore(nc2.jetstream(), topo.state_bucket)]
        caches = [RuleCache(), RuleCache()]
        store = ConfigStore(cdir)
        events = [
            new_event(
                CONTENT_GENERATED,
                ContentGenerated(
                    request_id=f"r{i}", content_config_id=config_id, status="success", content=f"text {i}"
                ),
                source="test",
            )
            for i in range(20)
        ]
        outs = await asyncio.gather(
            *(on_content_generated(ev, FIRST, Deps(store, caches[i % 2], states[i % 2])) for i, ev in enumerate(events))
        )
        claimed = [i for i, out in enumerate(outs) if any(e.type == CONFIG_VALIDATED for e in out)]
        assert len(claimed) == 1
        # The claimer's message is redelivered (crash between claim and ack), to the other instance.
        i = claimed[0]
        again = await on_content_generated(events[i], FIRST, Deps(store, caches[1 - i % 2], states[1 - i % 2]))
        assert [e.type for e in again] == [CONFIG_VALIDATED, CONTENT_VALIDATED]
        pub = Publisher(js, topo.prefix)
        for out in [*outs, again]:
            await pub.publish_many(out)
        assert await count(js, topo, CONFIG_VALIDATED) == 1
        assert await count(js, topo, CONTENT_VALIDATED) == 20
        (rep,) = await read_all(js, topo, CONFIG_VALIDATED)
        assert rep.data.status == ("error" if config_id == "broken" else "success")
    finally:
        await nc2.close()


async def test_two_instances_scanning_at_once_then_a_restart_report_each_version_once(nc, nats_server, vsettings, cdir):
    """Two validator instances scan the configs directory at the same moment (own
    connections, one KV bucket, real publishes); then a third starts (a restart): the
    stream holds one config_validated per config version, and every version is claimed."""
    js = nc.jetstream()
    topo = Topology.from_settings(vsettings)
    await provision(js, topo)
    nc2 = await nats.connect(nats_server.url)
    try:
        apps = []
        for conn in (nc, nc2, nc):
            app = ValidatorApp(ConfigStore(cdir), rescan_interval_s=0)
            app.deps.state = StateStore(conn.jetstream(), topo.state_bucket)
            app.publish = Publisher(conn.jetstream(), topo.prefix).publish_many
            apps.append(app)
        await asyncio.gather(apps[0].scan(), apps[1].scan())
        assert apps[0].reported + apps[1].reported >= 3  # each version published at least once
        assert await count(js, topo, CONFIG_VALIDATED) == 3
        assert await apps[2].scan() == []
        assert await count(js, topo, CONFIG_VALIDATED) == 3
        reports = {r.data.content_config_id: r.data for r in await read_all(js, topo, CONFIG_VALIDATED)}
        assert {k: v.status for k, v in reports.items()} == {
            "broken": "error",
            "needs-var": "success",
            "report": "success",
        }
        claims = await StateStore(js, topo.state_bucket).items("configcheck")
        assert sorted(claims) == sorted(report_key(k, v.config_hash) for k, v in reports.items())
    finally:
        await nc2.close()


async def test_large_content_is_judged_whole_and_passed_on_by_reference(nc, vsettings, cdir):
    """Content over the threshold travels through the Object Store: the validator
    judges the whole text and its verdict refers to the same object."""
    vsettings.content_threshold_bytes = 1024
    write(
        cdir / "big.json",
        {
            "id": "big",
            "generator": "jinja2",
            "template": "{{ 'word ' * 500 }}",
            "validation": [{"type": "length", "min_words": 500, "max_words": 500, "min_chars": 2500}],
        },
    )
    js = nc.jetstream()
    topo = Topology.from_settings(vsettings)
    await provision(js, topo)
    stop = asyncio.Event()
    tasks = [asyncio.create_task(run_service(n, vsettings, stop=stop)) for n in ("generator", "validator")]
    try:
        req = request("big")
        await Publisher(js, topo.prefix).publish(req)
        await wait_for(lambda: _eq(count(js, topo, CONTENT_VALIDATED), 1), timeout=20, what="the verdict")
        (v,) = await read_all(js, topo, CONTENT_VALIDATED)
        (g,) = await read_all(js, topo, CONTENT_GENERATED)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    assert g.data.content is None and g.data.content_ref
    d = v.data
    assert d.request_id == req.id and d.valid, d.issues
    assert d.content is None and d.content_ref == g.data.content_ref and d.content_length == 2500
