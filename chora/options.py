"""The options `chora` commands share, registered in one place.

A command that connects to NATS gets the nats CLI's connection options; a command that
prints results gets ``--json``. A new command asks for them when it is added::

    from chora.options import add_command

    sp = add_command(sub, "services", connects=True, json=True, help="...")
    sp.set_defaults(func=...)

(in a chora/commands module's ``register(sub)``, listed in chora.cli.COMMAND_MODULES, and
a row in tests/unit/test_cli_options.py COMMANDS, which checks every command has what it
should) and reads them through :func:`chora.common.load_settings` (``load_settings(args)``:
the options over the environment; ``run_connected(run, args)`` for a connection) and
``args.json`` (:func:`chora.common.print_json` writes the document). The connection options are accepted
before the command too (``chora -s nats://h:4222 dlq list``), as the nats CLI accepts its
flags anywhere; the one given last wins.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pydantic import SecretStr

# (flags, field of bus.settings.NatsSettings, metavar, help); the help names the variables
# that are read when the option is not given.
CONNECTION_OPTIONS: list[tuple[tuple[str, ...], str, str, str]] = [
    (("-s", "--server"), "url", "URL", "NATS server URL(s), comma-separated (NATS_URL)"),
    (("--creds",), "creds", "FILE", "user credentials file: JWT and nkey seed (NATS_CREDS)"),
    (("--user",), "user", "USER", "user name (NATS_USER)"),
    (("--password",), "password", "PASSWORD", "password (NATS_PASSWORD; the variable keeps it out of `ps`)"),
    (("--token",), "token", "TOKEN", "authentication token (NATS_TOKEN)"),
    (("--tls-ca", "--tlsca"), "tls_ca", "FILE", "CA certificate to trust the server by (NATS_CA, NATS_TLS_CA)"),
    (("--tls-cert", "--tlscert"), "tls_cert", "FILE", "client certificate for mutual TLS (NATS_CERT, NATS_TLS_CERT)"),
    (("--tls-key", "--tlskey"), "tls_key", "FILE", "client certificate's key (NATS_KEY, NATS_TLS_KEY)"),
    (("--inbox-prefix",), "inbox_prefix", "PREFIX", "reply subject prefix (NATS_INBOX_PREFIX)"),
]
_PATHS = {"creds", "tls_ca", "tls_cert", "tls_key"}
_SECRETS = {"password", "token"}
_DEST = "nats_"  # argparse dest prefix: nats_url, nats_creds, ... (no clash with a command's own options)


def connection_parser() -> argparse.ArgumentParser:
    """A parent parser with the connection options. Their default is SUPPRESS: an option not
    given leaves no attribute, so the environment (or the same option given before the
    command) is not overwritten."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("connection (options beat the environment)")
    for flags, field, metavar, help_ in CONNECTION_OPTIONS:
        g.add_argument(
            *flags,
            dest=_DEST + field,
            metavar=metavar,
            type=Path if field in _PATHS else str,
            default=argparse.SUPPRESS,
            help=help_,
        )
    return p


def json_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(
        "--json",
        action="store_true",
        help="results as JSON on stdout: one document (JSON lines for listings and streams)",
    )
    return p


def add_command(sub: Any, name: str, *, connects: bool = False, json: bool = False, **kwargs: Any):
    """``sub.add_parser(name, **kwargs)`` with the connection options if the command
    ``connects`` and ``--json`` if it prints results (``json``)."""
    parents = [connection_parser()] if connects else []
    if json:
        parents.append(json_parser())
    return sub.add_parser(name, parents=parents, **kwargs)


def connection_overrides(args: argparse.Namespace | None) -> dict[str, Any]:
    """The NatsSettings fields given on the command line, typed as the settings hold them."""
    if args is None:
        return {}
    out: dict[str, Any] = {}
    for _flags, field, _metavar, _help in CONNECTION_OPTIONS:
        if hasattr(args, _DEST + field):
            value = getattr(args, _DEST + field)
            out[field] = SecretStr(value) if field in _SECRETS else value
    return out
