"""What the `chora` commands share: settings, exit codes, the connection, request and wait."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any, Awaitable, Callable

from pydantic import ValidationError

from services.settings import Settings

# Exit codes of every command (the CLI's epilog and docs/operations.md, "Exit codes"). 2 is left
# to argparse: a command line it cannot parse.
EXIT_FAILED = 1  # the outcome is an error (generation, assembly, a batch with failed items, ...)
EXIT_INVALID = 3  # `chora generate`: the validator marked the content invalid (unless --allow-invalid)
EXIT_NOT_FOUND = 3  # batch/artifact commands: no such run, or its results expired (same code: "nothing there")
EXIT_USAGE = 64  # an option value that parses but cannot be used (a bad --trace-id, --context, ...)
EXIT_UNAVAILABLE = 69  # NATS cannot be reached: refused, timed out, TLS handshake or authentication failed
EXIT_TIMEOUT = 75  # no outcome within --timeout: the request stays queued; try again later
EXIT_CONFIG = 78  # a bad setting in the environment (CHORA_*, NATS_*)
EXIT_INTERRUPTED = 130  # Ctrl-C

EXIT_CODES = [
    (0, "done"),
    (EXIT_FAILED, "failed: an error outcome, an invalid config, a batch with failed items, a closed output pipe"),
    (2, "the command line does not parse"),
    (
        EXIT_INVALID,
        "generate: the validator marked the content invalid; cancel, status, results: no such run (or expired)",
    ),
    (EXIT_USAGE, "an option value that parses but cannot be used (--context, --trace-id, ...)"),
    (EXIT_UNAVAILABLE, "NATS cannot be reached (refused, timed out, TLS or authentication failed)"),
    (EXIT_TIMEOUT, "no outcome within --timeout (the request stays queued: try again later)"),
    (EXIT_CONFIG, "a bad setting in the environment"),
    (EXIT_INTERRUPTED, "interrupted (Ctrl-C)"),
]


class Exit(SystemExit):
    """Ends a command with exit ``code`` after ``message`` on stderr (:func:`chora.cli.main`
    prints it; ``str()`` of the exception is the message)."""

    def __init__(self, code: int, message: str):
        super().__init__(code)
        self.message = message

    def __str__(self) -> str:
        return self.message


def load_settings(args: argparse.Namespace | None = None) -> Settings:
    """The settings from the environment, with the connection options of ``args`` over them."""
    from chora.options import connection_overrides

    try:
        settings = Settings()
    except ValidationError as e:
        raise Exit(EXIT_CONFIG, f"chora: bad settings in the environment:\n{e}") from None
    overrides = connection_overrides(args)
    if overrides:
        settings = settings.model_copy(update={"nats": settings.nats.model_copy(update=overrides)})
    return settings


def print_json(doc: Any) -> None:
    """``doc`` as one line of JSON on stdout (``--json``). Event payloads (msgspec Structs) are
    written as they travel: their fields as in contracts/schemas, defaults left out."""
    import msgspec

    sys.stdout.write(msgspec.json.encode(doc).decode() + "\n")


def trace_id_or_exit(args: argparse.Namespace, settings: Settings) -> str | None:
    """--trace-id, else CHORA_TRACE_ID, checked; a bad one ends the command with a usage error."""
    from contracts.tracing import valid_trace_id

    trace_id = getattr(args, "trace_id", None) or settings.trace_id
    if trace_id and not valid_trace_id(trace_id):
        raise Exit(EXIT_USAGE, "chora: --trace-id must be 1-128 characters of [A-Za-z0-9._:-]")
    return trace_id


def parse_context(arg: str | None) -> dict:
    """--context: a JSON object, or @file with one; anything else ends the command with a usage error."""
    if not arg:
        return {}
    text = arg
    if arg.startswith("@"):
        try:
            text = Path(arg[1:]).read_text()
        except OSError as e:
            raise Exit(EXIT_USAGE, f"chora: cannot read context file {arg[1:]}: {e.strerror}") from None

    def no_constants(name: str):
        raise ValueError(f"{name} is not valid JSON")

    try:
        ctx = json.loads(text, parse_constant=no_constants)
    except (json.JSONDecodeError, ValueError) as e:
        raise Exit(EXIT_USAGE, f"chora: --context is not valid JSON: {e}") from None
    if not isinstance(ctx, dict):
        raise Exit(EXIT_USAGE, "chora: --context must be a JSON object")
    return ctx


class Link:
    """The connection of a command that waits: it says on stderr when the connection drops
    and when it is back, and runs ``on_return`` hooks then (e.g. to re-read what was
    published meanwhile). A waiting command reconnects for as long as it waits."""

    def __init__(self) -> None:
        self.closing = False
        self.down = False
        self.on_return: list[Callable[[], Awaitable[None]]] = []

    async def disconnected(self) -> None:
        if self.closing or self.down:
            return
        self.down = True
        print("chora: lost the connection to NATS; reconnecting (still waiting)", file=sys.stderr, flush=True)

    async def reconnected(self) -> None:
        self.down = False
        print("chora: reconnected to NATS", file=sys.stderr, flush=True)
        for hook in self.on_return:
            asyncio.ensure_future(hook())


async def connect_cli(settings: Settings, link: Link | None = None):
    """A connection for a CLI command: NATS_URL, else the running `chora up`, else localhost.

    With a ``link`` (commands that wait for an outcome) it reconnects without limit and
    reports drops and returns; without, it gives up after 3 attempts."""
    from bus.connection import connect
    from chora.up import stack_url

    url = stack_url(settings)
    if url is None:
        url = "nats://127.0.0.1:4222"
    try:
        return await connect(
            settings.nats.model_copy(update={"max_reconnect_attempts": -1 if link else 3}),
            url,
            name="chora-cli",
            inbox_prefix=settings.nats.inbox_prefix,
            disconnected=link.disconnected if link else None,
            reconnected=link.reconnected if link else None,
        )
    except Exception as e:
        raise Exit(
            EXIT_UNAVAILABLE,
            f"chora: cannot connect to NATS at {url} ({e}). Start the stack with `make up` (or `chora up`), "
            "or give the server with -s/--server (NATS_URL).",
        ) from None


def run_connected(run, args: argparse.Namespace | None = None) -> int:
    """``run(nc, settings)`` on a connection from the CLI's settings (and ``args``' connection
    options), closed afterwards."""

    async def main() -> int:
        settings = load_settings(args)
        nc = await connect_cli(settings)
        try:
            return await run(nc, settings)
        finally:
            await nc.close()

    return asyncio.run(main())


async def close_cli(nc, link: Link | None = None) -> None:
    if link is not None:
        link.closing = True
    await nc.close()


async def publish_request(nc, settings: Settings, request, what: str = "the request", content=None) -> None:
    """Publish ``request`` to JetStream; a request that cannot be stored ends the command with
    the reason (and, when no stream takes it, the hint to provision one)."""
    from bus.publisher import Publisher

    try:
        await Publisher(nc.jetstream(), settings.prefix, max_bytes=settings.max_event_bytes, content=content).publish(
            request
        )
    except Exception as e:
        hint = ""
        if "no response from stream" in str(e):
            hint = (
                f" No stream takes {settings.prefix}.* subjects on this server: run `chora nats provision` "
                "(with the same NATS_URL and CHORA_PREFIX), or start the services once, which provision it."
            )
        print(f"chora: could not publish {what}: {e}.{hint}", file=sys.stderr)
        raise SystemExit(EXIT_FAILED) from None


async def follow(nc, settings: Settings, link: Link, event_types: list[str], on_event: Callable[[Any], None]):
    """A started :class:`bus.follow.Follower` of ``event_types`` in the events stream, from now on,
    calling ``on_event`` with each decoded event; it re-reads from the stream when ``link`` returns."""
    from bus.follow import Follower
    from contracts.catalogue import subjects_for
    from contracts.envelope import EnvelopeError, decode

    async def on_msg(msg) -> None:
        try:
            ev = decode(msg.headers, msg.data, max_bytes=settings.max_event_bytes)
        except EnvelopeError:
            return
        on_event(ev)

    follower = Follower(
        nc, settings.stream_name, [s for t in event_types for s in subjects_for(t, settings.prefix)], on_msg
    )
    try:
        await follower.start()
    except Exception as e:
        print(
            f"chora: cannot read the events stream {settings.stream_name}: {e}. Run `chora nats provision`, "
            "or start the services once, which provision it.",
            file=sys.stderr,
        )
        raise SystemExit(EXIT_FAILED) from None
    link.on_return.append(lambda: follower.resume(lambda: not link.closing))
    return follower


async def request_and_wait(
    nc,
    settings: Settings,
    link: Link,
    request,
    outcome_types: list[str],
    timeout: float,
    done: Callable[[dict[str, Any]], bool] = bool,
) -> dict[str, Any]:
    """Publish ``request`` and collect, per type in ``outcome_types``, the event whose
    ``request_id`` is its id, until ``done(collected)`` or ``timeout``; returns what was
    collected. The stream is followed from before the publish and re-read after a
    reconnect, so an outcome published while the connection was down is not missed."""
    got: dict[str, Any] = {}
    finished: asyncio.Event = asyncio.Event()

    def on_event(ev) -> None:
        if getattr(ev.data, "request_id", None) == request.id and ev.type not in got:
            got[ev.type] = ev
            if done(got):
                finished.set()

    follower = await follow(nc, settings, link, outcome_types, on_event)
    try:
        await publish_request(nc, settings, request)
        try:
            await asyncio.wait_for(finished.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        return got
    finally:
        await follower.stop()
