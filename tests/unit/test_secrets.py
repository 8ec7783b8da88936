"""Secrets stay secret: NATS passwords and tokens, and the notifier's webhook secrets
(read from the environment variables its subscriptions name), never show up in the
settings' repr/str, in error messages, in log output (every logger, DEBUG and up), in
published events or in what the notifier reports about itself.

A real local HTTP server plays the webhooks; no NATS server is needed here (the
integration test test_nats_permissions.py checks the logs of services running with
their NATS users).
"""

from __future__ import annotations

import json
import logging
import secrets
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from bus.connection import connect
from contracts.handling import Delivery, Reject, Retry
from bus.topology import Topology
from bus.settings import NatsSettings
from services.settings import Settings
from contracts.catalogue import CONTENT_GENERATED
from contracts.envelope import encode_binary, new_event
from contracts.events import ContentGenerated
from services.notifier.service import NotifierApp
from services.notifier.signing import verify


def _value(v) -> str | None:
    """A settings value as text, whether it is a plain str or a pydantic SecretStr."""
    return v.get_secret_value() if hasattr(v, "get_secret_value") else v


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- NATS credentials


@pytest.fixture
def nats_env(monkeypatch) -> dict[str, str]:
    env = {
        "NATS_USER": "generator",
        "NATS_PASSWORD": "natspw-" + secrets.token_hex(12),
        "NATS_TOKEN": "natstoken-" + secrets.token_hex(12),
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


def test_nats_password_and_token_are_not_in_the_settings_repr_or_str(nats_env):
    s = Settings()
    # they are read (so the test is about how they are shown, not whether they are there)
    assert _value(s.nats.password) == nats_env["NATS_PASSWORD"]
    assert _value(s.nats.token) == nats_env["NATS_TOKEN"]
    for shown in (repr(s), str(s), f"{s}", repr(s.nats), str(s.nats)):
        assert nats_env["NATS_PASSWORD"] not in shown, "the NATS password is shown"
        assert nats_env["NATS_TOKEN"] not in shown, "the NATS token is shown"


@pytest.mark.parametrize(
    "variable, value, field",
    [("CHORA_PREFIX", "Not A Prefix", "prefix"), ("NATS_CONNECT_TIMEOUT", "soon", "connect_timeout")],
)
def test_bad_settings_message_does_not_echo_the_password(nats_env, monkeypatch, variable, value, field):
    from chora.common import load_settings

    monkeypatch.setenv(variable, value)
    with pytest.raises(SystemExit) as info:
        load_settings()
    message = str(info.value)
    assert field in message  # it does explain what is wrong
    assert nats_env["NATS_PASSWORD"] not in message and nats_env["NATS_TOKEN"] not in message


async def test_a_failing_connection_logs_no_credentials(caplog):
    caplog.set_level(logging.DEBUG)
    password, url_password = "natspw-" + secrets.token_hex(8), "urlpw-" + secrets.token_hex(8)
    port = _closed_port()
    for url, settings in (
        (
            f"nats://127.0.0.1:{port}",
            NatsSettings(user="u", password=password, max_reconnect_attempts=1, connect_timeout=0.5),
        ),
        (f"nats://u:{url_password}@127.0.0.1:{port}", NatsSettings(max_reconnect_attempts=1, connect_timeout=0.5)),
    ):
        with pytest.raises(Exception) as info:
            await connect(settings, url)
        assert password not in str(info.value) and url_password not in str(info.value)
    assert "nats error" in caplog.text  # the failures were logged
    assert password not in caplog.text and url_password not in caplog.text


# --------------------------------------------------------------------------- the notifier's webhook secrets


@pytest.fixture
def endpoint():
    """A real local webhook: /ok answers 204, /flaky 500, /reject 400 (echoing the request
    headers in its body, as a careless endpoint might)."""
    received: list[tuple[str, dict, bytes]] = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            received.append((self.path, dict(self.headers), body))
            status = {"/ok": 204, "/flaky": 500, "/reject": 400}.get(self.path, 404)
            echo = json.dumps(dict(self.headers)).encode() if status == 400 else b"oops"
            self.send_response(status)
            if status != 204:
                self.send_header("Content-Length", str(len(echo)))
            self.end_headers()
            if status != 204:
                self.wfile.write(echo)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}", received
    server.shutdown()
    server.server_close()


