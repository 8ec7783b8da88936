"""`chora configs validate|list`: one line per config, exit 1 when any is invalid."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from chora.cli import main
from composition.configs import ConfigStore
from tests.conftest import ROOT, child_env, write

EXAMPLES = ROOT / "examples" / "configs"


@pytest.fixture
def cdir(tmp_path) -> Path:
    d = tmp_path / "configs"
    write(
        d / "good.json",
        {
            "id": "good",
            "generator": "jinja2",
            "template": "# Hi {{ name }}\n",
            "context": {"name": "x"},
            "validation": [{"type": "regex", "pattern": "^# Hi"}],
        },
    )
    write(
        d / "bad-rules.yaml",
        "id: bad-rules\ngenerator: jinja2\ntemplate: x\nvalidation:\n  - {type: contains, value: x}\n  - {type: regex, pattern: '('}\n",
    )
    write(d / "typo.json", {"id": "typo", "generator": "jinja2", "templte": "x"})
    write(d / "Not_An_Id.yaml", "id: whatever\n")
    write(d / "notes.txt", "not a config at all")
    return d


def cli(capsys, *args: str) -> tuple[int, list[str], str]:
    rc = main(["configs", *args])
    out = capsys.readouterr()
    return rc, out.out.splitlines(), out.err


def line_for(lines: list[str], name: str) -> str:
    (ln,) = [ln for ln in lines if ln.split()[1] == name]
    return ln


def test_the_examples_are_all_valid(capsys):
    rc, lines, err = cli(capsys, "validate", str(EXAMPLES))
    assert rc == 0, lines
    assert [ln.split()[1] for ln in lines] == ConfigStore(EXAMPLES).list()
    assert len(lines) >= 6
    assert all(ln.startswith("ok ") for ln in lines)
    assert "invalid" in err and "0 invalid" in err


def test_the_examples_render_valid_with_no_context(capsys):
    rc, lines, _ = cli(capsys, "validate", "--render", str(EXAMPLES))
    assert rc == 0, lines
    assert all("rendered content passes" in ln for ln in lines)


def test_default_directory_comes_from_the_settings(capsys, monkeypatch, cdir):
    monkeypatch.setenv("CHORA_CONFIGS_DIR", str(cdir))
    rc, lines, _ = cli(capsys, "validate")
    assert rc == 1
    assert {ln.split()[1] for ln in lines} == {"good", "bad-rules", "typo", "Not_An_Id.yaml"}


def test_a_directory_with_invalid_configs_fails_and_says_why(capsys, cdir):
    rc, lines, err = cli(capsys, "validate", str(cdir))
    assert rc == 1
    assert line_for(lines, "good").startswith("ok ") and "1 rule" in line_for(lines, "good")
    bad = line_for(lines, "bad-rules")
    assert bad.startswith("INVALID ")
    assert "validation[0]: unknown rule type 'contains'" in bad and "validation[1] (regex): bad pattern '('" in bad
    typo = line_for(lines, "typo")
    assert typo.startswith("INVALID ") and "CONFIG_INVALID" in typo and "templte: unknown field" in typo
    skipped = line_for(lines, "Not_An_Id.yaml")
    assert skipped.startswith("skip ") and "never loaded" in skipped
    assert not any("notes.txt" in ln for ln in lines)
    assert "3 configs: 1 ok, 2 invalid" in err


def test_one_file(capsys, cdir):
    assert cli(capsys, "validate", str(cdir / "good.json"))[0] == 0
    rc, lines, _ = cli(capsys, "validate", str(cdir / "bad-rules.yaml"))
    assert rc == 1 and len(lines) == 1 and "unknown rule type" in lines[0]
    rc, lines, _ = cli(capsys, "validate", str(cdir / "Not_An_Id.yaml"))
    assert rc == 1 and lines[0].startswith("INVALID ") and "not a config id" in lines[0]


@pytest.mark.parametrize(
    "name, why", [("notes.txt", "is not a content config file"), ("missing.json", "does not exist")]
)
def test_nothing_to_validate_is_an_error(capsys, cdir, name, why):
    rc, lines, err = cli(capsys, "validate", str(cdir / name))
    assert rc == 1 and lines == [] and why in err


def test_an_empty_directory_is_fine(capsys, tmp_path):
    rc, lines, err = cli(capsys, "validate", str(tmp_path))
    assert rc == 0 and lines == [] and "no content configs" in err


def test_render_catches_content_that_fails_its_own_rules(capsys, tmp_path):
    d = tmp_path / "c"
    write(
        d / "short.json",
        {
            "id": "short",
            "generator": "jinja2",
            "template": "TODO",
            "validation": [{"type": "length", "min_words": 5}, {"type": "placeholders", "severity": "warning"}],
        },
    )
    write(
        d / "warn.json",
        {
            "id": "warn",
            "generator": "jinja2",
            "template": "done TODO",
            "validation": [{"type": "placeholders", "severity": "warning"}],
        },
    )
    write(d / "needs-name.json", {"id": "needs-name", "generator": "jinja2", "template": "{{ name }}"})
    assert cli(capsys, "validate", str(d))[0] == 0  # without --render the rules are only checked
    rc, lines, _ = cli(capsys, "validate", "--render", str(d))
    assert rc == 1
    assert line_for(lines, "short").startswith("INVALID ") and "error length" in line_for(lines, "short")
    assert line_for(lines, "warn").startswith("ok ") and "with warnings" in line_for(lines, "warn")
    assert "MISSING_VARIABLE" in line_for(lines, "needs-name")


def test_list(capsys, cdir):
    rc, lines, _ = cli(capsys, "list", str(cdir))
    assert rc == 0
    (good,) = [ln for ln in lines if ln.startswith("good ")]
    assert "jinja2" in good and "markdown" in good and "1 rule" in good
    (typo,) = [ln for ln in lines if ln.startswith("typo ")]
    assert "BROKEN" in typo and "CONFIG_INVALID" in typo
    assert len(lines) == 3


def test_list_of_the_examples(capsys):
    rc, lines, _ = cli(capsys, "list", str(EXAMPLES))
    assert rc == 0
    assert any(ln.startswith("service-status ") and "json" in ln for ln in lines)


def test_exit_code_through_the_real_command(cdir):
    cmd = [sys.executable, "-m", "chora", "configs", "validate", str(cdir)]
    r = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stderr
    assert "INVALID  bad-rules" in r.stdout
    r = subprocess.run(cmd[:-1] + [str(EXAMPLES)], env=child_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
