"""The generator's config store: formats, validation, path safety, caching."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from composition import configs as configs_mod
from composition.configs import MAX_FILE_BYTES, ConfigError, ConfigStore, ContentConfig, valid_config_id


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def write_json(d: Path, doc: dict, name: str | None = None) -> Path:
    return write(d / (name or f"{doc['id']}.json"), json.dumps(doc))


def write_yaml(d: Path, doc: dict, name: str | None = None) -> Path:
    return write(d / (name or f"{doc['id']}.yaml"), yaml.safe_dump(doc))


@pytest.fixture
def cdir(tmp_path) -> Path:
    d = tmp_path / "configs"
    d.mkdir()
    return d


def code_of(store: ConfigStore, config_id) -> str:
    with pytest.raises(ConfigError) as ei:
        store.get(config_id)
    return ei.value.code


def error_of(store: ConfigStore, config_id) -> ConfigError:
    with pytest.raises(ConfigError) as ei:
        store.get(config_id)
    return ei.value


# --------------------------------------------------------------------------- formats


def test_loads_json_yaml_and_yml(cdir):
    write_json(cdir, {"id": "a-json", "generator": "jinja2", "template": "A"})
    write_yaml(cdir, {"id": "b-yaml", "generator": "jinja2", "template": "B"})
    write_yaml(cdir, {"id": "c-yml", "generator": "template_fill", "template": "C"}, name="c-yml.yml")
    store = ConfigStore(cdir)
    assert store.get("a-json").template == "A"
    assert store.get("b-yaml").template == "B"
    c = store.get("c-yml")
    assert (c.generator, c.template, c.output_format) == ("template_fill", "C", "markdown")


def test_all_fields_are_kept(cdir):
    doc = {
        "id": "full",
        "generator": "demonstration",
        "description": "d",
        "example_output": "out",
        "context": {"x": 1, "nested": {"y": [1, 2]}},
        "output_format": "json",
        "validation": [{"type": "contains", "value": "x", "anything": {"goes": True}}],
    }
    write_yaml(cdir, doc)
    c = ConfigStore(cdir).get("full")
    assert c.spec.description == "d"
    assert c.example_output == "out"
    assert c.defaults == {"x": 1, "nested": {"y": [1, 2]}}
    assert c.output_format == "json"
    assert c.spec.validation == doc["validation"]
    assert c.template is None and c.template_hash is None


# --------------------------------------------------------------------------- ids


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "Hello",
        "1abc",
        "-a",
        "a_b",
        "a/b",
        "../x",
        "..",
        "/etc/passwd",
        "a.b",
        "hello\n",
        "héllo",
        "a" * 129,
        5,
        None,
    ],
)
def test_invalid_ids_are_refused_before_any_path_is_built(cdir, bad, monkeypatch):
    store = ConfigStore(cdir)

    def no_fs(*a, **k):
        raise AssertionError("the filesystem was touched for an invalid id")

    monkeypatch.setattr(configs_mod.os, "stat", no_fs)
    monkeypatch.setattr(ConfigStore, "_find", no_fs)
    assert code_of(store, bad) == "INVALID_CONFIG_ID"
    assert not valid_config_id(bad)


@pytest.mark.parametrize("good", ["a", "a" * 128, "release-notes-2", "x1-"])
def test_valid_ids_reach_the_lookup(cdir, good):
    assert valid_config_id(good)
    assert code_of(ConfigStore(cdir), good) == "CONFIG_NOT_FOUND"


def test_id_in_file_must_equal_file_stem(cdir):
    write_json(cdir, {"id": "other", "generator": "jinja2", "template": "x"}, name="mine.json")
    err = error_of(ConfigStore(cdir), "mine")
    assert err.code == "CONFIG_INVALID"
    assert "'other'" in err.message and "'mine'" in err.message


def test_missing_config(cdir):
    err = error_of(ConfigStore(cdir), "nope")
    assert err.code == "CONFIG_NOT_FOUND" and "nope" in err.message


def test_missing_configs_dir(tmp_path):
    store = ConfigStore(tmp_path / "does-not-exist")
    assert code_of(store, "x") == "CONFIG_NOT_FOUND"
    assert store.list() == []


def test_two_files_for_one_id_are_ambiguous(cdir):
    write_json(cdir, {"id": "dup", "generator": "jinja2", "template": "x"})
    write_yaml(cdir, {"id": "dup", "generator": "jinja2", "template": "y"})
    err = error_of(ConfigStore(cdir), "dup")
    assert err.code == "CONFIG_INVALID" and "dup.json" in err.message and "dup.yaml" in err.message


# --------------------------------------------------------------------------- validation messages


def test_unknown_top_level_key_is_a_readable_error(cdir):
    write_yaml(cdir, {"id": "typo", "generatr": "jinja2", "template": "x"})
    err = error_of(ConfigStore(cdir), "typo")
    assert err.code == "CONFIG_INVALID"
    assert "typo.yaml" in err.message
    assert "generatr: unknown field" in err.message
    assert "generator: required field is missing" in err.message


def test_bad_field_values_are_named(cdir):
    write_json(cdir, {"id": "bad", "generator": "jinja2", "template": 3, "output_format": "pdf", "validation": ["x"]})
    err = error_of(ConfigStore(cdir), "bad")
    assert err.code == "CONFIG_INVALID"
    assert "template:" in err.message
    assert "output_format:" in err.message and "'pdf'" in err.message
    assert "validation[0]:" in err.message


def test_bad_id_inside_file_is_named(cdir):
    write_json(cdir, {"id": "Bad_Id", "generator": "jinja2", "template": "x"}, name="bad-id.json")
    err = error_of(ConfigStore(cdir), "bad-id")
    assert err.code == "CONFIG_INVALID" and "id: must match" in err.message


def test_template_and_template_file_are_exclusive(cdir):
    write(cdir / "t.j2", "x")
    write_json(cdir, {"id": "both", "generator": "jinja2", "template": "x", "template_file": "t.j2"})
    err = error_of(ConfigStore(cdir), "both")
    assert err.code == "CONFIG_INVALID" and "not both" in err.message


@pytest.mark.parametrize(
    "name, text, needle",
    [
        ("broken.json", '{"id": "broken",\n  "generator": }', "line 2"),
        ("broken.yaml", "id: broken\ngenerator: [unclosed\n", "line"),
        ("broken.yaml", "- a\n- b\n", "mapping"),
        ("broken.json", '"just a string"', "mapping"),
        ("broken.json", b"\xff\xfe{}", "UTF-8"),
    ],
)
def test_unparseable_files(cdir, name, text, needle):
    write(cdir / name, text)
    err = error_of(ConfigStore(cdir), "broken")
    assert err.code == "CONFIG_INVALID"
    assert needle in err.message


def test_oversized_file_is_refused(cdir):
    write(
        cdir / "big.json",
        '{"id": "big", "generator": "demonstration", "example_output": "' + "x" * MAX_FILE_BYTES + '"}',
    )
    err = error_of(ConfigStore(cdir), "big")
    assert err.code == "CONFIG_INVALID" and "over the limit" in err.message


def test_model_forbids_extra_keys_directly():
    with pytest.raises(Exception):
        ContentConfig.model_validate({"id": "a", "generator": "jinja2", "extra": 1})


# --------------------------------------------------------------------------- path escapes


def test_config_symlink_pointing_outside_is_refused(tmp_path, cdir):
    outside = write_json(tmp_path / "elsewhere", {"id": "evil", "generator": "jinja2", "template": "secret"})
    os.symlink(outside, cdir / "evil.json")
    err = error_of(ConfigStore(cdir), "evil")
    assert err.code == "PATH_OUTSIDE_CONFIGS"


def test_config_symlink_inside_is_fine(cdir):
    real = write_json(cdir / "sub", {"id": "linked", "generator": "jinja2", "template": "ok"}, name="real.json")
    os.symlink(real, cdir / "linked.json")
    assert ConfigStore(cdir).get("linked").template == "ok"


@pytest.mark.parametrize(
    "template_file", ["../../etc/passwd", "/etc/passwd", "../outside.j2", "templates/../../outside.j2"]
)
def test_template_file_escapes_are_refused(tmp_path, cdir, template_file):
    write(tmp_path / "outside.j2", "secret")
    write_json(cdir, {"id": "esc", "generator": "jinja2", "template_file": template_file})
    err = error_of(ConfigStore(cdir), "esc")
    assert err.code == "PATH_OUTSIDE_CONFIGS"
    assert "secret" not in err.message


def test_template_file_symlink_pointing_outside_is_refused(tmp_path, cdir):
    outside = write(tmp_path / "outside.j2", "secret")
    (cdir / "templates").mkdir()
    os.symlink(outside, cdir / "templates" / "t.j2")
    write_json(cdir, {"id": "esc", "generator": "jinja2", "template_file": "templates/t.j2"})
    assert code_of(ConfigStore(cdir), "esc") == "PATH_OUTSIDE_CONFIGS"


def test_template_dir_symlink_pointing_outside_is_refused(tmp_path, cdir):
    write(tmp_path / "outdir" / "t.j2", "secret")
    os.symlink(tmp_path / "outdir", cdir / "templates")
    write_json(cdir, {"id": "esc", "generator": "jinja2", "template_file": "templates/t.j2"})
    assert code_of(ConfigStore(cdir), "esc") == "PATH_OUTSIDE_CONFIGS"


def test_configs_dir_itself_may_be_a_symlink(tmp_path):
    real = tmp_path / "real"
    write(real / "templates" / "t.j2", "T")
    write_json(real, {"id": "ok", "generator": "jinja2", "template_file": "templates/t.j2"})
    os.symlink(real, tmp_path / "link")
    assert ConfigStore(tmp_path / "link").get("ok").template == "T"


def test_missing_template_file(cdir):
    write_json(cdir, {"id": "nofile", "generator": "jinja2", "template_file": "templates/missing.j2"})
    err = error_of(ConfigStore(cdir), "nofile")
    assert err.code == "TEMPLATE_NOT_FOUND" and "templates/missing.j2" in err.message


def test_template_file_is_read(cdir):
    write(cdir / "templates" / "t.md.j2", "Hello {{ name }}\n")
    write_yaml(cdir, {"id": "tf", "generator": "jinja2", "template_file": "templates/t.md.j2"})
    c = ConfigStore(cdir).get("tf")
    assert c.template == "Hello {{ name }}\n"
    assert c.template_name == "templates/t.md.j2"
    assert len(c.template_hash) == 64


# --------------------------------------------------------------------------- caching


def test_cached_lookup_costs_one_stat_and_no_read(cdir, monkeypatch):
    write_json(cdir, {"id": "hot", "generator": "jinja2", "template": "x"})
    store = ConfigStore(cdir)
    first = store.get("hot")
    calls = []
    real_stat = os.stat
    monkeypatch.setattr(configs_mod.os, "stat", lambda p, *a, **k: calls.append(p) or real_stat(p, *a, **k))
    monkeypatch.setattr(ConfigStore, "_read", lambda *a, **k: pytest.fail("a cached config was read again"))
    monkeypatch.setattr(
        ContentConfig, "model_validate", lambda *a, **k: pytest.fail("a cached config was validated again")
    )
    assert store.get("hot") is first
    assert len(calls) == 1


def test_cached_lookup_with_template_file_stats_both(cdir, monkeypatch):
    write(cdir / "t.j2", "x")
    write_json(cdir, {"id": "hot", "generator": "jinja2", "template_file": "t.j2"})
    store = ConfigStore(cdir)
    first = store.get("hot")
    calls = []
    real_stat = os.stat
    monkeypatch.setattr(configs_mod.os, "stat", lambda p, *a, **k: calls.append(p) or real_stat(p, *a, **k))
    assert store.get("hot") is first
    assert len(calls) == 2


def _bump_mtime(path: Path, step: int) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + step))


def test_rewritten_config_is_reloaded(cdir):
    p = write_json(cdir, {"id": "live", "generator": "jinja2", "template": "one"})
    store = ConfigStore(cdir)
    first = store.get("live")
    assert first.template == "one"
    write_json(cdir, {"id": "live", "generator": "jinja2", "template": "two"})  # same size
    _bump_mtime(p, 1_000_000)
    second = store.get("live")
    assert second.template == "two"
    assert second is not first
    assert store.get("live") is second


def test_rewritten_config_with_other_size_is_reloaded_even_with_same_mtime(cdir):
    p = write_json(cdir, {"id": "live", "generator": "jinja2", "template": "one"})
    store = ConfigStore(cdir)
    st = p.stat()
    assert store.get("live").template == "one"
    write_json(cdir, {"id": "live", "generator": "jinja2", "template": "three"})
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert store.get("live").template == "three"


def test_rewritten_template_file_is_reloaded(cdir):
    t = write(cdir / "t.j2", "v1")
    write_json(cdir, {"id": "live", "generator": "jinja2", "template_file": "t.j2"})
    store = ConfigStore(cdir)
    first = store.get("live")
    write(t, "v2")
    _bump_mtime(t, 1_000_000)
    second = store.get("live")
    assert second.template == "v2"
    assert second.template_hash != first.template_hash


def test_config_that_becomes_invalid_then_valid_again(cdir):
    p = write_json(cdir, {"id": "flip", "generator": "jinja2", "template": "ok"})
    store = ConfigStore(cdir)
    assert store.get("flip").template == "ok"
    write(p, '{"id": "flip", "generatorr": "jinja2"}')
    _bump_mtime(p, 1_000_000)
    assert code_of(store, "flip") == "CONFIG_INVALID"
    write_json(cdir, {"id": "flip", "generator": "jinja2", "template": "back"})
    _bump_mtime(p, 2_000_000)
    assert store.get("flip").template == "back"


def test_deleted_config_is_not_served_from_cache(cdir):
    p = write_json(cdir, {"id": "gone", "generator": "jinja2", "template": "x"})
    store = ConfigStore(cdir)
    store.get("gone")
    p.unlink()
    assert code_of(store, "gone") == "CONFIG_NOT_FOUND"


def test_symlink_retargeted_outside_is_caught_after_caching(tmp_path, cdir):
    inside = write_json(cdir / "sub", {"id": "moving", "generator": "jinja2", "template": "ok"}, name="moving.json")
    outside = write_json(tmp_path / "out", {"id": "moving", "generator": "jinja2", "template": "secret"})
    link = cdir / "moving.json"
    os.symlink(inside, link)
    store = ConfigStore(cdir)
    assert store.get("moving").template == "ok"
    link.unlink()
    os.symlink(outside, link)
    assert code_of(store, "moving") == "PATH_OUTSIDE_CONFIGS"


# --------------------------------------------------------------------------- listing


def test_list_returns_valid_ids_only(cdir):
    write_json(cdir, {"id": "b", "generator": "jinja2", "template": "x"})
    write_yaml(cdir, {"id": "a", "generator": "jinja2", "template": "x"})
    write(cdir / "c.yml", "id: c\n")
    write(cdir / "c.yaml", "id: c\n")
    write(cdir / "Not_Valid.json", "{}")
    write(cdir / "notes.txt", "")
    write(cdir / "templates" / "t.json", "{}")
    assert ConfigStore(cdir).list() == ["a", "b", "c"]
