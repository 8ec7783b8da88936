"""The telemetry service against a real nats-server keeps request context values out of
its JSONL: a hash and the key names, unless the config the request names opts in
(``telemetry: {keep_context: true}``); redaction by key name still applies; a request
naming an unknown config is written like the rest (hashed), nothing stalls."""

from __future__ import annotations

import asyncio
import hashlib
import json

from bus.publisher import Publisher
from bus.topology import Topology, provision
from contracts.catalogue import ARTIFACT_REQUESTED, BATCH_REQUESTED, GENERATION_REQUESTED
from contracts.envelope import new_event
from contracts.events import ArtifactRequested, BatchItem, BatchRequested, GenerationRequested
from services.runtime import run_service
from tests.conftest import stop_services, wait_for, write

SECRET = {"customer": "Ada Lovelace", "api_key": "sk-live-42", "order": {"id": 7}}


def sha(ctx) -> str:
    canonical = json.dumps(ctx, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    return "sha256:" + hashlib.sha256(canonical).hexdigest()


def lines(path) -> dict[str, dict]:
    if not path.exists():
        return {}
    return {rec["event_id"]: rec for rec in map(json.loads, path.read_text().splitlines())}


async def test_sink_writes_hashes_unless_the_config_opts_in(nc, settings, tmp_path):
    cdir = tmp_path / "configs"
    keep = {"telemetry": {"keep_context": True}}
    write(cdir / "open.json", {"id": "open", "generator": "jinja2", "template": "x", **keep})
    write(cdir / "closed.json", {"id": "closed", "generator": "jinja2", "template": "x"})
    parts = [{"id": "p", "content_config_id": "closed"}]
    write(cdir / "artifacts" / "kept.json", {"id": "kept", "parts": parts, **keep})
    write(cdir / "artifacts" / "hidden.json", {"id": "hidden", "parts": parts})
    settings.configs_dir = cdir
    topo = Topology.from_settings(settings)
    js = nc.jetstream()
    await provision(js, topo)
    stop = asyncio.Event()
    task = asyncio.create_task(run_service("telemetry", settings, stop=stop), name="telemetry")
    try:

        def gen(config_id: str):
            return new_event(
                GENERATION_REQUESTED, GenerationRequested(content_config_id=config_id, context=SECRET), source="t"
            )

        events = {
            "open": gen("open"),
            "closed": gen("closed"),
            "unknown": gen("no-such-config"),
            "kept": new_event(ARTIFACT_REQUESTED, ArtifactRequested(artifact_id="kept", context=SECRET), source="t"),
            "hidden": new_event(
                ARTIFACT_REQUESTED, ArtifactRequested(artifact_id="hidden", context=SECRET), source="t"
            ),
            "batch": new_event(
                BATCH_REQUESTED,
                BatchRequested(
                    items=[
                        BatchItem(content_config_id="open", context=SECRET),
                        BatchItem(content_config_id="closed", context=SECRET),
                    ],
                    context=SECRET,
                ),
                source="t",
            ),
        }
        await Publisher(js, topo.prefix).publish_many(events.values())
        await wait_for(
            lambda: len(lines(settings.jsonl_path)) >= len(events), timeout=20, what="a JSONL line per request"
        )
    finally:
        errors = await stop_services(stop, [task])
    assert errors == []
    got = {name: lines(settings.jsonl_path)[ev.id] for name, ev in events.items()}
    kept_values = {"customer": "Ada Lovelace", "api_key": "[REDACTED]", "order": {"id": 7}}
    digest = {"context_sha256": sha(SECRET), "context_keys": ["api_key", "customer", "order"]}
    for name in ("open", "kept"):
        assert got[name]["context"] == kept_values and "context_sha256" not in got[name], name
    for name in ("closed", "unknown", "hidden"):
        assert "context" not in got[name] and {k: got[name][k] for k in digest} == digest, name
    batch = got["batch"]
    assert batch["items"][0] == {"content_config_id": "open", "context": kept_values}
    assert batch["items"][1] == {"content_config_id": "closed", **digest}
    assert "context" not in batch and batch["context_sha256"] == sha(SECRET)  # not every item opted in
    text = settings.jsonl_path.read_text()
    assert "sk-live-42" not in text and text.count("Ada Lovelace") == 3  # open, kept, the open item
