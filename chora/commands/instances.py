"""`chora services`: the live service instances, found by NATS discovery ($SRV).

It asks ``$SRV.PING``, ``$SRV.INFO`` and ``$SRV.STATS`` at once, gathers the
replies for ``--wait`` seconds (0.5 by default: nobody knows how many instances
will answer), then asks each instance's health endpoint (see bus.discovery).
Only instances of this deployment's subject prefix (``CHORA_PREFIX``) are listed,
unless ``--all-prefixes``.

A table by default; ``--json`` prints one JSON document for machines, whose
shape is stable (fields are only ever added)::

    {"instances": [
        {"service": "generator", "name": "chora-generator", "id": "<micro id>",
         "instance": "<host>:<pid>", "version": "0.1.0", "prefix": "chora",
         "started": "2026-01-01T00:00:00.000Z", "metrics_url": "http://...:9465/metrics",
         "ready": true, "status": "ready", "reason": null,
         "endpoints": {"info": "<subject>", "health": "<subject>", "stats": "<subject>"},
         "stats": {"<durable>": {"acked": 0, "naked": 0, "dead": 0, "published": 0, "pulls": 0}}}
    ]}

``ready`` is null (and ``status`` "unknown") when an instance answered PING but not
its health endpoint in time. Exit 0 when at least one instance answered, 3 when none
did (nothing found), 1 when NATS cannot be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

EXIT_OK, EXIT_NONE = 0, 3


def register(subparsers: Any) -> None:
    from chora.options import add_command

    p = add_command(
        subparsers,
        "services",
        connects=True,
        json=True,
        help="list the live service instances (NATS $SRV discovery); exit 3 if none answer",
    )
    p.add_argument("--wait", type=float, default=0.5, help="seconds to gather replies (default 0.5)")
    p.add_argument("--all-prefixes", action="store_true", help="also instances of other subject prefixes")
    p.set_defaults(func=lambda a: asyncio.run(services(a)))


def as_json(inst: Any) -> dict[str, Any]:
    health = inst.health
    return {
        "service": inst.service,
        "name": inst.name,
        "id": inst.id,
        "instance": inst.metadata.get("instance"),
        "version": inst.version,
        "prefix": inst.metadata.get("prefix"),
        "started": inst.started,
        "metrics_url": inst.metadata.get("metrics_url") or None,
        "ready": None if health is None else bool(health.get("ready")),
        "status": "unknown" if health is None else health.get("status"),
        "reason": None if health is None else health.get("reason"),
        "endpoints": {str(e.get("name")): e.get("subject") for e in inst.endpoints},
        "stats": inst.stats,
    }


def table(rows: list[dict[str, Any]]) -> str:
    head = ("SERVICE", "INSTANCE", "VERSION", "STATUS", "ACKED", "METRICS")
    lines = [head]
    for r in rows:
        acked = sum(int(s.get("acked", 0)) for s in r["stats"].values() if isinstance(s, dict))
        status = r["status"] + (f" ({r['reason']})" if r["reason"] and r["reason"] != r["status"] else "")
        lines.append(
            (r["service"], r["instance"] or r["id"], r["version"], status, str(acked), r["metrics_url"] or "-")
        )
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


async def services(args: argparse.Namespace) -> int:
    from bus.discovery import discover
    from chora.common import connect_cli, load_settings

    settings = load_settings(args)
    nc = await connect_cli(settings)
    try:
        found = await discover(nc, window=max(0.05, args.wait), prefix=None if args.all_prefixes else settings.prefix)
    finally:
        await nc.close()
    rows = [as_json(i) for i in found]
    if args.json:
        print(json.dumps({"instances": rows}, indent=2))
    elif rows:
        print(table(rows))
    if not rows:
        print(
            f"chora: no service instance answered within {args.wait}s (prefix {settings.prefix!r}); "
            "is the stack running? (`chora up`, or the services with this NATS_URL)",
            file=sys.stderr,
        )
        return EXIT_NONE
    return EXIT_OK
