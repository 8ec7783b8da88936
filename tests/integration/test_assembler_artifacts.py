"""Artifacts against a real nats-server: generator, validator and assembler in-process."""

from __future__ import annotations

import pytest

from bus.publisher import Publisher
from bus.topology import Topology, provision
from contracts.catalogue import ARTIFACT_ASSEMBLED, ARTIFACT_REQUESTED, GENERATION_REQUESTED
from contracts.envelope import new_event
from contracts.events import ArtifactRequested
from services.assembler.artifacts import assembled_id
from tests.conftest import example_configs, wait_for
from tests.integration.test_assembler_batches import Collector, count_stored, running, stored

CONFIGS = {
    "intro.yaml": "id: intro\ngenerator: template_fill\ntemplate: 'INTRO for {{ product }} ({{ edition }})'\n",
    "follow.yaml": (
        "id: follow\ngenerator: jinja2\n"
        "template: 'FOLLOW quoting [{{ deps.intro }}] level {{ level }}'\n"
        "context: {level: 0}\n"
    ),
    "needs-var.yaml": "id: needs-var\ngenerator: jinja2\ntemplate: '{{ not_given }}'\n",
    "strict.yaml": (
        "id: strict\ngenerator: template_fill\ntemplate: 'short'\nvalidation: [{type: length, min_words: 50}]\n"
    ),
}

ARTIFACTS = {
    "chain.yaml": """
id: chain
context: {product: Chora, edition: default}
parts:
  - {id: intro, content_config_id: intro}
  - {id: follow, content_config_id: follow, depends_on: [intro], context: {level: 3}}
compose:
  strategy: layout
  layout: "[{{ artifact_id }}] {{ parts.intro }} / {{ parts.follow }}"
""",
    "cycle.yaml": """
id: cycle
parts:
  - {id: a, content_config_id: intro, depends_on: [c]}
  - {id: b, content_config_id: intro, depends_on: [a]}
  - {id: c, content_config_id: intro, depends_on: [b]}
""",
    "optional.yaml": """
id: optional
context: {product: P, edition: e}
parts:
  - {id: intro, content_config_id: intro}
  - {id: flaky, content_config_id: needs-var, required: false}
  - {id: picky, content_config_id: strict, required: false}
  - {id: after-flaky, content_config_id: follow, required: false, depends_on: [flaky]}
compose: {strategy: concat, separator: " + "}
""",
    "required.yaml": """
id: required
context: {product: P, edition: e}
parts:
  - {id: intro, content_config_id: intro}
  - {id: broken, content_config_id: needs-var}
""",
    "invalid-required.yaml": """
id: invalid-required
parts:
  - {id: picky, content_config_id: strict}
""",
}


def with_configs(settings, tmp_path, artifacts: dict[str, str] = ARTIFACTS):
    """``settings`` with a configs dir of :data:`CONFIGS` and ``artifacts``."""
    d = tmp_path / "configs"
    (d / "artifacts").mkdir(parents=True)
    for name, text in CONFIGS.items():
        (d / name).write_text(text)
    for name, text in artifacts.items():
        (d / "artifacts" / name).write_text(text)
    return settings.model_copy(update={"configs_dir": d})


@pytest.fixture
def asettings(settings, tmp_path):
    return with_configs(settings, tmp_path)


@pytest.fixture
async def stack(nc, asettings):
    js = nc.jetstream()
    topo = Topology.from_settings(asettings)
    await provision(js, topo)
    col = await Collector().start(nc, asettings.prefix)
    async with running(("generator", asettings), ("validator", asettings), ("assembler", asettings)):
        yield js, topo, col


async def assemble(stack, artifact_id, context=None):
    js, topo, col = stack
    req = new_event(
        ARTIFACT_REQUESTED, ArtifactRequested(artifact_id=artifact_id, context=context or {}), source="test"
    )
    await Publisher(js, topo.prefix).publish(req)
    found = await wait_for(
        lambda: col.of(ARTIFACT_ASSEMBLED, lambda e: e.data.request_id == req.id),
        timeout=30,
        what=f"{artifact_id} assembled",
    )
    return req, found[0]


