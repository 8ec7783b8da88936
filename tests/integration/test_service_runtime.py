"""The runtime around every service: its own /metrics, and a clear start error
when that endpoint cannot be served."""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.request

import pytest

from bus.publisher import Publisher
from contracts.catalogue import CONTENT_GENERATED, GENERATION_REQUESTED
from contracts.envelope import new_event
from contracts.events import GenerationRequested
from services.runtime import ServiceStartError, ready_file, run_service
from tests.conftest import wait_for


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()


async def test_each_service_serves_its_consumer_figures(settings, nc):
    stop = asyncio.Event()
    task = asyncio.create_task(run_service("generator", settings, stop=stop))
    try:
        await wait_for(lambda: task.done() or ready_file(settings, "generator").exists(), 30, "generator ready")
        if task.done():
            task.result()
        url = json.loads(ready_file(settings, "generator").read_text())["metrics_url"]
        # before any message: the series exist at 0
        text = await asyncio.to_thread(scrape, url)
        assert (
            f'chora_events_consumed_total{{consumer="generator",event_type="{GENERATION_REQUESTED}",outcome="ack"}} 0.0'
        ) in text

        pub = Publisher(nc.jetstream(), settings.prefix)
        for config in ("hello-world", "no-such-config"):
            await pub.publish(
                new_event(GENERATION_REQUESTED, GenerationRequested(content_config_id=config), source="t")
            )

        want = [
            f'chora_events_consumed_total{{consumer="generator",event_type="{GENERATION_REQUESTED}",outcome="ack"}} 2.0',
            f'chora_events_published_total{{consumer="generator",event_type="{CONTENT_GENERATED}",status="success"}} 1.0',
            f'chora_events_published_total{{consumer="generator",event_type="{CONTENT_GENERATED}",status="error"}} 1.0',
            'chora_handler_duration_seconds_count{consumer="generator"} 2.0',
        ]

        async def counted() -> bool:
            text = await asyncio.to_thread(scrape, url)
            return all(w in text for w in want)

        await wait_for(counted, 20, "the generator's figures")
    finally:
        stop.set()
        await task
    assert not ready_file(settings, "generator").exists()
    with pytest.raises(OSError):
        await asyncio.to_thread(scrape, url)


async def test_a_metrics_port_in_use_is_a_clear_start_error(settings, nats_server):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        busy = settings.model_copy(update={"metrics_port": port})
        with pytest.raises(ServiceStartError) as e:
            await asyncio.wait_for(run_service("validator", busy), 30)
    msg = str(e.value)
    assert f"127.0.0.1:{port}" in msg and "CHORA_METRICS_PORT" in msg and msg.startswith("validator")
    assert not ready_file(busy, "validator").exists()

    # its connection was closed: the server has no client left
    def no_connections() -> bool:
        with urllib.request.urlopen(f"{nats_server.monitor_url}/connz", timeout=5) as r:
            return json.loads(r.read())["num_connections"] == 0

    await wait_for(no_connections, 10, "the validator's connection closed")
