"""`--json` on every `chora` command that prints results, against one running `chora up`
(module-scoped: a real nats-server and every service as its own process). Each command runs
as a real subprocess; its stdout must be one JSON document (or JSON lines for listings and
streams), with the fields scripts read, for success, error and timeout outcomes alike.
Commands that need no server (configs, completion, contracts schemas) are covered in
tests/unit/test_cli_options.py."""

from __future__ import annotations

import json
import subprocess
import uuid

import nats
import pytest

from tests.conftest import wait_for
from tests.e2e.test_up_and_generate import CHORA, start_up, stop_up


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli-json")
    info = start_up(tmp)
    info.update(tmp=tmp, prefix=info["env"]["CHORA_PREFIX"])
    yield info
    stop_up(info)


def chora(stack, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        CHORA + list(args), cwd=stack["tmp"], env=env or stack["env"], capture_output=True, text=True, timeout=90
    )


def document(r: subprocess.CompletedProcess) -> dict:
    """The one JSON document on stdout (one line: printed by print_json)."""
    lines = r.stdout.splitlines()
    assert len(lines) == 1, f"not one JSON line on stdout:\n{r.stdout}\n{r.stderr}"
    return json.loads(lines[0])


def test_generate_json_on_success_error_and_timeout(stack):
    trace = "json-" + uuid.uuid4().hex[:8]
    r = chora(stack, "generate", "hello-world", "--json", "--context", '{"name": "Ada"}', "--trace-id", trace)
    assert r.returncode == 0, r.stderr
    doc = document(r)
    assert doc["outcome"] == "success" and doc["trace_id"] == trace and doc["request_id"]
    assert doc["content"].startswith("# Hello, Ada!")
    assert (
        doc["content_generated"]["status"] == "success" and doc["content_generated"]["request_id"] == doc["request_id"]
    )
    assert doc["content_validated"]["valid"] is True

    r = chora(stack, "generate", "no-such-config", "--json")
    assert r.returncode == 1
    doc = document(r)
    assert doc["outcome"] == "error" and doc["content"] is None
    assert doc["content_generated"]["error"]["code"] == "CONFIG_NOT_FOUND"

    # a prefix whose stream exists but which no service reads: no outcome, exit 75
    quiet = {**stack["env"], "CHORA_PREFIX": "q" + uuid.uuid4().hex[:8]}
    assert chora(stack, "nats", "provision", env=quiet).returncode == 0
    r = chora(stack, "generate", "hello-world", "--json", "--timeout", "1", env=quiet)
    assert r.returncode == 75, r.stderr
    doc = document(r)
    assert doc["outcome"] == "timeout" and doc["content_generated"] is None and doc["request_id"]


def test_assemble_json(stack):
    r = chora(stack, "assemble", "welcome-pack", "--json")
    assert r.returncode == 0, r.stderr
    doc = document(r)
    assert doc["outcome"] == "success" and doc["output"] is None
    assert "# Hello, new colleague!" in doc["content"]
    assert doc["artifact_assembled"]["status"] == "success" and doc["artifact_assembled"]["parts_count"] == 2

    out = stack["tmp"] / "pack.md"
    doc = document(chora(stack, "assemble", "welcome-pack", "--json", "-o", str(out)))
    assert doc["output"] == str(out) and doc["content"] is None and out.read_text().startswith("# Hello")


def test_batch_run_and_status_json(stack):
    batch = stack["tmp"] / "batch.yaml"
    batch.write_text(
        "items:\n  - {content_config_id: hello-world, context: {name: A}}\n  - {content_config_id: no-such-config}\n"
    )
    r = chora(stack, "batch", "run", str(batch), "--json")
    assert r.returncode == 1, r.stderr  # one item failed
    doc = document(r)
    assert doc["outcome"] == "error" and doc["batch_completed"]["total"] == 2
    assert (doc["batch_completed"]["successful"], doc["batch_completed"]["failed"]) == (1, 1)
    assert sorted(i["status"] for i in doc["items"]) == ["error", "success"]

    r = chora(stack, "batch", "status", doc["batch_id"][:8], "--json")
    assert r.returncode == 0, r.stderr
    st = document(r)
    assert st["batch_id"] == doc["batch_id"] and st["finished"] is True and st["done"] == 2


async def test_dlq_list_and_replay_json(stack):
    nc = await nats.connect(stack["nats_url"])
    try:
        js = nc.jetstream()
        await js.publish(f"{stack['prefix']}.generation.requested", b"not an event")  # no ce-* headers
        dlq = f"{stack['prefix'].upper()}_DLQ"

        async def dead_lettered() -> bool:
            return (await js.stream_info(dlq)).state.messages >= 1

        await wait_for(dead_lettered, timeout=30, what="the malformed request in the DLQ stream")
    finally:
        await nc.close()
    r = chora(stack, "dlq", "list", "--consumer", "generator", "--json")
    assert r.returncode == 0, r.stderr
    entries = [json.loads(line) for line in r.stdout.splitlines()]  # JSON lines: one per dead letter
    assert len(entries) == 1 and entries[0]["consumer"] == "generator" and entries[0]["code"]

    r = chora(stack, "dlq", "replay", str(entries[0]["seq"]), "--json")
    assert r.returncode == 0, r.stderr
    doc = document(r)
    assert [e["seq"] for e in doc["replayed"]] == [entries[0]["seq"]] and doc["failed"] == []

    r = chora(stack, "dlq", "replay", "999999", "--json")  # no such dead letter
    assert r.returncode == 1
    doc = document(r)
    assert doc["replayed"] == [] and doc["failed"][0]["seq"] == 999999


def test_cache_purge_and_doctor_json(stack):
    r = chora(stack, "cache", "purge", "hello-world", "--json")
    assert r.returncode == 0, r.stderr
    doc = document(r)
    assert doc["config_id"] == "hello-world" and isinstance(doc["purged"], int) and doc["bucket"]

    r = chora(stack, "doctor", "--json")
    doc = json.loads(r.stdout)  # doctor's document is indented: one document, several lines
    assert doc["stack"]["reachable"] is True and doc["configs"]
    assert r.returncode == (0 if doc["ready"] else 1)


def test_nats_provision_and_events_json(stack):
    r = chora(stack, "nats", "provision", "--json")
    assert r.returncode == 0, r.stderr
    doc = document(r)
    assert doc["streams"] == [f"{stack['prefix'].upper()}_EVENTS", f"{stack['prefix'].upper()}_DLQ"]
    assert "generator" in doc["consumers"]

    trace = "ev-" + uuid.uuid4().hex[:8]
    assert chora(stack, "generate", "hello-world", "--trace-id", trace).returncode == 0
    jsonl = stack["tmp"] / "var" / "telemetry" / "events.jsonl"

    def mirrored() -> bool:
        return jsonl.exists() and trace in jsonl.read_text()

    import asyncio

    asyncio.run(wait_for(mirrored, timeout=30, what="the telemetry line of the trace"))
    for cmd in (["events", "query"], ["events", "tail", "--no-follow"]):
        r = chora(stack, *cmd, "--trace-id", trace, "--json")
        assert r.returncode == 0, r.stderr
        lines = [json.loads(line) for line in r.stdout.splitlines()]
        assert lines and all(d["trace_id"] == trace for d in lines), cmd
