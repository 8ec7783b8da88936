"""A 3-node JetStream cluster on loopback with R3 streams: kill the stream leader
mid-batch; nothing is lost or duplicated, and the time to recover is measured."""

from __future__ import annotations

import time

import nats
import pytest

from bus.topology import Topology, provision
from bus.settings import NatsSettings
from services.settings import Settings
from tests.conftest import wait_for
from tests.faults.harness import SERVICES, LocalCluster, ProcStack, js_ready
from tests.faults.test_faults import ITEMS, finish_and_check, progress, publish_batch


@pytest.fixture
def cluster(tmp_path):
    c = LocalCluster(tmp_path / "cluster").start()
    yield c
    c.stop()


async def test_kill_the_stream_leader_mid_batch(cluster, tmp_path):
    await wait_for(lambda: js_ready(cluster.urls), timeout=30, what="JetStream meta leader elected")
    stack = ProcStack(tmp_path, urls=cluster.urls, extra_env={"CHORA_REPLICAS": "3"})
    nc = await nats.connect(cluster.urls.split(","), max_reconnect_attempts=-1)
    js = nc.jetstream()
    topo = Topology.from_settings(Settings(prefix=stack.prefix, replicas=3, nats=NatsSettings(url=cluster.urls)))
    await provision(js, topo)
    try:
        for name in SERVICES:
            stack.spawn(name)
        batch_id = await publish_batch(stack, ITEMS)
        await progress(stack, batch_id, ITEMS // 3)
        info = await js.stream_info(topo.events_stream)
        assert info.config.num_replicas == 3 and len(info.cluster.replicas or []) == 2
        leader = info.cluster.leader
        t0 = time.monotonic()
        cluster.node(leader).kill()

        async def new_leader() -> bool:
            try:
                i = await js.stream_info(
                    topo.events_stream,
                )
                return bool(i.cluster.leader) and i.cluster.leader != leader
            except Exception:
                return False

        await wait_for(new_leader, timeout=60, what="a new stream leader")
        elected = time.monotonic() - t0
        print(f"stream leader {leader} killed: new leader after {elected:.2f}s")
        await finish_and_check(
            stack, batch_id, f"kill -9 the R3 stream leader (3-node cluster; new leader after {elected:.1f}s)", t0
        )
    finally:
        stack.stop_all()
        await nc.close()
