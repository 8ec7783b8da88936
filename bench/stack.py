"""The stack a benchmark measures: `chora up`'s own supervisor, in this process's event loop."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from typing import Any, AsyncIterator

from bus.connection import connect
from chora.up import Stack
from services.settings import Settings


@contextlib.asynccontextmanager
async def running_stack(settings: Settings, services: list[str] | None = None) -> AsyncIterator[tuple[Stack, Any]]:
    """(the stack, a client connection) while the services run; everything stopped afterwards."""
    stack = Stack(settings, services=services, out=sys.stderr)
    stop = asyncio.Event()
    task = asyncio.create_task(stack.run(stop))
    try:
        while not settings.stack_file.exists():
            if task.done():
                await task
            await asyncio.sleep(0.05)
        nc = await connect(settings.nats, stack.url, name="chora-bench")
        try:
            yield stack, nc
        finally:
            await nc.close()
    finally:
        stop.set()
        await task
