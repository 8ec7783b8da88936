"""Operator-mode NATS credentials for tests: an operator, an account with JetStream and a
user, as the JWTs nats-server checks and the .creds file a client presents (JWT + nkey
seed). What `nsc` makes, written here in a few lines with the ``nkeys`` package."""

from __future__ import annotations

import base64
import json
import os
import secrets
import time
from pathlib import Path

import nkeys


JETSTREAM_UNLIMITED = {"mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def new_key(prefix: int) -> nkeys.KeyPair:
    seed = nkeys.encode_seed(os.urandom(32), prefix)
    return nkeys.from_seed(bytearray(seed))


def jwt(signer: nkeys.KeyPair, subject: nkeys.KeyPair, name: str, nats: dict) -> str:
    header = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    claims = {
        "jti": secrets.token_hex(16).upper(),
        "iat": int(time.time()),
        "iss": signer.public_key.decode(),
        "sub": subject.public_key.decode(),
        "name": name,
        "nats": {**nats, "version": 2},
    }
    payload = _b64(json.dumps(claims).encode())
    return f"{header}.{payload}." + _b64(signer.sign(f"{header}.{payload}".encode()))


def operator_setup(directory: Path) -> tuple[Path, Path]:
    """(a server config in operator mode with one account, the .creds file of a user of it)."""
    operator, account, user = (
        new_key(nkeys.PREFIX_BYTE_OPERATOR),
        new_key(nkeys.PREFIX_BYTE_ACCOUNT),
        new_key(nkeys.PREFIX_BYTE_USER),
    )
    unlimited = {"subs": -1, "data": -1, "payload": -1, "conn": -1, "leaf": -1, "imports": -1, "exports": -1}
    account_jwt = jwt(
        operator,
        account,
        "chora",
        {"type": "account", "limits": {**unlimited, **JETSTREAM_UNLIMITED, "wildcards": True}},
    )
    system = new_key(nkeys.PREFIX_BYTE_ACCOUNT)  # JetStream needs a system account
    system_jwt = jwt(operator, system, "SYS", {"type": "account", "limits": unlimited})
    user_jwt = jwt(account, user, "cli", {"type": "user", "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1})
    conf = directory / "operator.conf"
    conf.write_text(
        f'operator: "{jwt(operator, operator, "test-operator", {"type": "operator"})}"\n'
        f"system_account: {system.public_key.decode()}\n"
        "resolver: MEMORY\n"
        f'resolver_preload: {{\n  {account.public_key.decode()}: "{account_jwt}"\n'
        f'  {system.public_key.decode()}: "{system_jwt}"\n}}\n'
    )
    creds = directory / "cli.creds"
    creds.write_text(
        f"-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n"
        f"-----BEGIN USER NKEY SEED-----\n{user.seed.decode()}\n------END USER NKEY SEED------\n"
    )
    creds.chmod(0o600)
    return conf, creds
