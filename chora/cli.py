"""The `chora` command."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import sys
from pathlib import Path

from pydantic import ValidationError

from chora.settings import Settings

EXIT_FAILED, EXIT_TIMEOUT, EXIT_USAGE = 1, 2, 64


# Modules with register(subparsers): see chora/commands/__init__.py.
COMMAND_MODULES: list[str] = ["chora.commands.configs", "chora.commands.dlq", "chora.commands.assembly", "chora.commands.events"]


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


# ---------------------------------------------------------------------- generate
async def generate(args: argparse.Namespace) -> int:
    from contracts.catalogue import CONTENT_GENERATED, GENERATION_REQUESTED
    from contracts.envelope import new_event
    from contracts.events import GenerationRequested

    settings = load_settings()
    trace_id = trace_id_or_exit(args, settings)
    request = new_event(
        GENERATION_REQUESTED,
        GenerationRequested(content_config_id=args.config_id, context=parse_context(args.context)),
        source="chora://cli",
        trace_id=trace_id,
    )
    nc = await connect_cli(settings)
    try:
        ev = await request_and_wait(nc, settings, request, CONTENT_GENERATED, args.timeout)
        if ev is None:
            print(
                f"chora: no outcome for request {request.id} within {args.timeout}s "
                "(is the generator running? the request stays queued)",
                file=sys.stderr,
            )
            return EXIT_TIMEOUT
    finally:
        await nc.close()
    data = ev.data
    print(f"trace_id={ev.traceid} request_id={request.id}", file=sys.stderr)
    if data.status != "success":
        print(f"chora: generation failed: {data.error.code}: {data.error.message}", file=sys.stderr)
        return EXIT_FAILED
    sys.stdout.write(data.content or "")
    if data.content and not data.content.endswith("\n"):
        sys.stdout.write("\n")
    return 0


# ---------------------------------------------------------------------- nats / services
async def nats_provision(args: argparse.Namespace) -> int:
    from bus.topology import ProvisionError, Topology, provision
    from services.notifier.config import NotifierConfigError, load_config
    from services.notifier.service import subscription_consumers

    settings = load_settings()
    topo = Topology.from_settings(settings, replicas=args.replicas)
    extra = []
    if settings.notifier_config:  # the webhook subscriptions' durables too (secrets are not needed)
        try:
            extra = subscription_consumers(load_config(settings.notifier_config), topo)
        except NotifierConfigError as e:
            print(f"chora: {e}", file=sys.stderr)
            return EXIT_USAGE
    nc = await connect_cli(settings)
    try:
        try:
            await provision(nc.jetstream(), topo, extra=extra)
        except ProvisionError as e:
            print(f"chora: {e}", file=sys.stderr)
            return EXIT_FAILED
        consumers = [*topo.consumers, *(spec.durable for spec in extra)]
        print(f"provisioned streams {topo.events_stream}, {topo.dlq_stream} and consumers {', '.join(consumers)}")
    finally:
        await nc.close()
    return 0


def service_run(args: argparse.Namespace) -> int:
    from services.runtime import ServiceStartError, run_service

    try:
        asyncio.run(run_service(args.name, load_settings()))
    except ServiceStartError as e:
        print(f"chora: {e}", file=sys.stderr)
        return EXIT_FAILED
    return 0


def up(args: argparse.Namespace) -> int:
    from chora.up import up as run_up

    asyncio.run(run_up(load_settings()))
    return 0


def schemas(args: argparse.Namespace) -> int:
    from contracts import schemas as sch

    for p in sch.write():
        print(p)
    return 0


# ---------------------------------------------------------------------- main
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="chora", description="chora-compose: event-driven content generation on NATS")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    sp = sub.add_parser("up", help="run the whole stack (embedded nats-server unless NATS_URL is set)")
    sp.set_defaults(func=up)

    sp = sub.add_parser("generate", help="request content and print it")
    sp.add_argument("config_id")
    sp.add_argument("--context", help="JSON object, or @file with one")
    sp.add_argument("--trace-id")
    sp.add_argument("--timeout", type=float, default=30.0)
    sp.set_defaults(func=lambda a: asyncio.run(generate(a)))

    nt = sub.add_parser("nats", help="NATS administration").add_subparsers(dest="nats_cmd", required=True)
    sp = nt.add_parser("provision", help="create or update streams and consumers on NATS_URL")
    sp.add_argument("--replicas", type=int, default=None, help="stream replicas (default CHORA_REPLICAS, 1)")
    sp.set_defaults(func=lambda a: asyncio.run(nats_provision(a)))

    sv = sub.add_parser("service", help="run one service").add_subparsers(dest="service_cmd", required=True)
    sp = sv.add_parser("run")
    sp.add_argument("name")
    sp.set_defaults(func=service_run)

    ct = sub.add_parser("contracts", help="event contracts").add_subparsers(dest="contracts_cmd", required=True)
    sp = ct.add_parser("schemas", help="regenerate contracts/schemas from the Structs")
    sp.set_defaults(func=schemas)

    for module in COMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("nats").setLevel(logging.WARNING)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
