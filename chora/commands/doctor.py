"""`chora doctor`: is everything there that the configs need?

For every content config (``CHORA_CONFIGS_DIR``, or PATH): it loads, its
generator is registered, and the generator is ready (its credentials are set:
:class:`services.generator.generators.base.Requirements`). Then the running
stack (unless ``--no-stack``): NATS answers (``NATS_URL``, else the running
`chora up`, else localhost), the streams and buckets are provisioned, and each
service's durable consumer has a live instance pulling from it ("seen"). A
config is ready when its generator is ready and, with the stack checked, NATS
answers, the topology is there and a generator instance is seen.

Credentials are checked in the environment `chora doctor` runs in: run it with
the generator's environment (e.g. ``docker compose run generator doctor``).

One row per config: config, generator, ready, what is missing; ``--json``: the
same for machines. Exit 1 when anything is not ready, else 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_NOT_READY = 0, 1
SERVICES = ("generator", "validator", "assembler", "telemetry")


def register(subparsers: Any) -> None:
    from chora.options import add_command

    p = add_command(
        subparsers,
        "doctor",
        connects=True,
        json=True,
        help="check every config's generator and the running stack; exit 1 if not ready",
    )
    p.add_argument("path", nargs="?", help="a configs directory (default: CHORA_CONFIGS_DIR)")
    p.add_argument("--no-stack", action="store_true", help="check the configs only, not NATS and the services")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for NATS (default 5)")
    p.set_defaults(func=lambda a: asyncio.run(doctor(a)))


@dataclass
class ConfigReport:
    config: str
    generator: str | None
    ready: bool
    missing: list[str] = field(default_factory=list)
    credentials: list[str] = field(default_factory=list)
    endpoints: list[str] = field(default_factory=list)
    concurrent: bool | None = None


@dataclass
class StackReport:
    nats_url: str
    reachable: bool = False
    missing: list[str] = field(default_factory=list)  # streams and buckets not provisioned
    services_seen: list[str] = field(default_factory=list)
    services_missing: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def ready(self) -> bool:
        return self.reachable and not self.missing and not self.services_missing


def check_configs(configs_dir: Path) -> list[ConfigReport]:
    from composition.configs import ConfigError, ConfigStore, GenerationError
    from services.generator.generators import GeneratorRegistry
    from services.generator.generators.base import readiness_of, requirements_of

    store, registry = ConfigStore(configs_dir), GeneratorRegistry()
    reports = []
    for config_id in store.list():
        try:
            config = store.get(config_id)
        except ConfigError as e:
            reports.append(ConfigReport(config_id, None, False, [f"{e.code}: {e.message}"]))
            continue
        try:
            gen = registry.get_generator(config.generator)
        except GenerationError as e:
            reports.append(ConfigReport(config_id, config.generator, False, [f"{e.code}: {e.message}"]))
            continue
        req, ready = requirements_of(gen), readiness_of(gen)
        reports.append(
            ConfigReport(
                config_id,
                config.generator,
                ready.ready,
                list(ready.missing),
                list(req.credentials),
                list(req.endpoints),
                req.concurrent,
            )
        )
    return reports


async def check_stack(settings: Any, timeout: float) -> StackReport:
    from nats.js.errors import NotFoundError

    from bus.connection import connect
    from bus.topology import Topology
    from chora.up import stack_url

    url = stack_url(settings) or "nats://127.0.0.1:4222"
    report = StackReport(nats_url=url)
    logging.getLogger("chora.bus").setLevel(logging.ERROR)  # a refused connection is the report, not a log
    nats_settings = settings.nats.model_copy(update={"max_reconnect_attempts": 0, "connect_timeout": timeout})
    try:
        nc = await asyncio.wait_for(
            connect(nats_settings, url, name="chora-doctor", inbox_prefix=settings.nats.inbox_prefix), timeout + 1
        )
    except asyncio.TimeoutError:
        report.error = f"no connection within {timeout}s"
        return report
    except Exception as e:
        report.error = f"{type(e).__name__}: {e}"
        return report
    report.reachable = True
    try:
        js = nc.jetstream(timeout=timeout)
        topo = Topology.from_settings(settings)
        names = [
            topo.events_stream,
            topo.dlq_stream,
            f"KV_{topo.state_bucket}",
            f"KV_{topo.limits_bucket}",
            f"OBJ_{topo.content_bucket}",
        ]
        for name in names:
            try:
                await js.stream_info(name)
            except NotFoundError:
                report.missing.append(f"stream {name}")
        for service in SERVICES:
            try:
                info = await js.consumer_info(topo.events_stream, service)
            except NotFoundError:
                report.services_missing.append(service)
                continue
            # a live instance keeps pull requests waiting (or is busy with messages)
            live = (info.num_waiting or 0) > 0 or (info.num_ack_pending or 0) > 0
            (report.services_seen if live else report.services_missing).append(service)
    except Exception as e:
        report.error = f"{type(e).__name__}: {e}"
    finally:
        await nc.close()
    return report


def _stack_missing(stack: StackReport) -> list[str]:
    if not stack.reachable:
        return [f"NATS at {stack.nats_url} does not answer"]
    out = [f"{m} not provisioned (chora nats provision)" for m in stack.missing]
    if "generator" not in stack.services_seen:
        out.append("no generator service running")
    return out


async def doctor(args: argparse.Namespace) -> int:
    from chora.common import load_settings

    settings = load_settings(args)
    configs_dir = Path(args.path) if args.path else Path(settings.configs_dir)
    if not configs_dir.is_dir():
        print(f"chora: {configs_dir} is not a directory", file=sys.stderr)
        return EXIT_NOT_READY
    configs = check_configs(configs_dir)
    stack = None if args.no_stack else await check_stack(settings, args.timeout)
    if stack is not None:
        extra = _stack_missing(stack)
        for c in configs:
            if extra:
                c.ready = False
                c.missing.extend(extra)
    ready = all(c.ready for c in configs) and (stack is None or stack.ready)
    if args.json:
        doc: dict[str, Any] = {"ready": ready, "configs_dir": str(configs_dir), "configs": [asdict(c) for c in configs]}
        if stack is not None:
            doc["stack"] = {**asdict(stack), "ready": stack.ready}
        print(json.dumps(doc, indent=2))
        return EXIT_OK if ready else EXIT_NOT_READY
    if stack is not None:
        _print_stack(stack)
    _print_table(configs)
    n_ready = sum(c.ready for c in configs)
    print(f"chora: {len(configs)} configs: {n_ready} ready, {len(configs) - n_ready} not ready", file=sys.stderr)
    return EXIT_OK if ready else EXIT_NOT_READY


def _print_stack(stack: StackReport) -> None:
    if not stack.reachable:
        print(f"NATS      {stack.nats_url}: does not answer ({stack.error})")
        return
    print(f"NATS      {stack.nats_url}: ok")
    print(f"topology  {'ok' if not stack.missing else 'missing ' + ', '.join(stack.missing)}")
    seen = ", ".join(stack.services_seen) or "none"
    line = f"services  seen: {seen}"
    if stack.services_missing:
        line += f"; not running: {', '.join(stack.services_missing)}"
    print(line)
    if stack.error:
        print(f"error     {stack.error}")
    print()


def _print_table(configs: list[ConfigReport]) -> None:
    rows = [("CONFIG", "GENERATOR", "READY", "MISSING")]
    rows += [(c.config, c.generator or "-", "yes" if c.ready else "no", "; ".join(c.missing) or "-") for c in configs]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print("  ".join(f"{r[i]:<{widths[i]}}" for i in range(3)) + "  " + r[3])
