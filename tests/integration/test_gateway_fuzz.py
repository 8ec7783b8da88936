"""The gateway fuzzed from its checked-in OpenAPI document (schemathesis: valid and invalid
bodies, parameters and headers) against a real server: `chora service run gateway` on a free
port over a real nats-server. Every answer is a response below 500; every 4xx is a problem
document with a code. (No generator runs: requests that get through answer 202 after the
short timeout.) GET /v1/events streams without end, so it is left to test_gateway_http.py."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings

from bus.server import EmbeddedServer
from services.gateway.openapi import OPENAPI_PATH
from services.gateway.security import hash_key
from tests.conftest import ROOT, child_env, example_configs

KEY = "fuzz-admin-key"
schema = schemathesis.openapi.from_path(str(OPENAPI_PATH))


@pytest.fixture(scope="module")
def gateway_url(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gw-fuzz")
    server = EmbeddedServer(tmp / "nats-store", log_path=tmp / "nats-server.log").start()
    keys = tmp / "keys.json"
    keys.write_text(json.dumps([{"name": "fuzz", "key_sha256": hash_key(KEY), "scopes": ["admin"]}]))
    env = child_env(
        NATS_URL=server.url,
        CHORA_HOME=str(tmp / "var"),
        CHORA_PREFIX="f" + uuid.uuid4().hex[:8],
        CHORA_CONFIGS_DIR=str(example_configs()),
        CHORA_METRICS_PORT="-1",
        CHORA_GATEWAY_PORT="0",
        CHORA_GATEWAY_KEYS_FILE=str(keys),
        CHORA_GATEWAY_DEFAULT_TIMEOUT_S="0.2",
        CHORA_GATEWAY_MAX_TIMEOUT_S="0.5",
        CHORA_GATEWAY_RATE_PER_S="100000",
        CHORA_GATEWAY_RATE_BURST="100000",
        CHORA_CALLBACK_ALLOW='["http://127.0.0.1:9/hooks/"]',
    )
    log = open(tmp / "gateway.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "chora", "service", "run", "gateway"], cwd=ROOT, env=env, stdout=log, stderr=log
    )
    try:
        run = tmp / "var" / "run"
        ready = run / f"gateway.{proc.pid}.json"
        for _ in range(600):  # up to 30 s, polling the readiness file the runtime writes
            if ready.exists() or proc.poll() is not None:
                break
            time.sleep(0.05)
        assert ready.exists(), (tmp / "gateway.log").read_text()
        yield json.loads(ready.read_text())["gateway_url"]
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
        server.stop()
    assert b"Traceback" not in (tmp / "gateway.log").read_bytes(), (tmp / "gateway.log").read_text()


@schema.exclude(path="/v1/events").parametrize()
@settings(
    max_examples=6, deadline=None, suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate]
)
def test_no_input_gets_a_5xx_and_every_4xx_is_a_problem(case, gateway_url):
    auth = {} if case.headers and "Authorization" in case.headers else {"Authorization": f"Bearer {KEY}"}
    r = case.call(base_url=gateway_url, headers=auth, timeout=10)
    assert r.status_code < 500, f"{case.method} {case.formatted_path}: {r.status_code} {r.text[:300]}"
    if r.status_code >= 400:
        content_type = r.headers["content-type"]
        content_type = content_type[0] if isinstance(content_type, list) else content_type
        assert content_type.startswith("application/problem+json"), f"{r.status_code} {r.text[:200]}"
        doc = r.json()
        assert doc["status"] == r.status_code and doc["code"].isupper() and doc["trace_id"]