async def test_dependency_sees_the_content_of_its_dependency(stack):
    js, topo, col = stack
    req, done = await assemble(stack, "chain", {"edition": "2nd"})
    d = done.data
    assert d.status == "success", d.error
    assert d.content == "[chain] INTRO for Chora (2nd) / FOLLOW quoting [INTRO for Chora (2nd)] level 3"
    assert d.parts_count == 2 and d.omitted_parts == [] and d.content_hash.startswith("sha256:")
    assert done.id == assembled_id(req.id) and done.traceid == req.traceid
    # the dependent's request carried the dependency's content
    follow_req = [e for e in await stored(js, topo, GENERATION_REQUESTED) if e.data.origin.key == "follow"]
    assert len(follow_req) == 1 and follow_req[0].data.context["deps"] == {"intro": "INTRO for Chora (2nd)"}
    assert follow_req[0].data.context["level"] == 3 and follow_req[0].data.context["edition"] == "2nd"
    assert await count_stored(js, topo, ARTIFACT_ASSEMBLED) == 1


async def test_a_cycle_is_refused_before_any_work(stack):
    js, topo, col = stack
    req, done = await assemble(stack, "cycle")
    d = done.data
    assert d.status == "error" and d.error.code == "DEPENDENCY_CYCLE"
    assert "a -> c -> b -> a" in d.error.message
    assert await count_stored(js, topo, GENERATION_REQUESTED) == 0


async def test_unknown_artifact_is_an_error_outcome(stack):
    js, topo, col = stack
    req, done = await assemble(stack, "no-such-artifact")
    assert done.data.status == "error" and done.data.error.code == "ARTIFACT_NOT_FOUND"
    assert await count_stored(js, topo, GENERATION_REQUESTED) == 0


async def test_optional_parts_failing_are_omitted_and_listed(stack):
    req, done = await assemble(stack, "optional")
    d = done.data
    assert d.status == "success", d.error
    assert d.content == "INTRO for P (e)"
    # flaky: MISSING_VARIABLE at generation; picky: invalid; after-flaky: depends on an omitted part
    assert d.omitted_parts == ["flaky", "picky", "after-flaky"]
    assert d.parts_count == 1


async def test_a_required_part_failing_ends_the_artifact_naming_it(stack):
    req, done = await assemble(stack, "required")
    d = done.data
    assert d.status == "error" and d.failed_part == "broken"
    assert d.error.code == "PART_FAILED" and "MISSING_VARIABLE" in d.error.message
    req, done = await assemble(stack, "invalid-required")
    d = done.data
    assert d.status == "error" and d.failed_part == "picky" and "VALIDATION_FAILED" in d.error.message


async def test_the_example_product_docs(nc, settings):
    """The shipped example, with the shipped configs."""
    js = nc.jetstream()
    topo = Topology.from_settings(settings)
    await provision(js, topo)
    col = await Collector().start(nc, settings.prefix)
    assert settings.configs_dir == example_configs()
    async with running(("generator", settings), ("validator", settings), ("assembler", settings)):
        req, done = await assemble((js, topo, col), "product-docs")
    d = done.data
    assert d.status == "success", d.error
    assert d.content.startswith("# chora-compose") and "## API reference" in d.content and "## Summary" in d.content
    assert "POST /v1/artifacts" in d.content and "The overview above runs to" in d.content
    assert d.parts_count == 4 and d.omitted_parts == []


async def test_large_contents_travel_by_reference(nc, asettings):
    """Parts and the artifact over the content threshold: the Object Store carries them."""
    from bus.content import ContentStore

    small = asettings.model_copy(update={"content_threshold_bytes": 16})
    js = nc.jetstream()
    topo = Topology.from_settings(small)
    await provision(js, topo)
    col = await Collector().start(nc, small.prefix)
    async with running(("generator", small), ("validator", small), ("assembler", small)):
        req, done = await assemble((js, topo, col), "chain", {"edition": "big"})
    d = done.data
    assert d.status == "success", d.error
    assert d.content is None and d.content_ref  # offloaded by the publisher
    content = (await ContentStore(js, topo.content_bucket).get(d.content_ref)).decode()
    assert content == "[chain] INTRO for Chora (big) / FOLLOW quoting [INTRO for Chora (big)] level 3"
    assert d.content_length == len(content)
    # the part's content was kept by reference, and resolved for the dependent's context
    follow_req = [e for e in await stored(js, topo, GENERATION_REQUESTED) if e.data.origin.key == "follow"]
    assert follow_req[0].data.context["deps"] == {"intro": "INTRO for Chora (big)"}
    from bus.state import StateStore
    from services.assembler.state import decode_part, part_key

    raw, _ = await StateStore(js, topo.state_bucket).get(part_key(req.id, "intro"))
    kept = decode_part(raw)
    assert kept.content is None and kept.content_ref.startswith("obj://")
