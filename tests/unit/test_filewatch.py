"""The benchmarks' file watch (bench/filewatch.py): a write wakes the waiter, nothing else does."""

from __future__ import annotations

import asyncio

from bench.filewatch import DirWatch


async def test_a_write_in_the_directory_wakes_the_waiter_and_nothing_else_does(tmp_path):
    watch = DirWatch(tmp_path)
    try:
        assert watch.native  # Linux: inotify, not the polling fallback
        watch.arm()
        assert await watch.changed(0.05) is False  # nothing written: the wait runs out
        watch.arm()
        waiter = asyncio.ensure_future(watch.changed(5))
        (tmp_path / "events.jsonl").write_bytes(b"{}\n")
        assert await waiter is True
        watch.arm()  # a write between arm() and the wait is not missed
        with open(tmp_path / "events.jsonl", "ab") as f:
            f.write(b"{}\n")
        assert await asyncio.wait_for(watch.changed(5), 5) is True
    finally:
        watch.close()


async def test_a_directory_that_cannot_be_watched_falls_back_to_polling(tmp_path):
    watch = DirWatch(tmp_path / "no-such-dir")
    assert not watch.native
    assert await watch.changed(5) is True  # a poll: back at once, the caller reads the file again
    watch.close()
