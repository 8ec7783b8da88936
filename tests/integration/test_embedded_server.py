"""bus/server.py: the embedded nats-server is ready when its ports file says so, and the
addresses it reports are the ones the server really listens on (checked against /varz)."""

from __future__ import annotations

import json
import socket
import time
import urllib.request
from pathlib import Path

import nats
import pytest

from bus.server import EmbeddedServer, ServerError


def varz(monitor_url: str) -> dict:
    with urllib.request.urlopen(f"{monitor_url}/varz", timeout=5) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("embedded")
    s = EmbeddedServer(d / "store", log_path=d / "nats-server.log").start()
    yield s
    s.stop()


async def test_a_started_server_answers_with_jetstream(server):
    nc = await nats.connect(server.url, max_reconnect_attempts=0)
    try:
        info = await nc.jetstream().account_info()  # JetStream is up, not only the listener
        assert info.limits is not None
        await nc.flush(timeout=5)
    finally:
        await nc.close()


def test_port_0_reports_the_free_ports_the_server_chose(server):
    client_port = int(server.url.rsplit(":", 1)[1])
    monitor_port = int(server.monitor_url.rsplit(":", 1)[1])
    assert client_port > 0 and monitor_port > 0 and client_port != 4222
    v = varz(server.monitor_url)  # answered on the reported monitoring port
    assert v["port"] == client_port  # the server's own word on where clients connect
    with socket.create_connection(("127.0.0.1", client_port), timeout=5) as sock:
        assert sock.recv(4096).startswith(b"INFO ")


def test_a_given_port_is_used_and_the_ports_file_is_left_to_the_server_then_removed(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = tmp_path / "nats-server.log"
    with EmbeddedServer(tmp_path / "store", port=port, http_port=None, config=None, log_path=log) as s:
        assert s.url == f"nats://127.0.0.1:{port}"
        assert s.monitor_url is None  # no monitoring asked for, none reported
        ports_dir = Path(s._ports_dir)
        assert [p.name for p in ports_dir.iterdir()] == [f"nats-server_{s.pid}.ports"]
    assert not ports_dir.exists()
    text = log.read_text()
    assert "Server Exiting" in text and "ports file" not in text  # the server removed its own file, no error


def test_a_server_that_cannot_start_is_an_error_with_its_log_at_once(tmp_path):
    bad = tmp_path / "bad.conf"
    bad.write_text("this is { not a config\n")
    started = time.monotonic()
    with pytest.raises(ServerError) as e:
        EmbeddedServer(tmp_path / "store", config=bad, log_path=tmp_path / "log").start(timeout=30)
    assert time.monotonic() - started < 10  # the process exited: no waiting out the timeout
    assert "nats-server exited with code 1" in str(e.value) and "Parse error" in str(e.value)
