"""The nats CLI's habits on `chora`, without a server: which commands take the connection
options and --json, options over the environment (and the nats CLI's variable names),
--version, shell completion, and the exit codes that need no server (2, 64, 69, 78).
tests/integration/test_cli_connection.py shows the options reaching real servers;
tests/e2e/test_cli_json.py shows every command's --json output."""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from chora import cli
from chora.common import EXIT_CODES, load_settings

# Every leaf command, and whether it connects to NATS / prints results. A command added to
# the CLI without a row here fails test_every_command_is_in_the_table.
COMMANDS = {
    ("up",): (True, False),  # runs the stack: prints a banner, not results
    ("generate",): (True, True),
    ("nats", "provision"): (True, True),
    ("service", "run"): (True, False),  # runs a service until stopped
    ("contracts", "schemas"): (False, True),
    ("contracts", "openapi"): (False, True),
    ("contracts", "asyncapi"): (False, False),  # prints the document, which is JSON already
    ("configs", "validate"): (False, True),
    ("configs", "list"): (False, True),
    ("dlq", "list"): (True, True),
    ("dlq", "replay"): (True, True),
    ("assemble",): (True, True),
    ("batch", "run"): (True, True),
    ("batch", "status"): (True, True),
    ("batch", "cancel"): (True, True),
    ("batch", "results"): (True, True),
    ("artifact", "cancel"): (True, True),
    ("artifact", "status"): (True, True),
    ("events", "tail"): (False, True),
    ("events", "query"): (False, True),
    ("cache", "purge"): (True, True),
    ("doctor",): (True, True),
    ("completion",): (False, False),
    ("mcp",): (True, False),
    ("services",): (True, True),  # serves MCP over stdio until the client closes it  # prints a shell script
}
CONNECTION_FLAGS = {
    "-s",
    "--server",
    "--creds",
    "--user",
    "--password",
    "--token",
    "--tls-ca",
    "--tls-cert",
    "--tls-key",
}


