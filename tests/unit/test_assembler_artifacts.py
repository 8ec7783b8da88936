"""Artifact configs (loading, path safety, the dependency graph) and the run's folding."""

from __future__ import annotations

import os

import pytest

from composition.artifacts import (
    ArtifactError,
    ArtifactStore,
    PartConfig,
    check_artifact,
    dependency_order,
    find_cycle,
)
from composition.configs import ConfigStore
from contracts.envelope import new_event
from contracts.catalogue import ARTIFACT_REQUESTED
from contracts.events import ArtifactRequested, ErrorInfo
from services.assembler import artifacts as art
from tests.conftest import ROOT

EXAMPLES = ROOT / "examples" / "configs"


def parts(*specs):
    """parts(("a", []), ("b", ["a"]), ...)"""
    return [PartConfig(id=i, content_config_id="hello-world", depends_on=d) for i, d in specs]


# --------------------------------------------------------------------------- the graph


def test_dependency_order_is_topological_and_keeps_list_order():
    ps = parts(("summary", ["overview", "api"]), ("overview", []), ("api", ["overview"]), ("extra", []))
    assert dependency_order(ps) == ["overview", "api", "summary", "extra"]
    assert dependency_order(parts(("a", []), ("b", []))) == ["a", "b"]


def test_cycle_is_named():
    with pytest.raises(ArtifactError) as e:
        dependency_order(parts(("a", ["c"]), ("b", ["a"]), ("c", ["b"]), ("d", [])))
    assert e.value.code == "DEPENDENCY_CYCLE"
    assert "a -> c -> b -> a" in e.value.message
    with pytest.raises(ArtifactError, match="x -> x"):
        dependency_order(parts(("x", ["x"])))
    assert find_cycle(["a", "b"], {"a": ["b"], "b": []}) is None


def test_missing_part_is_named():
    with pytest.raises(ArtifactError) as e:
        dependency_order(parts(("a", []), ("b", ["a", "nope"])))
    assert e.value.code == "UNKNOWN_DEPENDENCY"
    assert "'b'" in e.value.message and "'nope'" in e.value.message


def test_a_long_chain_does_not_recurse():
    n = 150
    ps = parts(*[(f"p{i}", [f"p{i - 1}"] if i else []) for i in range(n)][::-1])
    assert dependency_order(ps) == [f"p{i}" for i in range(n)]


# --------------------------------------------------------------------------- the store


@pytest.fixture
def cdir(tmp_path):
    d = tmp_path / "configs"
    (d / "artifacts").mkdir(parents=True)
    (d / "templates").mkdir()
    (d / "one.yaml").write_text("id: one\ngenerator: template_fill\ntemplate: 'one {{ x }}'\ncontext: {x: 1}\n")
    return d


def write(cdir, name, text):
    (cdir / "artifacts" / name).write_text(text)


def test_the_example_loads_and_checks():
    store = ArtifactStore(EXAMPLES)
    assert "product-docs" in store.list()
    loaded = store.get("product-docs")
    assert len(loaded.spec.parts) >= 3
    assert loaded.spec.compose.strategy == "layout" and "parts.summary" in loaded.layout
    order = check_artifact(loaded, ConfigStore(EXAMPLES))
    assert order.index("summary") > order.index("overview")
    assert any(p.depends_on for p in loaded.spec.parts)


def test_json_and_yaml(cdir):
    write(cdir, "a.json", '{"id": "a", "parts": [{"id": "p", "content_config_id": "one"}]}')
    write(
        cdir, "b.yml", "id: b\nparts: [{id: p, content_config_id: one}]\ncompose: {strategy: concat, separator: '|'}\n"
    )
    store = ArtifactStore(cdir)
    assert store.list() == ["a", "b"]
    assert store.get("a").spec.compose.separator == "\n\n"
    assert store.get("b").spec.compose.separator == "|"


