"""bus/monitor.py against a real nats-server: JetStream figures and each server's /varz."""

from __future__ import annotations

import pytest

from bus.monitor import JetStreamMonitor, SnapshotError, monitor_urls
from bus.topology import Topology, provision
from services.telemetry.metrics import TelemetryMetrics
from tests.webhook import dead_url


def test_monitor_urls_setting():
    assert monitor_urls(None) == []
    assert monitor_urls(" http://a:8222/, http://b:8222 ,") == ["http://a:8222", "http://b:8222"]


async def test_servers_figures_next_to_the_jetstream_figures(settings, nats_server, nc):
    topo = Topology.from_settings(settings)
    js = nc.jetstream()
    await provision(js, topo)
    dead = dead_url(path="")
    monitor = JetStreamMonitor(js, topo, server_urls=[nats_server.monitor_url, dead])
    snap = await monitor.snapshot()
    assert {s.stream for s in snap.streams} == {topo.events_stream, topo.dlq_stream}
    live, down = snap.servers
    assert live.server == nats_server.monitor_url.split("//")[1] and live.up
    assert live.connections >= 1 and live.subscriptions > 0 and live.in_msgs > 0 and live.memory_bytes > 0
    assert down.server == dead.split("//")[1] and not down.up and down.connections == 0

    metrics = TelemetryMetrics()
    metrics.jetstream_polled(snap)
    get = metrics.registry.get_sample_value
    assert get("chora_nats_server_up", {"server": live.server}) == 1
    assert get("chora_nats_server_up", {"server": down.server}) == 0
    assert get("chora_nats_server_connections", {"server": live.server}) == live.connections
    assert get("chora_nats_server_messages_received_total", {"server": live.server}) == live.in_msgs
    assert get("chora_nats_server_connections", {"server": down.server}) is None  # no figures, not zeros


async def test_a_server_that_goes_away_shows_as_down_though_jetstream_is_unreadable(settings, nats_server, nc):
    topo = Topology.from_settings(settings)
    js = nc.jetstream(timeout=1)
    await provision(js, topo)
    monitor = JetStreamMonitor(js, topo, server_urls=[nats_server.monitor_url])
    metrics = TelemetryMetrics()
    metrics.jetstream_polled(await monitor.snapshot())
    server = nats_server.monitor_url.split("//")[1]
    assert metrics.registry.get_sample_value("chora_nats_server_up", {"server": server}) == 1

    nats_server.stop()
    with pytest.raises(SnapshotError) as e:
        await monitor.snapshot()
    [figures] = e.value.servers
    assert not figures.up
    metrics.jetstream_failed(e.value.servers)
    assert metrics.registry.get_sample_value("chora_nats_server_up", {"server": server}) == 0
    assert metrics.registry.get_sample_value("chora_jetstream_monitor_up") == 0
    # the last JetStream figures stay, flagged stale by chora_jetstream_monitor_up
    assert metrics.registry.get_sample_value("chora_stream_messages", {"stream": topo.events_stream}) is not None


async def test_consumer_figures_are_per_durable_not_per_ephemeral(settings, nc):
    """An ephemeral consumer (the telemetry sink's reader) has a new server-made name at each
    start: it would be a new series each time, so only durables get consumer figures."""
    from nats.js.api import AckPolicy, ConsumerConfig

    topo = Topology.from_settings(settings)
    js = nc.jetstream()
    await provision(js, topo)
    sub = await nc.subscribe(nc.new_inbox())
    eph = await js.add_consumer(
        topo.events_stream, ConsumerConfig(deliver_subject=sub.subject, ack_policy=AckPolicy.NONE)
    )
    snap = await JetStreamMonitor(js, topo).snapshot()
    names = {c.consumer for c in snap.consumers}
    assert "generator" in names and eph.name not in names
    assert names == {c for c in topo.consumers}
