"""The `chora` command."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from typing import Any

from chora.commands import assembly, cache, completion, configs, dlq, doctor, events, instances, mcp, runs
from chora.common import (
    EXIT_CODES,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_INVALID,
    EXIT_TIMEOUT,
    EXIT_USAGE,
    Exit,
    Link,
    close_cli,
    connect_cli,
    load_settings,
    parse_context,
    print_json,
    request_and_wait,
    trace_id_or_exit,
)
from chora.options import add_command, connection_parser
from services import eventloop

# Modules with register(subparsers): see chora/commands/__init__.py.
COMMAND_MODULES = [configs, dlq, assembly, runs, events, cache, doctor, mcp, instances]


# ---------------------------------------------------------------------- generate
async def generate(args: argparse.Namespace) -> int:
    from contracts.catalogue import CONTENT_GENERATED, CONTENT_VALIDATED, GENERATION_REQUESTED
    from contracts.envelope import new_event
    from contracts.events import GenerationRequested

    settings = load_settings(args)
    trace_id = trace_id_or_exit(args, settings)
    request = new_event(
        GENERATION_REQUESTED,
        GenerationRequested(
            content_config_id=args.config_id, context=parse_context(args.context), no_cache=args.no_cache
        ),
        source="chora://cli",
        trace_id=trace_id,
    )
    allow_invalid = args.allow_invalid

    def done(got: dict[str, Any]) -> bool:
        gen = got.get(CONTENT_GENERATED)
        return gen is not None and (allow_invalid or gen.data.status != "success" or CONTENT_VALIDATED in got)

    link = Link()
    nc = await connect_cli(settings, link)
    try:
        got = await request_and_wait(
            nc, settings, link, request, [CONTENT_GENERATED, CONTENT_VALIDATED], args.timeout, done
        )
    finally:
        await close_cli(nc, link)
    ev, verdict = got.get(CONTENT_GENERATED), got.get(CONTENT_VALIDATED)
    code = _generate_outcome(args, request, ev, verdict)
    if args.json:
        outcome = {0: "success", EXIT_FAILED: "error", EXIT_INVALID: "invalid", EXIT_TIMEOUT: "timeout"}[code]
        print_json(
            {
                "request_id": request.id,
                "trace_id": ev.traceid if ev is not None else request.traceid,
                "outcome": outcome,
                "content": ev.data.content if ev is not None else None,
                "content_generated": ev.data if ev is not None else None,
                "content_validated": verdict.data if verdict is not None else None,
            }
        )
    elif code == 0 and ev is not None:
        content = ev.data.content or ""
        sys.stdout.write(content)
        if content and not content.endswith("\n"):
            sys.stdout.write("\n")
    return code


def _generate_outcome(args: argparse.Namespace, request, ev, verdict) -> int:
    """The exit code of `chora generate`, with what it means said on stderr."""
    if ev is None:
        print(
            f"chora: no outcome for request {request.id} within {args.timeout}s "
            "(is the generator running? the request stays queued)",
            file=sys.stderr,
        )
        return EXIT_TIMEOUT
    data = ev.data
    print(f"trace_id={ev.traceid} request_id={request.id}", file=sys.stderr)
    if data.status != "success":
        print(f"chora: generation failed: {data.error.code}: {data.error.message}", file=sys.stderr)
        return EXIT_FAILED
    if not args.allow_invalid and verdict is None:
        print(
            f"chora: the content was generated but no validation verdict came within {args.timeout}s "
            "(is the validator running?); --allow-invalid prints it without waiting for one",
            file=sys.stderr,
        )
        return EXIT_TIMEOUT
    if verdict is not None and verdict.data.issues:
        for i in verdict.data.issues:
            print(f"chora: {i.severity}: {i.rule}: {i.message}", file=sys.stderr)
    if verdict is not None and not verdict.data.valid and not args.allow_invalid:
        print(
            f"chora: the validator marked the content of {data.content_config_id} invalid; not printed "
            "(--allow-invalid prints it anyway)",
            file=sys.stderr,
        )
        return EXIT_INVALID
    return 0


# ---------------------------------------------------------------------- nats / services
async def nats_provision(args: argparse.Namespace) -> int:
    from bus.topology import ProvisionError, Topology, provision, unread_consumers
    from services.notifier.config import NotifierConfigError, load_config
    from services.notifier.service import subscription_consumers

    settings = load_settings(args)
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
            unread = unread_consumers(settings.callback_allow)
            await provision(nc.jetstream(), topo, extra=extra, retire=unread)
        except ProvisionError as e:
            print(f"chora: {e}", file=sys.stderr)
            return EXIT_FAILED
        consumers = [*(c for c in topo.consumers if c not in unread), *(spec.durable for spec in extra)]
        if args.json:
            print_json(
                {"streams": [topo.events_stream, topo.dlq_stream], "consumers": consumers, "replicas": topo.replicas}
            )
        else:
            print(f"provisioned streams {topo.events_stream}, {topo.dlq_stream} and consumers {', '.join(consumers)}")
    finally:
        await nc.close()
    return 0


def service_run(args: argparse.Namespace) -> int:
    from services.runtime import ServiceStartError, run_service

    try:
        asyncio.run(run_service(args.name, load_settings(args)))
    except ServiceStartError as e:
        print(f"chora: {e}", file=sys.stderr)
        return EXIT_FAILED
    return 0


def up(args: argparse.Namespace) -> int:
    from chora.up import up as run_up

    asyncio.run(run_up(load_settings(args)))
    return 0


def schemas(args: argparse.Namespace) -> int:
    from contracts import schemas as sch

    written = [str(p) for p in sch.write()]
    if args.json:
        print_json({"written": written})
    else:
        for p in written:
            print(p)
    return 0


def asyncapi(args: argparse.Namespace) -> int:
    from contracts import asyncapi as aa

    if args.write:
        print(aa.write())
    else:
        sys.stdout.write(aa.generate(args.prefix))
    return 0


def openapi(args: argparse.Namespace) -> int:
    from services.gateway import openapi as oa

    written = str(oa.write())
    if args.json:
        print_json({"written": [written]})
    else:
        print(written)
    return 0


# ---------------------------------------------------------------------- main
def version() -> str:
    """``chora <version> (nats-server <version>)``; the server's version from its binary."""
    import subprocess
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    from bus.server import ServerError, server_binary

    try:
        mine = package_version("chora-compose")
    except PackageNotFoundError:
        mine = "unknown"
    try:
        out = subprocess.run([server_binary(), "--version"], capture_output=True, text=True, timeout=5).stdout
        server = out.strip().removeprefix("nats-server: ") or "unknown"
    except (ServerError, OSError, subprocess.SubprocessError):
        server = "not found"
    return f"chora {mine} (nats-server {server})"


