"""The CLI as a real subprocess against a real nats-server: batch ids by prefix, a closed
pipe, `chora generate` on invalid content, an unprovisioned server, `configs validate`
without rendering."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from bus.state import StateStore
from bus.topology import Topology, provision
from services.assembler.batches import new_record
from services.assembler.state import batch_key, encode
from tests.conftest import child_env, write
from tests.integration.test_assembler_batches import running

CHORA = [sys.executable, "-m", "chora"]


def cli_env(settings, **extra) -> dict[str, str]:
    return child_env(
        NATS_URL=settings.nats.url,
        CHORA_HOME=str(settings.home),
        CHORA_PREFIX=settings.prefix,
        CHORA_CONFIGS_DIR=str(settings.configs_dir),
        **extra,
    )


def run(settings, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(CHORA + list(args), env=cli_env(settings), capture_output=True, text=True, timeout=timeout)


async def arun(settings, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """``run`` off the event loop, for services running in-process meanwhile."""
    import asyncio

    return await asyncio.to_thread(run, settings, *args, timeout=timeout)


BATCHES = [
    "aaaa1111-0000-4000-8000-000000000001",
    "aaaa2222-0000-4000-8000-000000000002",
    "bbbb3333-0000-4000-8000-000000000003",
]


@pytest.fixture
async def batches(nc, settings):
    topo = Topology.from_settings(settings)
    await provision(nc.jetstream(), topo)
    state = StateStore(nc.jetstream(), topo.state_bucket)
    for i, batch_id in enumerate(BATCHES):
        await state.create(batch_key(batch_id), encode(new_record(10 + i, True, 1000.0)))
        await state.put(f"{batch_key(batch_id)}.item.0", b"{}")  # item records do not count as batches
    return BATCHES


async def test_batch_status_accepts_an_unambiguous_prefix(settings, batches):
    r = await arun(settings, "batch", "status", "bbbb3333")  # the 8 characters of the progress bar
    assert r.returncode == 0, r.stderr
    assert f"batch {BATCHES[2]}: running" in r.stdout and "0/12" in r.stdout
    r = await arun(settings, "batch", "status", BATCHES[0])
    assert r.returncode == 0 and f"batch {BATCHES[0]}: running" in r.stdout


async def test_batch_status_refuses_an_ambiguous_or_unknown_prefix(settings, batches):
    r = await arun(settings, "batch", "status", "aaaa")
    assert r.returncode == 3  # EXIT_NOT_FOUND, as for `batch results`
    assert "ambiguous: 2 batches" in r.stderr and BATCHES[0] in r.stderr and BATCHES[1] in r.stderr
    r = await arun(settings, "batch", "status", "cccc")
    assert r.returncode == 3 and "no batch cccc" in r.stderr


async def test_a_closed_pipe_ends_the_command_quietly(settings, batches):
    """`chora batch status ... | head` where head is gone before chora writes: no traceback."""
    import asyncio

    def run_into_closed_pipe():
        proc = subprocess.Popen(
            CHORA + ["batch", "status", BATCHES[0]],
            env=cli_env(settings),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        proc.stdout.close()  # the reader is gone: the first write gets EPIPE
        return proc.wait(60), proc.stderr.read().decode()

    rc, err = await asyncio.to_thread(run_into_closed_pipe)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert rc == 1


def test_generate_on_an_unprovisioned_server_says_to_provision(settings):
    r = run(settings, "generate", "hello-world", "--timeout", "5")
    assert r.returncode == 1
    assert "chora nats provision" in r.stderr, r.stderr


@pytest.fixture
def strict_configs(tmp_path, settings):
    d = tmp_path / "configs"
    write(
        d / "too-short.yaml",
        "id: too-short\ngenerator: demonstration\nexample_output: hi\nvalidation:\n  - {type: length, min_words: 5}\n",
    )
    return settings.model_copy(update={"configs_dir": d})


async def test_generate_exits_3_with_the_issues_when_the_content_is_invalid(strict_configs, nc):
    s = strict_configs
    await provision(nc.jetstream(), Topology.from_settings(s))
    async with running(("generator", s), ("validator", s)):
        r = await arun(s, "generate", "too-short")
        assert r.returncode == 3, r.stderr
        assert "error: length" in r.stderr and "invalid" in r.stderr
        assert r.stdout == ""
        r = await arun(s, "generate", "too-short", "--allow-invalid")
        assert r.returncode == 0, r.stderr
        assert r.stdout == "hi\n"


def test_configs_validate_compiles_templates_and_checks_generators_without_rendering(tmp_path, settings):
    d = tmp_path / "configs"
    write(d / "templates" / "broken.md.j2", "# Title\n\n{% for x in items %}\n{{ x }}\n")
    write(d / "broken-template.yaml", "id: broken-template\ngenerator: jinja2\ntemplate_file: templates/broken.md.j2\n")
    write(d / "typo-generator.yaml", "id: typo-generator\ngenerator: jinja3\ntemplate: hello\n")
    # renders only with a context it does not have: fine without --render, invalid with it
    write(d / "needs-context.yaml", "id: needs-context\ngenerator: jinja2\ntemplate: '{{ name }}'\n")
    r = run(settings, "configs", "validate", str(d))
    assert r.returncode == 1
    lines = {ln.split()[1]: ln for ln in r.stdout.splitlines()}
    assert lines["broken-template"].startswith("INVALID")
    assert "TEMPLATE_ERROR: templates/broken.md.j2, line 4" in lines["broken-template"]
    assert lines["typo-generator"].startswith("INVALID") and "UNKNOWN_GENERATOR" in lines["typo-generator"]
    assert "'jinja3'" in lines["typo-generator"]
    assert lines["needs-context"].startswith("ok") and "template compiles" in lines["needs-context"]
    r = run(settings, "configs", "validate", "--render", str(d / "needs-context.yaml"))
    assert r.returncode == 1 and "MISSING_VARIABLE" in r.stdout


async def test_provisioning_again_changes_no_stream(nc, settings, caplog):
    topo = Topology.from_settings(settings)
    await provision(nc.jetstream(), topo)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="chora.bus"):
        await provision(nc.jetstream(), topo)
    assert [r.getMessage() for r in caplog.records if "stream" in r.getMessage()] == []
