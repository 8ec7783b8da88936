"""The event loop every chora process runs: uvloop where it is installed, asyncio's otherwise.

uvloop (libuv under asyncio's API) runs the same coroutines with less CPU per callback,
socket read and timer; the services spend most of theirs on exactly that (the consumer
loop, publishes, acks). ``CHORA_EVENT_LOOP=asyncio`` keeps the standard loop (to compare,
or to rule uvloop out when hunting a bug); anything else, or nothing, asks for uvloop and
falls back to asyncio's loop, quietly, where uvloop is not available (e.g. Windows).
"""

from __future__ import annotations

import asyncio
import os


def install() -> str:
    """Make ``asyncio.run`` use uvloop when it is available and wanted; return the loop's name."""
    if os.environ.get("CHORA_EVENT_LOOP", "uvloop").strip().lower() == "asyncio":
        return "asyncio"
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"
