"""The CLI's connection options reach the connection: real nats-servers that admit only
the right credentials, and a CLI (`chora nats provision --json`, in-process) that gets in
only when the option (or its variable) carries them.

- user and password (``--user``/``--password``, NATS_USER/NATS_PASSWORD);
- a token (``--token``, NATS_TOKEN);
- a .creds file in operator mode (``--creds``, NATS_CREDS): JWT + nkey, made in tests/nats_jwt.py;
- mutual TLS with a throwaway CA (``--tls-ca``/``--tls-cert``/``--tls-key``, and the nats
  CLI's NATS_CA/NATS_CERT/NATS_KEY).

Every server listens on a free port, so ``-s`` (or NATS_URL) is what finds it. A refused
connection exits 69 with the server's or the TLS library's reason.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import pytest
import trustme

from bus.server import EmbeddedServer
from chora import cli
from tests.nats_jwt import operator_setup

EXIT_UNAVAILABLE = 69


def serve(directory: Path, conf_text: str | None = None, conf: Path | None = None) -> EmbeddedServer:
    directory.mkdir(parents=True, exist_ok=True)
    if conf is None:
        conf = directory / "server.conf"
        conf.write_text(conf_text or "")
    return EmbeddedServer(directory / "store", config=conf, http_port=None, log_path=directory / "log").start()


def provision(capsys, *options: str) -> tuple[int, dict | None, str]:
    """`chora nats provision --json OPTIONS...` in-process: (exit code, the JSON document, stderr)."""
    code = cli.main(["nats", "provision", "--json", *options])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if out.strip() else None), err


def provisioned(code: int, doc: dict | None, err: str) -> bool:
    assert code == 0, err
    assert doc is not None and doc["streams"] == ["CHORA_EVENTS", "CHORA_DLQ"], doc
    return True


# ---------------------------------------------------------------------- user and password
@pytest.fixture(scope="module")
def password_server(tmp_path_factory):
    password = "pw-" + secrets.token_hex(8)
    server = serve(
        tmp_path_factory.mktemp("userpass"),
        'authorization { users = [ {user: alice, password: "%s"} ] }\n' % password,
    )
    yield server, password
    server.stop()


def refused(err: str) -> bool:
    """The server refused us: its reason, or (when the server closes the socket before the
    client has read its -ERR: a race of the operating system) the reset that followed it."""
    return "Authorization Violation" in err or "Connection reset by peer" in err


def test_user_and_password_options_and_variables(password_server, clean_cli_env, monkeypatch, capsys):
    server, password = password_server
    code, _, err = provision(capsys, "-s", server.url)
    assert code == EXIT_UNAVAILABLE and refused(err)
    assert provisioned(*provision(capsys, "-s", server.url, "--user", "alice", "--password", password))
    monkeypatch.setenv("NATS_URL", server.url)
    monkeypatch.setenv("NATS_USER", "alice")
    monkeypatch.setenv("NATS_PASSWORD", "wrong")
    assert provision(capsys)[0] == EXIT_UNAVAILABLE
    assert provisioned(*provision(capsys, "--password", password))  # the option beats the variable
    monkeypatch.setenv("NATS_PASSWORD", password)
    assert provisioned(*provision(capsys))


# ---------------------------------------------------------------------- token
@pytest.fixture(scope="module")
def token_server(tmp_path_factory):
    token = "tok-" + secrets.token_hex(12)
    server = serve(tmp_path_factory.mktemp("token"), 'authorization { token: "%s" }\n' % token)
    yield server, token
    server.stop()


def test_token_option_and_variable(token_server, clean_cli_env, monkeypatch, capsys):
    server, token = token_server
    assert provision(capsys, "-s", server.url, "--token", "nope")[0] == EXIT_UNAVAILABLE
    assert provisioned(*provision(capsys, "--server", server.url, "--token", token))
    monkeypatch.setenv("NATS_TOKEN", token)
    assert provisioned(*provision(capsys, "-s", server.url))


# ---------------------------------------------------------------------- creds (operator mode)
@pytest.fixture(scope="module")
def operator_server(tmp_path_factory):
    d = tmp_path_factory.mktemp("operator")
    conf, creds = operator_setup(d)
    server = serve(d, conf=conf)
    yield server, creds
    server.stop()


def test_creds_option_and_variable(operator_server, clean_cli_env, monkeypatch, capsys):
    server, creds = operator_server
    code, _, err = provision(capsys, "-s", server.url)
    assert code == EXIT_UNAVAILABLE and refused(err)
    assert provisioned(*provision(capsys, "-s", server.url, "--creds", str(creds)))
    monkeypatch.setenv("NATS_CREDS", str(creds))
    assert provisioned(*provision(capsys, "-s", server.url))


# ---------------------------------------------------------------------- mutual TLS
@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    """TLS required, and a client certificate signed by the same CA (verify: true)."""
    d = tmp_path_factory.mktemp("mtls")
    ca, stranger = trustme.CA(), trustme.CA()
    files = {n: d / f"{n}.pem" for n in ("ca", "other-ca", "server", "server-key", "client", "client-key")}
    ca.cert_pem.write_to_path(str(files["ca"]))
    stranger.cert_pem.write_to_path(str(files["other-ca"]))
    for name, cert in (("server", ca.issue_cert("127.0.0.1", "localhost")), ("client", ca.issue_cert("chora-cli"))):
        cert.private_key_pem.write_to_path(str(files[f"{name}-key"]))
        for i, blob in enumerate(cert.cert_chain_pems):
            blob.write_to_path(str(files[name]), append=i > 0)
    server = serve(
        d,
        'tls {\n  cert_file: "%s"\n  key_file: "%s"\n  ca_file: "%s"\n  verify: true\n  timeout: 2\n}\n'
        % (files["server"], files["server-key"], files["ca"]),
    )
    yield server, files
    server.stop()


def test_tls_options_and_the_nats_cli_variables(tls_server, clean_cli_env, monkeypatch, capsys):
    server, f = tls_server
    mtls = ["--tls-cert", str(f["client"]), "--tls-key", str(f["client-key"])]
    assert provisioned(*provision(capsys, "-s", server.url, "--tls-ca", str(f["ca"]), *mtls))
    # the wrong CA: this client refuses the server
    code, _, err = provision(capsys, "-s", server.url, "--tls-ca", str(f["other-ca"]), *mtls)
    assert code == EXIT_UNAVAILABLE and "CERTIFICATE_VERIFY_FAILED" in err
    # no client certificate: the server refuses this client
    code, _, err = provision(capsys, "-s", server.url, "--tls-ca", str(f["ca"]))
    assert code == EXIT_UNAVAILABLE and "cannot connect to NATS" in err
    # the nats CLI's variable names carry the same
    monkeypatch.setenv("NATS_URL", server.url)
    monkeypatch.setenv("NATS_CA", str(f["ca"]))
    monkeypatch.setenv("NATS_CERT", str(f["client"]))
    monkeypatch.setenv("NATS_KEY", str(f["client-key"]))
    assert provisioned(*provision(capsys))