class _Version(argparse.Action):
    """--version: computed only when asked (it runs the nats-server binary)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings=option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version())
        parser.exit()


def epilog() -> str:
    codes = "\n".join(f"  {code:>3}  {what}" for code, what in EXIT_CODES)
    return (
        "connection: every command that connects takes -s/--server, --creds, --user/--password, --token,\n"
        "--tls-ca/--tls-cert/--tls-key (also before the command); options beat the environment\n"
        "(NATS_URL, NATS_CREDS, NATS_USER, NATS_PASSWORD, NATS_TOKEN, NATS_CA/NATS_TLS_CA, NATS_CERT/NATS_TLS_CERT,\n"
        "NATS_KEY/NATS_TLS_KEY).\n\nexit codes:\n" + codes
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="chora",
        description="chora-compose: event-driven content generation on NATS",
        epilog=epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[connection_parser()],
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--version", action=_Version, help="print chora's and nats-server's versions and exit")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sp = add_command(
        sub, "up", connects=True, help="run the whole stack (embedded nats-server unless a server is given)"
    )
    sp.set_defaults(func=up)

    sp = add_command(sub, "generate", connects=True, json=True, help="request content and print it")
    sp.add_argument("config_id")
    sp.add_argument("--context", help="JSON object, or @file with one")
    sp.add_argument("--trace-id")
    sp.add_argument("--timeout", type=float, default=30.0)
    sp.add_argument(
        "--allow-invalid",
        action="store_true",
        help="print the content even if the validator marks it invalid (and do not wait for its verdict); exit 0",
    )
    sp.add_argument("--no-cache", action="store_true", help="render afresh, not from the result cache")
    sp.set_defaults(func=lambda a: asyncio.run(generate(a)))

    nt = sub.add_parser("nats", help="NATS administration").add_subparsers(dest="nats_cmd", required=True)
    sp = add_command(nt, "provision", connects=True, json=True, help="create or update streams and consumers")
    sp.add_argument("--replicas", type=int, default=None, help="stream replicas (default CHORA_REPLICAS, 1)")
    sp.set_defaults(func=lambda a: asyncio.run(nats_provision(a)))

    sv = sub.add_parser("service", help="run one service").add_subparsers(dest="service_cmd", required=True)
    sp = add_command(sv, "run", connects=True)
    sp.add_argument("name")
    sp.set_defaults(func=service_run)

    ct = sub.add_parser("contracts", help="event contracts").add_subparsers(dest="contracts_cmd", required=True)
    sp = add_command(ct, "schemas", json=True, help="regenerate contracts/schemas from the Structs")
    sp.set_defaults(func=schemas)
    sp = ct.add_parser("asyncapi", help="print the AsyncAPI 3.0 document of the events (JSON)")
    sp.add_argument("--prefix", default="chora", help="subject prefix of the channels' addresses (default chora)")
    sp.add_argument("--write", action="store_true", help="rewrite contracts/asyncapi.json instead (default prefix)")
    sp.set_defaults(func=asyncapi)
    sp = add_command(
        ct, "openapi", json=True, help="regenerate contracts/openapi/gateway.json from the gateway's models"
    )
    sp.set_defaults(func=openapi)

    for module in COMMAND_MODULES:
        module.register(sub)
    completion.register(sub, root=p)  # last: the script covers every command above
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("nats").setLevel(logging.WARNING)
    # httpx logs every request at INFO: one line per webhook POST and per upstream API call
    for name in ("httpx", "httpx2"):
        logging.getLogger(name).setLevel(logging.WARNING)
    eventloop.install()  # every asyncio.run of a command (services included) on uvloop where available
    try:
        code = args.func(args) or 0
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's final flush
        return code
    except Exit as e:
        print(e.message, file=sys.stderr)
        return int(e.code or 0)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`chora ... | head`): stop quietly, as a Unix tool does. Point
        # stdout at /dev/null so that the interpreter's last flush at exit cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
