"""Composition strategies and context merging."""

from __future__ import annotations

import pytest

from services.assembler.compose import ComposeError, compile_layout, compose, merge_context


def test_merge_context_is_shallow_later_wins_and_deps_merge():
    merged = merge_context({"a": 1, "n": {"x": 1, "y": 2}}, {"n": {"x": 9}}, None, {"b": 2})
    assert merged == {"a": 1, "n": {"x": 9}, "b": 2}
    merged = merge_context({"deps": {"old": "o", "overview": "stale"}}, deps={"overview": "fresh"})
    assert merged["deps"] == {"old": "o", "overview": "fresh"}
    assert merge_context({"deps": "not a dict"}, deps={"a": "A"})["deps"] == {"a": "A"}
    base = {"k": 1}
    merge_context(base, {"k": 2})
    assert base == {"k": 1}  # inputs are never changed


def test_concat_in_part_order_skipping_omitted():
    out = compose("concat", order=["a", "b", "c"], parts={"c": "C", "a": "A"}, separator="\n---\n")
    assert out == "A\n---\nC"


def test_layout_sees_parts_omitted_context_and_artifact_id():
    layout = (
        "# {{ artifact_id }} for {{ context.product }}\n"
        "{{ parts.a }}\n"
        "{% if 'b' in parts %}{{ parts.b }}{% endif %}"
        "{% for o in omitted %}(no {{ o }}){% endfor %}\n"
    )
    out = compose(
        "layout",
        order=["a", "b"],
        parts={"a": "A"},
        omitted=["b"],
        layout=layout,
        context={"product": "P"},
        artifact_id="doc",
    )
    assert out == "# doc for P\nA\n(no b)"  # trim_blocks: the newline after a block tag goes


def test_layout_is_strict_and_sandboxed():
    with pytest.raises(ComposeError) as e:
        compose("layout", order=["a"], parts={"a": "A"}, layout="{{ parts.b }}")
    assert e.value.code == "COMPOSE_FAILED" and "b" in e.value.message
    with pytest.raises(ComposeError) as e:
        compose("layout", order=[], parts={}, layout="{{ ''.__class__.__mro__ }}")
    assert e.value.code == "COMPOSE_FAILED"
    with pytest.raises(ComposeError) as e:
        compose("layout", order=[], parts={}, omitted=[], layout="{{ omitted.append(1) }}")
    assert e.value.code == "COMPOSE_FAILED" and "sandbox" in e.value.message


def test_layout_syntax_error_names_the_line():
    with pytest.raises(ComposeError) as e:
        compile_layout("line one\n{% if %}\n", "templates/x.j2")
    assert e.value.code == "LAYOUT_INVALID" and "templates/x.j2, line 2" in e.value.message


def test_runaway_layout_is_stopped():
    with pytest.raises(ComposeError) as e:
        compose("layout", order=[], parts={}, layout="{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}")
    assert e.value.code == "OUTPUT_TOO_LARGE"
