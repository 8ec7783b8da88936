"""contracts.handling: a service's handler table bound to its dependencies."""

from __future__ import annotations

import pytest

from contracts.catalogue import CONTENT_GENERATED, GENERATION_REQUESTED
from contracts.envelope import CloudEvent, new_event
from contracts.events import ContentGenerated, GenerationRequested
from contracts.handling import ANY, Delivery, Reject, route


def requested() -> CloudEvent:
    return new_event(GENERATION_REQUESTED, GenerationRequested(content_config_id="c"), source="t")


def generated() -> CloudEvent:
    return new_event(
        CONTENT_GENERATED, ContentGenerated(request_id="r", content_config_id="c", status="success"), source="t"
    )


async def test_each_event_goes_to_the_handler_of_its_type_with_the_delivery_and_the_deps():
    calls = []

    async def on_requested(event, delivery, deps):
        calls.append(("requested", event.id, delivery.attempt, deps))
        return [generated()]

    handle = route({GENERATION_REQUESTED: on_requested}, "the deps", "generator")
    ev = requested()
    out = await handle(ev, Delivery(attempt=2, max_attempts=5, consumer="generator", stream_seq=7))
    assert [e.type for e in out] == [CONTENT_GENERATED]
    assert calls == [("requested", ev.id, 2, "the deps")]


async def test_a_type_without_a_handler_is_rejected_naming_the_service_and_the_type():
    handle = route({GENERATION_REQUESTED: lambda *a: None}, None, "generator")
    with pytest.raises(Reject) as e:
        await handle(generated(), Delivery.first("generator"))
    assert e.value.code == "UNEXPECTED_TYPE"
    assert "generator" in e.value.message and CONTENT_GENERATED in e.value.message


async def test_the_any_entry_takes_every_type_without_its_own_entry():
    seen = []

    async def everything(event, delivery, deps):
        seen.append(("any", event.type))
        return []

    async def requests(event, delivery, deps):
        seen.append(("own", event.type))
        return []

    handle = route({ANY: everything, GENERATION_REQUESTED: requests}, None, "telemetry")
    await handle(generated(), Delivery.first())
    await handle(requested(), Delivery.first())
    assert seen == [("any", CONTENT_GENERATED), ("own", GENERATION_REQUESTED)]


def test_a_first_delivery_outside_the_loop_is_the_last_unless_told_otherwise():
    assert Delivery.first("x").last and Delivery.first("x").attempt == 1
    assert not Delivery.first("x", max_attempts=3).last