def leaves(p: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, p
        return
    for name, child in subs[0].choices.items():
        yield from leaves(child, path + (name,))


def flags(p: argparse.ArgumentParser) -> set[str]:
    return {s for a in p._actions for s in a.option_strings}


def test_every_command_is_in_the_table():
    assert {path for path, _ in leaves(cli.parser())} == set(COMMANDS)


@pytest.mark.parametrize("path", sorted(COMMANDS))
def test_commands_that_connect_take_the_connection_options_and_those_that_print_take_json(path):
    connects, prints = COMMANDS[path]
    parser = dict(leaves(cli.parser()))[path]
    assert CONNECTION_FLAGS <= flags(parser) if connects else not (CONNECTION_FLAGS & flags(parser))
    assert ("--json" in flags(parser)) == prints


def test_options_beat_the_environment_before_or_after_the_command(clean_cli_env, monkeypatch, tmp_path):
    monkeypatch.setenv("NATS_URL", "nats://env:4222")
    monkeypatch.setenv("NATS_USER", "env-user")
    monkeypatch.setenv("NATS_PASSWORD", "env-password")
    monkeypatch.setenv("NATS_CA", "/env/ca.pem")
    argv = ["dlq", "list", "-s", "nats://opt:4222", "--user", "u", "--password", "p", "--tls-ca", "/opt/ca.pem"]
    s = load_settings(cli.parser().parse_args(argv))
    assert (s.nats.url, s.nats.user, s.nats.password.get_secret_value()) == ("nats://opt:4222", "u", "p")
    assert s.nats.tls_ca == Path("/opt/ca.pem")
    # given before the command, as the nats CLI allows; the one after the command wins
    s = load_settings(cli.parser().parse_args(["--server", "nats://first:1", "--token", "t", "dlq", "list"]))
    assert s.nats.url == "nats://first:1" and s.nats.token.get_secret_value() == "t"
    assert s.nats.user == "env-user"  # not given: the environment's
    s = load_settings(cli.parser().parse_args(["-s", "nats://first:1", "dlq", "list", "-s", "nats://second:2"]))
    assert s.nats.url == "nats://second:2"
    s = load_settings(cli.parser().parse_args(["generate", "x", "--inbox-prefix", "_INBOX.cli", "--creds", "u.creds"]))
    assert (s.nats.inbox_prefix, s.nats.creds) == ("_INBOX.cli", Path("u.creds"))
    # nothing given: every value from the environment
    s = load_settings(cli.parser().parse_args(["dlq", "list"]))
    assert (s.nats.url, s.nats.user, s.nats.tls_ca) == ("nats://env:4222", "env-user", Path("/env/ca.pem"))


def test_the_nats_cli_variable_names_and_the_projects_both_work(clean_cli_env, monkeypatch):
    monkeypatch.setenv("NATS_CA", "/a/ca.pem")
    monkeypatch.setenv("NATS_CERT", "/a/cert.pem")
    monkeypatch.setenv("NATS_KEY", "/a/key.pem")
    monkeypatch.setenv("NATS_CREDS", "/a/user.creds")
    s = load_settings()
    assert (s.nats.tls_ca, s.nats.tls_cert, s.nats.tls_key) == tuple(Path(f"/a/{n}.pem") for n in ("ca", "cert", "key"))
    assert s.nats.creds == Path("/a/user.creds")
    monkeypatch.setenv("NATS_TLS_CA", "/b/ca.pem")  # the project's own name wins when both are set
    monkeypatch.setenv("NATS_TLS_KEY", "/b/key.pem")
    s = load_settings()
    assert (s.nats.tls_ca, s.nats.tls_cert, s.nats.tls_key) == (
        Path("/b/ca.pem"),
        Path("/a/cert.pem"),
        Path("/b/key.pem"),
    )


def test_version_names_the_package_and_the_nats_server_binary(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    server = subprocess.run([sys.executable.rsplit("/", 1)[0] + "/nats-server", "--version"], capture_output=True)
    assert out.startswith(f"chora {version('chora-compose')} (nats-server v")
    assert server.stdout.decode().split()[-1] in out


@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_completion_prints_a_script_naming_the_subcommands_and_options(shell, capsys):
    assert cli.main(["completion", shell]) == 0
    script = capsys.readouterr().out
    assert ("complete" in script) if shell == "bash" else script.startswith("#compdef chora")
    for word in ("generate", "assemble", "provision", "replay", "purge", "doctor", "completion", "--tls-ca", "--json"):
        assert word in script, f"{word} not in the {shell} completion"


def test_exit_codes_are_distinct_and_in_the_epilog():
    codes = [c for c, _ in EXIT_CODES]
    assert len(codes) == len(set(codes)) and {0, 1, 2, 3, 64, 69, 75, 78, 130} == set(codes)
    epilog = cli.parser().epilog or ""
    for code, what in EXIT_CODES:
        assert f"{code:>3}  {what}" in epilog
    docs = (Path(__file__).resolve().parents[2] / "docs" / "operations.md").read_text()
    for code, _ in EXIT_CODES:
        assert f"| {code} |" in docs, f"exit code {code} is not in docs/operations.md"


def test_exit_2_when_the_command_line_does_not_parse(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["generate"])  # the config id is missing
    assert e.value.code == 2 and "config_id" in capsys.readouterr().err


def test_exit_64_when_an_option_value_cannot_be_used(clean_cli_env, capsys):
    assert cli.main(["generate", "hello-world", "--context", "[1, 2]", "-s", "nats://127.0.0.1:9"]) == 64
    assert "--context must be a JSON object" in capsys.readouterr().err
    assert cli.main(["generate", "hello-world", "--trace-id", "no spaces", "-s", "nats://127.0.0.1:9"]) == 64


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_exit_69_when_nats_cannot_be_reached(clean_cli_env, capsys):
    url = f"nats://127.0.0.1:{closed_port()}"
    assert cli.main(["dlq", "list", "-s", url]) == 69
    err = capsys.readouterr().err
    assert f"cannot connect to NATS at {url}" in err and "-s/--server" in err


def test_exit_78_when_a_setting_in_the_environment_is_bad(clean_cli_env, monkeypatch, capsys):
    monkeypatch.setenv("CHORA_PREFIX", "Not A Prefix")
    assert cli.main(["dlq", "list", "-s", "nats://127.0.0.1:9"]) == 78
    assert "bad settings in the environment" in capsys.readouterr().err


def test_configs_json_is_one_document(clean_cli_env, capsys):
    from tests.conftest import example_configs

    assert cli.main(["configs", "list", str(example_configs()), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert {"hello-world", "welcome-email"} <= {c["config"] for c in doc["configs"]}
    hello = next(c for c in doc["configs"] if c["config"] == "hello-world")
    assert hello["generator"] and isinstance(hello["rules"], int) and hello["error"] is None
    assert cli.main(["configs", "validate", str(example_configs()), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["invalid"] == 0 and doc["ok"] == len(doc["configs"]) > 0
    assert {c["status"] for c in doc["configs"]} == {"ok"}


def test_contracts_schemas_json_lists_the_files_written(capsys):
    assert cli.main(["contracts", "schemas", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["written"] and all(p.endswith(".json") and Path(p).is_file() for p in doc["written"])
