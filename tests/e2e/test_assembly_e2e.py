"""Artifacts and batches end to end: `chora up` as a subprocess, driven by the CLI."""

from __future__ import annotations

import re
import uuid
from collections import Counter

from tests.conftest import ROOT, example_configs, wait_for
from tests.e2e.test_up_and_generate import jsonl, run_cli, stack  # noqa: F401  (stack is a fixture)


def traced(stack, trace):  # noqa: F811  (the fixture by name)
    return [e for e in jsonl(stack) if e.get("trace_id") == trace]


async def test_assemble_and_batch_run_from_the_cli(stack, tmp_path):  # noqa: F811
    # 1. chora assemble product-docs: the composed artifact on stdout.
    trace = "assemble-" + uuid.uuid4().hex[:8]
    r = run_cli(stack, "assemble", "product-docs", "--trace-id", trace, "--timeout", "60")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert out.startswith("# chora-compose") and "## API reference" in out and "## Summary" in out
    assert "POST /v1/artifacts" in out and "The overview above runs to" in out
    assert "{{" not in out and "{%" not in out

    # --output, and an unknown artifact: exit 1 with the code.
    target = tmp_path / "docs.md"
    r = run_cli(stack, "assemble", "product-docs", "--output", str(target), "--context", '{"product": "Acme"}')
    assert r.returncode == 0, r.stderr
    assert target.read_text().startswith("# Acme")
    r = run_cli(stack, "assemble", "no-such-artifact", "--timeout", "30")
    assert r.returncode == 1 and "ARTIFACT_NOT_FOUND" in r.stderr

    # 2. chora batch run: exit 0 and the summary.
    btrace = "batch-" + uuid.uuid4().hex[:8]
    r = run_cli(
        stack, "batch", "run", str(ROOT / "examples" / "batches" / "hundred.yaml"), "--trace-id", btrace, timeout=120
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(r"total\s*│\s*100\b", r.stdout), r.stdout
    assert re.search(r"successful\s*│\s*100\b", r.stdout) and re.search(r"failed\s*│\s*0\b", r.stdout)
    batch_id = re.search(r"batch ([0-9a-f-]{36}): 100 items", r.stderr).group(1)

    r = run_cli(stack, "batch", "status", batch_id)
    assert r.returncode == 0 and "100/100" in r.stdout and "finished    yes" in r.stdout, r.stdout

    # failures: exit 1, and the failed items with their codes
    r = run_cli(stack, "batch", "run", str(ROOT / "examples" / "batches" / "with-failures.yaml"), timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "CONFIG_NOT_FOUND" in r.stdout and "MISSING_VARIABLE" in r.stdout and "no-such-config" in r.stdout

    # 3. Every event of those runs stands once in the JSONL.
    expected_assemble = {
        "chora.artifact.requested": 1,
        "chora.generation.requested": 4,
        "chora.content_generated": 4,
        "chora.content_validated": 4,
        "chora.artifact_assembled": 1,
    }
    await wait_for(lambda: len(traced(stack, trace)) >= 14, timeout=30, what="the artifact's 14 events in the JSONL")
    lines = traced(stack, trace)
    assert Counter(e["event_type"] for e in lines) == expected_assemble
    assert len({e["event_id"] for e in lines}) == len(lines) == 14

    await wait_for(lambda: len(traced(stack, btrace)) >= 302, timeout=30, what="the batch's 302 events in the JSONL")
    lines = traced(stack, btrace)
    assert Counter(e["event_type"] for e in lines) == {
        "chora.batch.requested": 1,
        "chora.generation.requested": 100,
        "chora.content_generated": 100,
        "chora.content_validated": 100,
        "chora.batch_completed": 1,
    }
    assert len({e["event_id"] for e in lines}) == len(lines) == 302


def test_cli_timeouts_and_bad_files(nats_server, tmp_path):
    """No assembler running: exit 75 (EXIT_TIMEOUT) after --timeout, the request stays queued; a bad batch file: exit 1."""
    import subprocess
    import sys

    from tests.conftest import child_env

    env = child_env(
        NATS_URL=nats_server.url,
        CHORA_HOME=str(tmp_path / "var"),
        CHORA_PREFIX="x" + uuid.uuid4().hex[:8],
        CHORA_CONFIGS_DIR=str(example_configs()),
    )
    cli = [sys.executable, "-m", "chora"]

    def run(*args):
        return subprocess.run(cli + list(args), env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)

    assert run("nats", "provision").returncode == 0
    r = run("assemble", "product-docs", "--timeout", "1")
    assert r.returncode == 75 and "no outcome" in r.stderr
    r = run("batch", "run", str(ROOT / "examples" / "batches" / "hundred.yaml"), "--timeout", "1")
    assert r.returncode == 75 and "not completed within" in r.stderr and "chora batch status" in r.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("items:\n  - {content_config: typo}\n")
    r = run("batch", "run", str(bad))
    assert r.returncode == 1 and "content_config_id" in r.stderr
    r = run("batch", "status", "nope")
    assert r.returncode == 3 and "no batch nope" in r.stderr  # EXIT_NOT_FOUND, as `batch results`
