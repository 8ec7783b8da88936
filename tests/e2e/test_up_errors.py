"""`chora up` says why a service could not start, on its own terminal."""

from __future__ import annotations

import asyncio
import subprocess

import pytest

from services.settings import Settings
from chora.up import Stack
from tests.conftest import write
from tests.e2e.test_up_and_generate import CHORA, up_env


def test_a_missing_webhook_secret_is_named_on_the_chora_up_terminal(tmp_path):
    config = write(
        tmp_path / "notifier.yaml",
        "subscriptions:\n  - {name: release-hook, events: [chora.batch_completed], url: 'http://127.0.0.1:9/x',"
        " secret_env: CHORA_TEST_UNSET_HOOK_SECRET}\n",
    )
    env = up_env(tmp_path, CHORA_METRICS_PORT="-1", CHORA_NOTIFIER_CONFIG=str(config))
    r = subprocess.run(CHORA + ["up"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "chora: service notifier exited with 1:" in r.stderr
    assert (
        "subscription 'release-hook': environment variable CHORA_TEST_UNSET_HOOK_SECRET (secret_env) is not set"
        in r.stderr
    )
    assert "Traceback" not in r.stderr and "chora is up" not in r.stdout
    assert "chora: stopped" in r.stdout  # what had started was stopped again
    assert not list((tmp_path / "var" / "run").glob("notifier.*.error"))  # read and cleared


async def test_without_a_reason_left_behind_the_last_lines_of_this_run_of_the_log_are_shown(tmp_path):
    stack = Stack(Settings(_env_file=None, home=tmp_path / "var", metrics_port=-1))
    write(stack.logs / "no-such-service.log", "a line from an earlier run\n")
    proc = stack.spawn("no-such-service")  # `chora service run` refuses an unknown name before any start
    with pytest.raises(SystemExit) as e:
        await stack.wait_ready("no-such-service", proc, timeout=60)
    msg = str(e.value)
    assert msg.startswith("chora: service no-such-service exited with 1:\n")
    assert "unknown service 'no-such-service'" in msg and "earlier run" not in msg
    assert str(stack.logs / "no-such-service.log") in msg
    await asyncio.to_thread(proc.wait)
