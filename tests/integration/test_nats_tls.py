"""deploy/nats/tls.conf against a real nats-server, with a throwaway CA (trustme).

The server runs from the very file an operator deploys; its certificate and key come
from the environment (``CHORA_NATS_TLS_CERT`` / ``_KEY``) as the file says. Shown:
- the services run over TLS under their own users: a client's request gets its
  content_generated, and every connection the server holds is a TLS one;
- a client that speaks plain text is refused before it can send a password;
- a client that does not trust the server's CA refuses the server.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import urllib.request
from pathlib import Path

import pytest
import trustme

from bus.connection import TLSConnectError, connect
from bus.publisher import Publisher
from bus.server import EmbeddedServer
from bus.topology import Topology, provision
from bus.settings import NatsSettings
from services.settings import Settings
from contracts.catalogue import CONTENT_GENERATED, GENERATION_REQUESTED, subject_for
from contracts.envelope import decode, new_event
from contracts.events import GenerationRequested
from services.runtime import ServiceStartError, ready_file, run_service
from tests.conftest import ROOT, example_configs, stop_services, wait_for

TLS_CONF = ROOT / "deploy" / "nats" / "tls.conf"
USERS = ("admin", "generator", "telemetry", "validator", "assembler", "notifier", "client", "gateway")


def write_pki(directory: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1/localhost signed by it, and another CA."""
    ca, stranger = trustme.CA(), trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    paths = {name: directory / f"{name}.pem" for name in ("ca", "other-ca", "server-cert", "server-key")}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    stranger.cert_pem.write_to_path(str(paths["other-ca"]))
    cert.private_key_pem.write_to_path(str(paths["server-key"]))
    for i, blob in enumerate(cert.cert_chain_pems):
        blob.write_to_path(str(paths["server-cert"]), append=i > 0)
    return paths


@pytest.fixture
def pki(tmp_path) -> dict[str, Path]:
    d = tmp_path / "pki"
    d.mkdir()
    return write_pki(d)


@pytest.fixture
def passwords(monkeypatch) -> dict[str, str]:
    pw = {u: "p" + secrets.token_hex(16) for u in USERS}
    for u, p in pw.items():
        monkeypatch.setenv(f"CHORA_{u.upper()}_PASSWORD", p)
    return pw


@pytest.fixture
def tls_server(tmp_path, pki, passwords, monkeypatch):
    monkeypatch.setenv("CHORA_NATS_TLS_CERT", str(pki["server-cert"]))
    monkeypatch.setenv("CHORA_NATS_TLS_KEY", str(pki["server-key"]))
    server = EmbeddedServer(tmp_path / "nats-store", config=TLS_CONF, log_path=tmp_path / "nats-server.log").start()
    yield server
    server.stop()


def tls_url(server: EmbeddedServer) -> str:
    return server.url.replace("nats://", "tls://")


def settings_for(tmp_path: Path, server: EmbeddedServer, user: str, password: str, ca: Path) -> Settings:
    return Settings(
        home=tmp_path / "var",
        prefix="chora",  # auth.conf is written for it
        configs_dir=example_configs(),
        metrics_port=0,
        provision=False,
        nats=NatsSettings(url=tls_url(server), user=user, password=password, tls_ca=ca, max_reconnect_attempts=1),
    )


async def test_the_services_run_over_tls_under_their_own_users(tmp_path, tls_server, passwords, pki):
    admin = await connect(settings_for(tmp_path, tls_server, "admin", passwords["admin"], pki["ca"]).nats, name="admin")
    stop = asyncio.Event()
    tasks = []
    client = None
    try:
        topo = Topology.from_settings(settings_for(tmp_path, tls_server, "admin", passwords["admin"], pki["ca"]))
        await provision(admin.jetstream(), topo)
        for name in ("generator", "telemetry"):
            s = settings_for(tmp_path, tls_server, name, passwords[name], pki["ca"])
            tasks.append(asyncio.create_task(run_service(name, s, stop=stop), name=name))

        def ready() -> bool:
            for t in tasks:
                if t.done():
                    t.result()
            return all(
                ready_file(settings_for(tmp_path, tls_server, n, "", pki["ca"]), n).exists()
                for n in ("generator", "telemetry")
            )

        await wait_for(ready, 30, "generator and telemetry ready over TLS")

        client_settings = settings_for(tmp_path, tls_server, "client", passwords["client"], pki["ca"])
        client = await connect(client_settings.nats, name="client", inbox_prefix="_INBOX.client")
        outcome: asyncio.Future = asyncio.get_running_loop().create_future()
        request = new_event(
            GENERATION_REQUESTED,
            GenerationRequested(content_config_id="hello-world", context={"name": "TLS"}),
            source="urn:test",
        )

        async def on_outcome(msg):
            event = decode(msg.headers, msg.data)
            if event.data.request_id == request.id and not outcome.done():
                outcome.set_result(event)

        await client.subscribe(subject_for(CONTENT_GENERATED, "chora"), cb=on_outcome)
        await Publisher(client.jetstream(), "chora").publish(request)
        event = await asyncio.wait_for(outcome, 20)
        assert event.data.status == "success" and "TLS" in event.data.content

        with urllib.request.urlopen(f"{tls_server.monitor_url}/connz?auth=1", timeout=5) as r:
            conns = json.loads(r.read())["connections"]
        assert {c["authorized_user"] for c in conns} >= {"admin", "generator", "telemetry", "client"}
        assert all(c.get("tls_version", "").startswith("1.") for c in conns), [
            (c["authorized_user"], c.get("tls_version")) for c in conns
        ]
    finally:
        failed = await stop_services(stop, tasks)
        if client is not None:
            await client.close()
        await admin.close()
        assert not failed, f"services failed: {failed}"


def test_a_plain_text_client_is_refused_before_it_sends_a_password(tls_server, passwords):
    host, port = tls_server.url.removeprefix("nats://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        info = sock.recv(4096).decode()
        assert info.startswith("INFO ")
        assert json.loads(info[5:])["tls_required"] is True
        connect_op = json.dumps({"user": "client", "pass": passwords["client"], "verbose": False})
        sock.sendall(f"CONNECT {connect_op}\r\nPING\r\n".encode())
        answer = b""
        try:
            while chunk := sock.recv(4096):
                answer += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    assert b"PONG" not in answer  # never served
    with urllib.request.urlopen(f"{tls_server.monitor_url}/connz", timeout=5) as r:
        assert json.loads(r.read())["num_connections"] == 0  # the server hung up: nobody was admitted


async def test_a_client_that_does_not_trust_the_ca_refuses_the_server_with_a_clear_error(
    tmp_path, tls_server, passwords, pki
):
    """At once, not a hang (nats-py alone never returns here: nats-io/nats.py#718), for
    a one-off connection and for a service that would otherwise reconnect forever."""
    s = settings_for(tmp_path, tls_server, "client", passwords["client"], pki["other-ca"])
    with pytest.raises(TLSConnectError) as e:
        await asyncio.wait_for(connect(s.nats, name="stranger"), 10)
    assert "CERTIFICATE_VERIFY_FAILED" in str(e.value) and "NATS_TLS_CA" in str(e.value)

    forever = s.model_copy(update={"nats": s.nats.model_copy(update={"max_reconnect_attempts": -1})})
    with pytest.raises(ServiceStartError) as e:
        await asyncio.wait_for(run_service("generator", forever), 10)
    assert "cannot connect to NATS" in str(e.value) and "NATS_TLS_CA" in str(e.value)
