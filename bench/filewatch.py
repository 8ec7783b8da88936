"""Wait for a directory's files to be written, without polling: Linux inotify through ctypes.

The benchmarks' JSONL readers used to poll the file every 0.2-0.5 ms. On a 2-core machine that
poll loop is a process always runnable next to the services it measures, so it took CPU from
them and added its own wake-ups to every latency. With inotify the reader sleeps until the sink
writes (one wake-up per write of the sink, which writes a batch of lines at a time).

Elsewhere (no inotify) :meth:`DirWatch.changed` falls back to a short sleep: a poll.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
from pathlib import Path

IN_MODIFY = 0x00000002
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        libc.inotify_init1  # noqa: B018 - missing outside Linux
        return libc
    except (OSError, AttributeError):
        return None


class DirWatch:
    """``await changed(timeout)`` returns once a file of ``directory`` was created or written
    since the last :meth:`arm` (at once if it already was), or after ``timeout`` seconds.

    Use: ``arm()``, read the file, and if nothing new was there ``await changed()``: a write
    between the read and the wait is not missed, since ``arm()`` came before the read."""

    def __init__(self, directory: Path, fallback_poll_s: float = 0.0005):
        self.directory = directory
        self.fallback_poll_s = fallback_poll_s
        self._event = asyncio.Event()
        self._fd = -1
        libc = _libc()
        if libc is None:
            return
        fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            return
        mask = IN_MODIFY | IN_CREATE | IN_MOVED_TO | IN_CLOSE_WRITE
        if libc.inotify_add_watch(fd, os.fsencode(directory), mask) < 0:
            os.close(fd)
            return
        self._fd = fd
        asyncio.get_running_loop().add_reader(fd, self._readable)

    @property
    def native(self) -> bool:
        return self._fd >= 0

    def _readable(self) -> None:
        try:
            while os.read(self._fd, 65536):
                pass
        except BlockingIOError:
            pass
        self._event.set()

    def arm(self) -> None:
        self._event.clear()

    async def changed(self, timeout: float) -> bool:
        if not self.native:
            await asyncio.sleep(self.fallback_poll_s)
            return True
        try:
            async with asyncio.timeout(timeout):
                await self._event.wait()
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        if self._fd >= 0:
            asyncio.get_running_loop().remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1
