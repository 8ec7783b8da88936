"""What the `chora` commands share: settings, exit codes, the connection, request and wait."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from pydantic import ValidationError

from services.settings import Settings

EXIT_FAILED, EXIT_TIMEOUT, EXIT_USAGE = 1, 2, 64


def load_settings() -> Settings:
    try:
        return Settings()
    except ValidationError as e:
        raise SystemExit(f"chora: bad settings in the environment:\n{e}") from None


def trace_id_or_exit(args: argparse.Namespace, settings: Settings) -> str | None:
    """--trace-id, else CHORA_TRACE_ID, checked; a bad one ends the command with a usage error."""
    from contracts.tracing import valid_trace_id

    trace_id = getattr(args, "trace_id", None) or settings.trace_id
    if trace_id and not valid_trace_id(trace_id):
        print("chora: --trace-id must be 1-128 characters of [A-Za-z0-9._:-]", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)
    return trace_id


def parse_context(arg: str | None) -> dict:
    if not arg:
        return {}
    text = arg
    if arg.startswith("@"):
        try:
            text = Path(arg[1:]).read_text()
        except OSError as e:
            raise SystemExit(f"chora: cannot read context file {arg[1:]}: {e.strerror}") from None

    def no_constants(name: str):
        raise ValueError(f"{name} is not valid JSON")

    try:
        ctx = json.loads(text, parse_constant=no_constants)
    except (json.JSONDecodeError, ValueError) as e:
        raise SystemExit(f"chora: --context is not valid JSON: {e}") from None
    if not isinstance(ctx, dict):
        raise SystemExit("chora: --context must be a JSON object")
    return ctx


async def connect_cli(settings: Settings):
    """A connection for a CLI command: NATS_URL, else the running `chora up`, else localhost."""
    from bus.connection import connect
    from chora.up import stack_url

    url = stack_url(settings)
    if url is None:
        url = "nats://127.0.0.1:4222"
    try:
        return await connect(
            settings.nats.model_copy(update={"max_reconnect_attempts": 3}),
            url,
            name="chora-cli",
            inbox_prefix=settings.nats.inbox_prefix,
        )
    except Exception as e:
        raise SystemExit(
            f"chora: cannot connect to NATS at {url} ({e}). Start the stack with `make up` (or `chora up`), "
            "or set NATS_URL."
        ) from None


async def request_and_wait(nc, settings: Settings, request, outcome_type: str, timeout: float):
    """Publish ``request`` and return the ``outcome_type`` event whose ``request_id`` is its id,
    or None after ``timeout``. The subscription is made before the publish, so the outcome
    cannot slip past; a request that cannot be stored exits with a message."""
    from bus.publisher import Publisher
    from contracts.catalogue import subject_for
    from contracts.envelope import EnvelopeError, decode

    outcome: asyncio.Future = asyncio.get_running_loop().create_future()

    async def on_result(msg) -> None:
        try:
            ev = decode(msg.headers, msg.data, max_bytes=settings.max_event_bytes)
        except EnvelopeError:
            return
        if getattr(ev.data, "request_id", None) == request.id and not outcome.done():
            outcome.set_result(ev)

    sub = await nc.subscribe(subject_for(outcome_type, settings.prefix), cb=on_result)
    try:
        try:
            await Publisher(nc.jetstream(), settings.prefix, max_bytes=settings.max_event_bytes).publish(request)
        except Exception as e:
            print(f"chora: could not publish the request: {e}", file=sys.stderr)
            raise SystemExit(EXIT_FAILED) from None
        try:
            return await asyncio.wait_for(outcome, timeout)
        except asyncio.TimeoutError:
            return None
    finally:
        await sub.unsubscribe()
