"""`chora batch run`'s batch file: YAML through libyaml's loader when PyYAML has it."""

from __future__ import annotations

import pytest
import yaml

from chora.commands.assembly import load_batch_file
from contracts.events import BatchItem


def test_a_yaml_batch_file_keeps_its_types(tmp_path):
    f = tmp_path / "b.yaml"
    f.write_text(
        "context: {lang: en}\ncontinue_on_error: false\nitems:\n"
        "- {content_config_id: a, context: {n: 1, ok: true, tags: [x, y]}}\n- content_config_id: b\n"
    )
    b = load_batch_file(str(f))
    assert b.items == [
        BatchItem(content_config_id="a", context={"n": 1, "ok": True, "tags": ["x", "y"]}),
        BatchItem(content_config_id="b"),
    ]
    assert b.context == {"lang": "en"} and b.continue_on_error is False


def test_the_batch_file_is_read_with_the_c_loader(tmp_path, monkeypatch):
    """The C loader is what parses it (about 3x faster on a large file); PyYAML here has libyaml."""
    assert yaml.__with_libyaml__
    used = []
    real = yaml.load

    def load(text, Loader):
        used.append(Loader)
        return real(text, Loader=Loader)

    monkeypatch.setattr(yaml, "load", load)
    f = tmp_path / "b.yaml"
    f.write_text("items:\n- {content_config_id: a}\n")
    assert load_batch_file(str(f)).items == [BatchItem(content_config_id="a")]
    assert used == [yaml.CSafeLoader]


def test_a_yaml_document_that_is_not_safe_is_refused(tmp_path):
    f = tmp_path / "b.yaml"
    f.write_text("items: !!python/object/apply:os.system [echo hi]\n")
    with pytest.raises(SystemExit, match="not valid YAML"):
        load_batch_file(str(f))
