"""Discovery on NATS: every service instance is a NATS micro service (the ``$SRV`` protocol).

:func:`register` adds one instance with nats-py's ``nats.micro``: it answers
``$SRV.PING``, ``$SRV.INFO`` and ``$SRV.STATS`` (to all, to its kind
``chora-<service>``, and to its own id), so ``nats micro ls``, the gateway and
``chora services`` see the live instances. It has three endpoints of its own,
one subject each, per instance (never under a stream's subjects)::

    <prefix>.svc.<service>.<id>.info     what the service says of itself (its readiness file's facts)
    <prefix>.svc.<service>.<id>.health   the readiness of /readyz: {"ready": bool, "status", "reason", "checks"}
    <prefix>.svc.<service>.<id>.stats    its consumer loops' counters

The metadata of every instance: ``service``, ``instance`` (host:pid), ``host``,
``pid``, ``prefix`` (the subject prefix: two deployments may share a server)
and ``metrics_url``.

:func:`discover` is the other side: it asks ``$SRV.PING``, ``$SRV.INFO`` and
``$SRV.STATS`` at once, gathers the replies for a short window (nobody knows how
many instances will answer), then asks each instance's health endpoint.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

from nats.aio.client import Client
from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.service import SEMVER_REGEX, Service

log = logging.getLogger("chora.bus")

NAME_PREFIX = "chora-"
ENDPOINTS = ("info", "health", "stats")

Facts = Callable[[], dict[str, Any]]


def service_name(service: str) -> str:
    """The micro service name of a chora service: ``chora-<service>``."""
    return NAME_PREFIX + service


def endpoint_subject(prefix: str, service: str, instance_id: str, endpoint: str) -> str:
    return f"{prefix}.svc.{service}.{instance_id}.{endpoint}"


def _semver(version: str) -> str:
    return version if SEMVER_REGEX.match(version) else "0.0.0"


class Registration:
    """One registered instance; :meth:`stop` unsubscribes it (on drain)."""

    def __init__(self, service: Service, subjects: dict[str, str]):
        self.service = service
        self.subjects = subjects

    @property
    def id(self) -> str:
        return self.service.id

    async def stop(self) -> None:
        try:
            await self.service.stop()
        except Exception as e:  # the connection is gone already: nothing left to unsubscribe
            log.debug("stopping discovery: %s", e)


def _answer(facts: Facts) -> Callable[[Request], Any]:
    async def handler(req: Request) -> None:
        await req.respond(json.dumps(facts(), default=str).encode())

    return handler


async def register(
    nc: Client,
    *,
    service: str,
    version: str,
    prefix: str,
    metadata: dict[str, str],
    info: Facts,
    health: Facts,
    stats: Facts,
    description: str = "",
) -> Registration:
    """Register this process as an instance of ``chora-<service>``; see the module docstring."""
    svc = await add_service(
        nc,
        name=service_name(service),
        version=_semver(version),
        description=description or f"chora-compose {service}",
        metadata={**metadata, "service": service, "prefix": prefix},
        stats_handler=lambda ep: stats() if ep.name == "stats" else None,
    )
    subjects = {}
    for name, facts in (("info", info), ("health", health), ("stats", stats)):
        subjects[name] = endpoint_subject(prefix, service, svc.id, name)
        await svc.add_endpoint(name=name, subject=subjects[name], handler=_answer(facts))
    await nc.flush()
    return Registration(svc, subjects)


# --------------------------------------------------------------------------- discovering


@dataclass
class Instance:
    """One live instance, as its $SRV answers and its health endpoint describe it."""

    id: str
    name: str
    version: str
    metadata: dict[str, str] = field(default_factory=dict)
    endpoints: list[dict[str, Any]] = field(default_factory=list)
    started: str | None = None
    stats: dict[str, Any] = field(default_factory=dict)  # the data of its stats endpoint
    health: dict[str, Any] | None = None  # None: it did not answer in time

    @property
    def service(self) -> str:
        return self.metadata.get("service") or self.name.removeprefix(NAME_PREFIX)


async def _gather(nc: Client, subject: str, window: float) -> list[dict[str, Any]]:
    """Every JSON reply to one request on ``subject`` within ``window`` seconds."""
    inbox = nc.new_inbox()
    replies: list[dict[str, Any]] = []

    async def collect(msg) -> None:
        try:
            doc = json.loads(msg.data)
        except ValueError:
            return
        if isinstance(doc, dict):
            replies.append(doc)

    sub = await nc.subscribe(inbox, cb=collect)
    try:
        await nc.publish(subject, b"", reply=inbox)
        await nc.flush()
        await asyncio.sleep(window)  # a scatter-gather: the window is the protocol, not a wait on state
    finally:
        await sub.unsubscribe()
    return replies


async def _health(nc: Client, subject: str, timeout: float) -> dict[str, Any] | None:
    try:
        msg = await nc.request(subject, b"", timeout=timeout)
        doc = json.loads(msg.data)
    except Exception:  # no answer, or not JSON: unknown health
        return None
    return doc if isinstance(doc, dict) else None


async def discover(nc: Client, *, window: float = 0.5, prefix: str | None = None) -> list[Instance]:
    """The chora instances that answer within ``window`` seconds (only those of ``prefix`` when
    given), sorted by service and instance, each with its INFO, STATS and health."""
    pings, infos, stats = await asyncio.gather(
        _gather(nc, "$SRV.PING", window), _gather(nc, "$SRV.INFO", window), _gather(nc, "$SRV.STATS", window)
    )
    found: dict[str, Instance] = {}
    for p in pings:
        name, iid = str(p.get("name", "")), str(p.get("id", ""))
        if not name.startswith(NAME_PREFIX) or not iid:
            continue
        md = {str(k): str(v) for k, v in (p.get("metadata") or {}).items()}
        if prefix is not None and md.get("prefix") != prefix:
            continue
        found[iid] = Instance(iid, name, str(p.get("version", "")), md)
    for i in infos:
        inst = found.get(str(i.get("id", "")))
        if inst is not None:
            inst.endpoints = [e for e in i.get("endpoints") or [] if isinstance(e, dict)]
    for s in stats:
        inst = found.get(str(s.get("id", "")))
        if inst is None:
            continue
        inst.started = s.get("started")
        for e in s.get("endpoints") or []:
            if isinstance(e, dict) and e.get("name") == "stats" and isinstance(e.get("data"), dict):
                inst.stats = e["data"]

    async def ask(inst: Instance) -> None:
        subject = next((e.get("subject") for e in inst.endpoints if e.get("name") == "health"), None)
        if subject:
            inst.health = await _health(nc, str(subject), max(window, 0.5))

    await asyncio.gather(*(ask(i) for i in found.values()))
    return sorted(found.values(), key=lambda i: (i.service, i.metadata.get("instance", ""), i.id))
