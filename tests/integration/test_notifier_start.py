"""Where a webhook subscription starts (`start: new | all | <time>`), against a real nats-server
and a real local HTTP endpoint; and what happens when `start` changes for an existing one."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest

from bus.topology import ProvisionError, Topology, provision
from services.notifier.config import parse_config
from services.notifier.service import subscription_consumers
from services.runtime import ServiceStartError
from tests.conftest import wait_for
from tests.integration.test_notifier_webhooks import Notifier, Webhook, generated, publish, subscription


@pytest.fixture(autouse=True)
async def streams(nc, settings):
    """The streams exist before the notifier does (events are stored before it starts)."""
    await provision(nc.jetstream(), Topology.from_settings(settings), consumers=[])


def received_ids(hook: Webhook) -> list[str]:
    """The event ids the endpoint got, sorted: a subscription POSTs several events at once."""
    return sorted(hook.event_ids())


async def stored_time(nc, settings, event) -> str:
    """When JetStream stored ``event`` (its time in the stream, RFC 3339)."""
    topo = Topology.from_settings(settings)
    msg = await nc.jetstream().get_last_msg(topo.events_stream, topo.subject(event.type))
    assert msg.headers["ce-id"] == event.id
    return msg.time.isoformat()


async def deliver_one_more(nc, settings, n: Notifier, hook: Webhook) -> str:
    """Publish a fresh event and wait until the endpoint has it: everything before it has been offered."""
    ev = generated()
    await publish(nc, settings, ev)
    await wait_for(lambda: ev.id in received_ids(hook), 10, "the fresh event at the endpoint")
    await wait_for(lambda: n.settled("notify-hook"), 10, "notify-hook to settle")
    return ev.id


async def test_a_new_subscription_starts_from_new_events_by_default(nc, settings, tmp_path, monkeypatch):
    old = generated()
    await publish(nc, settings, old)
    with Webhook() as hook:
        async with Notifier(nc, settings, tmp_path, monkeypatch, [subscription("hook", hook.url)]) as n:
            fresh = await deliver_one_more(nc, settings, n, hook)
            assert received_ids(hook) == [fresh]  # and not the old one


async def test_start_all_replays_the_stream_history(nc, settings, tmp_path, monkeypatch):
    old = [generated(), generated()]
    await publish(nc, settings, *old)
    with Webhook() as hook:
        async with Notifier(nc, settings, tmp_path, monkeypatch, [subscription("hook", hook.url, start="all")]) as n:
            fresh = await deliver_one_more(nc, settings, n, hook)
            assert received_ids(hook) == sorted([old[0].id, old[1].id, fresh])


async def test_start_at_a_time_delivers_what_was_stored_since(nc, settings, tmp_path, monkeypatch):
    before, since = generated(), generated()
    await publish(nc, settings, before)
    await publish(nc, settings, since)
    start = await stored_time(nc, settings, since)
    with Webhook() as hook:
        async with Notifier(nc, settings, tmp_path, monkeypatch, [subscription("hook", hook.url, start=start)]) as n:
            fresh = await deliver_one_more(nc, settings, n, hook)
            assert received_ids(hook) == sorted([since.id, fresh])
        # the same start again, written in another zone: the same consumer, going on from where it was
        same = datetime.fromisoformat(start).astimezone(timezone(timedelta(hours=2))).isoformat()
        async with Notifier(nc, settings, tmp_path, monkeypatch, [subscription("hook", hook.url, start=same)]) as n:
            last = await deliver_one_more(nc, settings, n, hook)
            assert received_ids(hook) == sorted([since.id, fresh, last])


async def test_changing_start_of_an_existing_subscription_stops_the_start_and_says_why(
    nc, settings, tmp_path, monkeypatch
):
    with Webhook() as hook:
        async with Notifier(nc, settings, tmp_path, monkeypatch, [subscription("hook", hook.url)]) as n:
            first = await deliver_one_more(nc, settings, n, hook)
        missed = generated()  # stored while the notifier is down
        await publish(nc, settings, missed)

        with pytest.raises(ServiceStartError) as e:
            async with Notifier(nc, settings, tmp_path, monkeypatch, [subscription("hook", hook.url, start="all")]):
                pass
        msg = str(e.value)
        assert "consumer notify-hook already exists and started from new" in msg
        assert "start: all applies only to a new consumer" in msg and "keeps its position" in msg
        assert received_ids(hook) == [first]

        # Without `start` (or with the one it was created with) it goes on from where it was.
        async with Notifier(nc, settings, tmp_path, monkeypatch, [subscription("hook", hook.url)]) as n:
            fresh = await deliver_one_more(nc, settings, n, hook)
            assert received_ids(hook) == sorted([first, missed.id, fresh])


async def test_a_consumer_made_before_start_existed_keeps_its_position_when_start_is_not_set(nc, settings):
    """Durables created before `start` existed began from all; a config without `start` goes on with them."""
    js = nc.jetstream()
    topo = Topology.from_settings(settings)
    doc = {
        "subscriptions": [
            {"name": "hook", "events": ["chora.content_generated"], "url": "http://h/", "secret_env": "S"}
        ]
    }
    [spec] = subscription_consumers(parse_config(json.dumps(doc), "s.json"), topo)
    await provision(js, topo, consumers=[], extra=[replace(spec, start="all")])  # as before
    await provision(js, topo, consumers=[], extra=[spec])
    assert (await js.consumer_info(topo.events_stream, "notify-hook")).config.deliver_policy == "all"
    doc["subscriptions"][0]["start"] = "new"
    [explicit] = subscription_consumers(parse_config(json.dumps(doc), "s.json"), topo)
    with pytest.raises(ProvisionError, match="started from all; start: new applies only to a new consumer"):
        await provision(js, topo, consumers=[], extra=[explicit])
