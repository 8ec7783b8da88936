"""services.eventloop: uvloop for every command where it is available, asyncio's loop on request."""

from __future__ import annotations

import asyncio

import pytest
import uvloop

from services import eventloop


@pytest.fixture
def restore_policy():
    before = asyncio.get_event_loop_policy()
    yield
    asyncio.set_event_loop_policy(before)


async def _loop_type() -> type:
    return type(asyncio.get_running_loop())


def test_commands_run_on_uvloop_by_default(monkeypatch, restore_policy):
    monkeypatch.delenv("CHORA_EVENT_LOOP", raising=False)
    assert eventloop.install() == "uvloop"
    assert issubclass(asyncio.run(_loop_type()), uvloop.Loop)


def test_chora_event_loop_asyncio_keeps_the_standard_loop(monkeypatch, restore_policy):
    monkeypatch.setenv("CHORA_EVENT_LOOP", "asyncio")
    asyncio.set_event_loop_policy(None)
    assert eventloop.install() == "asyncio"
    assert not issubclass(asyncio.run(_loop_type()), uvloop.Loop)
