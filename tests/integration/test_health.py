"""/healthz and /readyz of a real service through the states that matter: ready after start,
503 while draining with work still in flight (and the discovery health says so too), 503
while the nats-server is down, 200 again once it is back."""

from __future__ import annotations

import asyncio
import json

import nats

from bus.publisher import Publisher
from bus.topology import Topology, provision
from contracts.catalogue import CONTENT_GENERATED
from contracts.envelope import new_event
from contracts.events import ContentGenerated
from services.runtime import ready_file, run_service
from tests.conftest import get_json, wait_for, write
from tests.webhook import Webhook


class Running:
    """One service run in-process with run_service, its /healthz and /readyz."""

    def __init__(self, name: str, settings):
        self.name, self.settings = name, settings
        self.stop = asyncio.Event()
        self.task = asyncio.create_task(run_service(name, settings, stop=self.stop))
        self.base = ""

    async def started(self) -> "Running":
        def ready() -> bool:
            if self.task.done():
                self.task.result()
            return ready_file(self.settings, self.name).exists()

        await wait_for(ready, 30, f"{self.name} readiness file")
        url = json.loads(ready_file(self.settings, self.name).read_text())["metrics_url"]
        self.base = url.removesuffix("/metrics")
        return self

    async def get(self, path: str) -> tuple[int, dict]:
        return await asyncio.to_thread(get_json, self.base + path)

    async def until(self, path: str, status: int, what: str) -> dict:
        async def reached() -> dict | None:
            code, doc = await self.get(path)
            return doc if code == status else None

        return await wait_for(reached, 20, what)


async def test_readyz_is_200_when_ready_and_503_while_draining_in_flight_work(settings, monkeypatch, tmp_path):
    with Webhook(hold=True) as hook:
        monkeypatch.setenv("HEALTH_HOOK_SECRET", "s3cret")
        cfg = write(
            tmp_path / "notifier.json",
            {
                "subscriptions": [
                    {"name": "slow", "events": [CONTENT_GENERATED], "url": hook.url, "secret_env": "HEALTH_HOOK_SECRET"}
                ]
            },
        )
        svc = await Running("notifier", settings.model_copy(update={"notifier_config": cfg})).started()
        doc = await svc.until("/readyz", 200, "the notifier ready")
        assert doc["checks"]["consumers"]["notify-slow"] == "bound" and doc["checks"]["draining"] is False
        assert (await svc.get("/healthz")) == (200, {"status": "alive"})

        nc = await nats.connect(settings.nats.url)
        try:
            event = new_event(
                CONTENT_GENERATED,
                ContentGenerated(request_id="r1", content_config_id="hello-world", status="success", content="hi"),
                source="t",
            )
            await Publisher(nc.jetstream(), settings.prefix).publish(event)
            await wait_for(lambda: len(hook.received) == 1, 20, "the webhook POST in flight")
            health_subject = f"{settings.prefix}.svc.notifier."

            svc.stop.set()  # SIGTERM's path: drain, with the POST still held by the endpoint
            doc = await svc.until("/readyz", 503, "/readyz 503 while draining")
            assert doc["status"] == "not ready" and doc["reason"] == "draining" and doc["checks"]["draining"] is True
            assert not svc.task.done(), "the notifier stopped before its in-flight POST was answered"
            assert (await svc.get("/healthz"))[0] == 200  # draining is alive, only not ready

            info = json.loads((await nc.request("$SRV.INFO.chora-notifier", b"", timeout=5)).data)
            subject = next(e["subject"] for e in info["endpoints"] if e["name"] == "health")
            assert subject.startswith(health_subject)
            health = json.loads((await nc.request(subject, b"", timeout=5)).data)
            assert health["ready"] is False and health["reason"] == "draining"

            hook.released.set()
            await asyncio.wait_for(svc.task, 30)
            assert hook.answered == 1
            # stopped: it no longer answers discovery
            try:
                await nc.request("$SRV.PING.chora-notifier", b"", timeout=0.5)
                raise AssertionError("a stopped notifier still answers $SRV.PING")
            except nats.errors.NoRespondersError:
                pass
        finally:
            await nc.close()


async def test_readyz_is_503_while_the_nats_server_is_down_or_the_consumer_gone_and_200_once_back(
    settings, nats_server
):
    svc = await Running("validator", settings).started()
    try:
        await svc.until("/readyz", 200, "the validator ready")
        nats_server.stop()
        doc = await svc.until("/readyz", 503, "/readyz 503 with the server stopped")
        assert doc["reason"] == "not connected to NATS" and doc["checks"]["nats"] == "disconnected"
        assert (await svc.get("/healthz"))[0] == 200

        nats_server.restart()
        doc = await svc.until("/readyz", 200, "/readyz 200 after the server restarted")
        assert doc["checks"] == {"nats": "connected", "consumers": {"validator": "bound"}, "draining": False}

        # its durable consumer deleted behind its back: connected, but not bound
        nc = await nats.connect(nats_server.url)
        try:
            topo = Topology.from_settings(settings)
            await nc.jetstream().delete_consumer(topo.events_stream, "validator")
            doc = await svc.until("/readyz", 503, "/readyz 503 without its consumer")
            assert doc["reason"] == "consumer not bound: validator" and doc["checks"]["nats"] == "connected"
            await provision(nc.jetstream(), topo, consumers=["validator"])
            await svc.until("/readyz", 200, "/readyz 200 with the consumer back")
        finally:
            await nc.close()
    finally:
        svc.stop.set()
        await asyncio.wait_for(svc.task, 30)