@pytest.mark.parametrize(
    "artifact_id, code",
    [
        ("../one", "INVALID_ARTIFACT_ID"),
        ("One", "INVALID_ARTIFACT_ID"),
        ("a\n", "INVALID_ARTIFACT_ID"),
        ("nope", "ARTIFACT_NOT_FOUND"),
    ],
)
def test_bad_ids(cdir, artifact_id, code):
    with pytest.raises(ArtifactError) as e:
        ArtifactStore(cdir).get(artifact_id)
    assert e.value.code == code


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("id: x\nparts: []\n", "parts"),
        ("id: x\nparts: [{id: p, content_config_id: one, typo: 1}]\n", "unknown field"),
        ("id: x\nparts: [{id: p, content_config_id: one}, {id: p, content_config_id: one}]\n", "used twice"),
        ("id: x\nparts: [{id: p, content_config_id: one}]\ncompose: {strategy: layout}\n", "needs 'layout'"),
        ("id: x\nparts: [{id: P, content_config_id: one}]\n", "parts[0].id"),
        ("id: y\nparts: [{id: p, content_config_id: one}]\n", "does not match the file name"),
        ("id: x\nparts: [{id: p\n", "not valid YAML"),
        ("- 1\n", "mapping"),
    ],
)
def test_invalid_configs_say_why(cdir, text, fragment):
    write(cdir, "x.yaml", text)
    with pytest.raises(ArtifactError) as e:
        ArtifactStore(cdir).get("x")
    assert e.value.code == "ARTIFACT_INVALID"
    assert fragment in e.value.message


def test_paths_stay_inside_the_configs_directory(cdir, tmp_path):
    outside = tmp_path / "secret.j2"
    outside.write_text("{{ parts }}")
    write(
        cdir,
        "abs.yaml",
        f"id: abs\nparts: [{{id: p, content_config_id: one}}]\ncompose: {{strategy: layout, layout_file: {outside}}}\n",
    )
    write(
        cdir,
        "dots.yaml",
        "id: dots\nparts: [{id: p, content_config_id: one}]\ncompose: {strategy: layout, layout_file: ../secret.j2}\n",
    )
    os.symlink(outside, cdir / "templates" / "link.j2")
    write(
        cdir,
        "link.yaml",
        "id: link\nparts: [{id: p, content_config_id: one}]\ncompose: {strategy: layout, layout_file: templates/link.j2}\n",
    )
    other = tmp_path / "elsewhere.yaml"
    other.write_text("id: sym\nparts: [{id: p, content_config_id: one}]\n")
    os.symlink(other, cdir / "artifacts" / "sym.yaml")
    store = ArtifactStore(cdir)
    for aid in ("abs", "dots", "link", "sym"):
        with pytest.raises(ArtifactError) as e:
            store.get(aid)
        assert e.value.code == "PATH_OUTSIDE_CONFIGS", aid
    write(
        cdir,
        "gone.yaml",
        "id: gone\nparts: [{id: p, content_config_id: one}]\ncompose: {strategy: layout, layout_file: templates/nope.j2}\n",
    )
    with pytest.raises(ArtifactError) as e:
        store.get("gone")
    assert e.value.code == "LAYOUT_NOT_FOUND"


def test_check_names_the_part_whose_content_config_is_missing(cdir):
    write(cdir, "m.yaml", "id: m\nparts: [{id: good, content_config_id: one}, {id: bad, content_config_id: no-such}]\n")
    with pytest.raises(ArtifactError) as e:
        check_artifact(ArtifactStore(cdir).get("m"), ConfigStore(cdir))
    assert e.value.code == "PART_CONFIG_NOT_FOUND"
    assert "'bad'" in e.value.message and "'no-such'" in e.value.message


# --------------------------------------------------------------------------- the run


def loaded_with(cdir, text):
    write(cdir, "r.yaml", text)
    return ArtifactStore(cdir).get("r")


RUN_YAML = """
id: r
context: {a: artifact, b: artifact, c: artifact}
parts:
  - {id: overview, content_config_id: one, context: {c: part}}
  - {id: extra, content_config_id: one, required: false}
  - {id: summary, content_config_id: one, depends_on: [overview]}
  - {id: tail, content_config_id: one, required: false, depends_on: [extra]}
"""