async def run_notifier(tmp_path, endpoint, caplog) -> dict:
    """Start the notifier with four subscriptions (delivered, 5xx, 4xx, connection refused),
    handle one event on each through its consumer's handler, close it; return everything
    it showed."""
    caplog.set_level(logging.DEBUG)
    host, received = endpoint
    names = ("ok", "flaky", "reject", "down")
    env = {f"{n.upper()}_HOOK_SECRET": f"whsec-{n}-" + secrets.token_hex(12) for n in names}
    url_password = "urlpw-" + secrets.token_hex(8)
    urls = {
        "ok": f"http://hooks:{url_password}@{host}/ok",  # credentials in the URL, too
        "flaky": f"http://{host}/flaky",
        "reject": f"http://{host}/reject",
        "down": f"http://127.0.0.1:{_closed_port()}/down",
    }
    config = tmp_path / "notifier.yaml"
    config.write_text(
        "subscriptions:\n"
        + "".join(
            f"  - name: {n}\n    events: [{CONTENT_GENERATED}]\n    url: {urls[n]}\n"
            f"    secret_env: {n.upper()}_HOOK_SECRET\n    max_attempts: 2\n    timeout_s: 2\n"
            for n in names
        )
    )
    app = NotifierApp(config, environ=env)
    await app.start()
    outcomes: dict[str, object] = {}
    try:
        topo = Topology.from_settings(Settings(prefix="chora"))
        handlers = {spec.durable.removeprefix("notify-"): handler for spec, handler in app.consumers(topo)}
        assert set(handlers) == set(names)
        event = new_event(
            CONTENT_GENERATED,
            ContentGenerated(request_id="r1", content_config_id="hello-world", status="success", content="hi"),
            source="urn:test",
        )
        for n in names:
            try:
                first = Delivery.first(f"notify-{n}", max_attempts=app.targets[n].max_deliver)
                outcomes[n] = await handlers[n](event, first)
            except (Retry, Reject) as e:
                outcomes[n] = e
        reports = [
            repr(app),
            repr(app.targets),
            repr(app.config),
            json.dumps(app.info()),
            json.dumps(app.status(), default=str),
        ]
    finally:
        await app.close()

    # each path was taken: delivered, retried (5xx and connection refused), rejected (4xx)
    assert isinstance(outcomes["ok"], list) and outcomes["ok"][0].type == "chora.notification_delivered"
    assert isinstance(outcomes["flaky"], Retry) and isinstance(outcomes["down"], Retry)
    assert isinstance(outcomes["reject"], Reject) and outcomes["reject"].events
    # the secrets were used: each request is signed with its subscription's secret
    by_path = {path: (headers, body) for path, headers, body in received}
    for n, path in (("ok", "/ok"), ("flaky", "/flaky"), ("reject", "/reject")):
        headers, body = by_path[path]
        key = env[f"{n.upper()}_HOOK_SECRET"].encode()
        assert verify(key, headers, body)

    shown = [caplog.text, *reports]
    for o in outcomes.values():
        if isinstance(o, Exception):
            shown.append(str(o))
            o = getattr(o, "events", [])
        for ev in o:
            headers, body = encode_binary(ev)
            shown += [json.dumps(headers), body.decode()]
    for _path, headers, body in received:  # what went over the wire: HMACs only
        shown += [json.dumps(headers), body.decode()]
    assert "subscription" in caplog.text  # the notifier did log (its start, the outcomes)
    return {"env": env, "url_password": url_password, "shown": shown, "log": caplog.text}


async def test_webhook_secrets_stay_out_of_logs_events_and_reports(tmp_path, endpoint, caplog):
    run = await run_notifier(tmp_path, endpoint, caplog)
    for name, value in run["env"].items():
        assert not [t for t in run["shown"] if value in t], f"{name}'s value leaked"


async def test_webhook_url_credentials_stay_out_of_the_logs(tmp_path, endpoint, caplog):
    """The notifier logs its subscriptions with ``safe_url``; nothing else may log the URL
    with its user:password either (at any level: `chora` runs services at INFO)."""
    run = await run_notifier(tmp_path, endpoint, caplog)
    leaked = [line for line in run["log"].splitlines() if run["url_password"] in line]
    assert not leaked, f"the webhook URL's password is in the logs: {leaked[:2]}"
