"""NotifierApp wiring without a server: start from a config, one consumer spec per subscription."""

from __future__ import annotations

import json

import pytest

from bus.topology import Topology
from services.settings import Settings
from contracts.catalogue import BATCH_COMPLETED, CONTENT_GENERATED, CONTENT_VALIDATED
from services.notifier.config import NotifierConfigError
from services.notifier.service import NotifierApp, build


def write(tmp_path, subs) -> object:
    p = tmp_path / "subs.json"
    p.write_text(json.dumps({"subscriptions": subs}))
    return p


SUBS = [
    {"name": "a", "events": ["chora.batch_completed"], "url": "http://127.0.0.1:9/a", "secret_env": "A_SECRET"},
    {
        "name": "b",
        "events": ["chora.content_*"],
        "url": "http://127.0.0.1:9/b",
        "secret_env": "B_SECRET",
        "timeout_s": 40,
        "max_attempts": 3,
        "max_in_flight": 8,
        "circuit": {"max_deferrals": 10},
    },
]


async def test_one_durable_consumer_per_subscription(tmp_path):
    app = NotifierApp(write(tmp_path, SUBS), environ={"A_SECRET": "x", "B_SECRET": "y"})
    await app.start()
    try:
        topo = Topology.from_settings(Settings(home=tmp_path, prefix="p1", ack_wait_s=30))
        pairs = app.consumers(topo)
        specs = {spec.durable: spec for spec, _ in pairs}
        assert set(specs) == {"notify-a", "notify-b"}
        a, b = specs["notify-a"], specs["notify-b"]
        assert a.event_types == (BATCH_COMPLETED,)
        assert b.event_types == (CONTENT_GENERATED, CONTENT_VALIDATED)
        assert (a.max_deliver, a.ack_wait_s, a.max_ack_pending) == (6 + 120, 30, 64)
        assert (b.max_deliver, b.ack_wait_s, b.max_ack_pending) == (3 + 10, 50, 8)  # ack wait outlasts the timeout
        assert topo.consumer_config(b).filter_subjects == ["p1.content_generated.*", "p1.content_validated.*"]
        assert set(app.info()["subscriptions"]) == {"a", "b"}
        assert "x" not in repr(app.targets["a"].sender)
    finally:
        await app.close()


async def test_no_config_runs_without_subscriptions(tmp_path):
    app = build(Settings(home=tmp_path))
    await app.start()
    assert app.consumers(Topology.from_settings(Settings(home=tmp_path))) == []
    info = app.info()
    assert info["config"] is None and info["subscriptions"] == {}
    assert info["callbacks"]["on"] is False and info["callbacks"]["allow"] == []  # no allow-list: callbacks off
    await app.close()


async def test_missing_secret_or_bad_file_fails_the_start(tmp_path):
    with pytest.raises(NotifierConfigError, match="subscription 'b'.*B_SECRET"):
        await NotifierApp(write(tmp_path, SUBS), environ={"A_SECRET": "x"}).start()
    with pytest.raises(NotifierConfigError, match="no such file"):
        await NotifierApp(tmp_path / "nope.yaml").start()