def test_context_merge_order_and_deps(cdir):
    run = art.new_run("R", loaded_with(cdir, RUN_YAML), {"b": "request", "c": "request"}, 0.0)
    cause = new_event(ARTIFACT_REQUESTED, ArtifactRequested(artifact_id="r"), source="t")
    ev = art.part_request(cause, run, "overview", {}, "s")
    assert ev.data.context == {"a": "artifact", "b": "request", "c": "part"}
    assert ev.data.origin.kind == "artifact" and ev.data.origin.id == "R" and ev.data.origin.key == "overview"
    assert ev.id == art.part_request_id("R", "overview") and ev.traceid == cause.traceid
    ev = art.part_request(cause, run, "summary", {"overview": "OVERVIEW"}, "s")
    assert ev.data.context["deps"] == {"overview": "OVERVIEW"} and ev.data.context["c"] == "request"


def test_run_requests_parts_as_they_become_ready(cdir):
    run = art.new_run("R", loaded_with(cdir, RUN_YAML), {}, 0.0)
    assert art.advance(run, "R", 0.0) == ["overview", "extra"]
    assert run.state["overview"].requested_by == "R"
    run, res = art.fold(run, [art.PartOp("overview", True, "v1")], 1.0)
    assert res == [art.Result.APPLIED]
    assert run.state["summary"].status == "requested" and run.state["summary"].requested_by == "v1"
    # the optional part fails: omitted, and so is the optional part that depends on it
    run, res = art.fold(run, [art.PartOp("extra", False, "g2", ErrorInfo(code="MISSING_VARIABLE", message="x"))], 2.0)
    assert run.state["extra"].status == "omitted" and run.state["tail"].status == "omitted"
    assert not run.closed
    run, res = art.fold(run, [art.PartOp("summary", True, "v3"), art.PartOp("summary", True, "v3")], 3.0)
    assert res == [art.Result.APPLIED, art.Result.DUPLICATE]
    assert run.closed and run.status == "success" and run.closed_by == "v3" and run.omitted() == ["extra", "tail"]
    data = art.assembled_data(run, {"overview": "O", "summary": "S"})
    assert data.status == "success" and data.content == "O\n\nS" and data.parts_count == 2
    assert data.omitted_parts == ["extra", "tail"] and data.duration_ms == 3000.0
    assert data.content_hash.startswith("sha256:") and data.content_length == 4


def test_a_required_part_failing_ends_the_run_naming_it(cdir):
    run = art.new_run("R", loaded_with(cdir, RUN_YAML), {}, 0.0)
    art.advance(run, "R", 0.0)
    run, res = art.fold(
        run,
        [
            art.PartOp("overview", False, "g1", ErrorInfo(code="TEMPLATE_ERROR", message="boom")),
            art.PartOp("extra", True, "v2"),
        ],
        1.0,
    )
    assert res == [art.Result.APPLIED, art.Result.IGNORED]
    assert run.closed and run.status == "error" and run.failed_part == "overview" and run.closed_by == "g1"
    assert "TEMPLATE_ERROR: boom" in run.error.message
    data = art.assembled_data(run, {})
    assert data.status == "error" and data.failed_part == "overview" and data.error.code == "PART_FAILED"


def test_a_required_part_depending_on_an_omitted_one_fails_the_run(cdir):
    text = """
id: r
parts:
  - {id: opt, content_config_id: one, required: false}
  - {id: needs, content_config_id: one, depends_on: [opt]}
"""
    run = art.new_run("R", loaded_with(cdir, text), {}, 0.0)
    assert art.advance(run, "R", 0.0) == ["opt"]
    run, _ = art.fold(run, [art.PartOp("opt", False, "g", ErrorInfo(code="X", message="y"))], 1.0)
    assert run.closed and run.status == "error" and run.failed_part == "needs"
    assert "omitted part 'opt'" in run.error.message


def test_a_layout_error_is_an_error_outcome(cdir):
    text = "id: r\nparts: [{id: p, content_config_id: one}]\ncompose: {strategy: layout, layout: '{{ parts.nope }}'}\n"
    run = art.new_run("R", loaded_with(cdir, text), {}, 0.0)
    art.advance(run, "R", 0.0)
    run, _ = art.fold(run, [art.PartOp("p", True, "v")], 1.0)
    data = art.assembled_data(run, {"p": "P"})
    assert data.status == "error" and data.error.code == "COMPOSE_FAILED" and "nope" in data.error.message
