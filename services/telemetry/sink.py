"""The JSONL mirror: one line per event id, written by group commit.

The line format is :mod:`services.telemetry.lines`; the memory of the ids
written is :mod:`services.telemetry.ids`.

Rotation and retention
----------------------
Before a batch is written the sink rotates the live file when the batch would
take it past ``rotate_bytes`` (0: never), or, with ``rotate_daily``, when the
UTC day (by ``clock``) differs from the day of the file's first line. The file
is renamed to ``events-<UTC day of its first line>-<seq>.jsonl`` and a new
``events.jsonl`` (0600) is opened at once; the renamed file is gzipped in a
thread (never on the event loop, one at a time), then the oldest rotated files
beyond ``retention_files`` are deleted. See :mod:`services.telemetry.rotation`
for the names and the crash-safe compression. A file is larger than
``rotate_bytes`` only when a single batch is. A line produced just before
midnight may land in the next day's file (the day is checked per batch).

Any event type is mirrored the same way: nothing here knows the catalogue.

Exactly one line per event id
-----------------------------
The sink remembers the ids it has written (as 16-byte BLAKE2b digests, to keep
memory low) and acknowledges an event it has already written without writing
it again. On :meth:`JsonlSink.start` the memory is rebuilt from the tail of the
existing file, so a restarted sink still recognises what it wrote before.

Rotation does not touch the memory. On start, when the live file holds fewer
than ``max_ids`` lines (it was rotated recently: always the case just after a
rotation), the newest rotated files are read too, newest first, until
``max_ids`` ids are remembered or the next older file was last written before
the redelivery horizon (``dedupe_horizon_s``, default 1 h, judged by the file's
mtime, which compression preserves). An event whose line is older than that
cannot be redelivered (see below), so reading further would only cost
start-up time (a 64 MiB file holds ~200,000 lines).

The memory is bounded (``max_ids``, default 1,000,000; the oldest are forgotten
first). That is safe because duplicates only reach the sink in two ways:

* a republish of the same event: JetStream's duplicate window (``Nats-Msg-Id``
  is the event id) drops it before it is stored, so it is never delivered;
* a redelivery of a message that was not acknowledged (the process died or the
  ack was lost after the line was written). A message is redelivered within
  ``ack_wait * max_deliver`` plus the backoff (minutes), and during that time
  the sink writes far fewer than ``max_ids`` other events (at 4,000 events/s,
  3 minutes are ~720,000 events).

Memory cost is about 105 bytes per remembered id (~105 MB at the default cap,
reached only after 1,000,000 events; ~10 MB after 100,000). The cap covers the
redelivery horizon at 4,000 events/s; raise ``CHORA_TELEMETRY_MAX_IDS`` for
higher sustained rates.

Group commit
------------
:meth:`JsonlSink.write` encodes the line, appends it to a pending buffer and
waits. A single flusher task takes everything pending and writes it with ONE
``os.write`` to a file descriptor opened ``O_APPEND``; then it wakes every
writer of that batch. ``write`` returns only once its line is in the file, so
the consumer acknowledges the message after the write. If the write fails the
ids of the batch are forgotten again (the file is truncated back if it was
partly written) and every writer of the batch gets :class:`SinkError`, so the
messages are redelivered.

Durability: with ``fsync=False`` (the default) a written line sits in the
kernel's page cache: it survives the process being killed (even ``kill -9``),
but not a machine crash or power loss, which can lose the last seconds of
acknowledged lines. With ``fsync=True`` every batch is fsync'ed (in a thread)
before its writers are released; the batches simply grow while a sync runs.

A line torn by a crash (a file not ending in a newline) is cut off on start;
its event was not acknowledged and comes back.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import logging
import os
import stat
import time
from pathlib import Path
from typing import Callable

import msgspec

from contracts.envelope import CloudEvent, now_rfc3339
from services.telemetry import rotation
from services.telemetry.ids import RecentIds, id_key, ids_of, ids_of_file
from services.telemetry.lines import DEFAULT_REDACT_KEYS, encode_line
from services.telemetry.privacy import KeepContext, keep_none

log = logging.getLogger("chora.telemetry")

DEFAULT_MAX_IDS = 1_000_000
DEFAULT_ROTATE_BYTES = 64 << 20
DEFAULT_RETENTION_FILES = 30
DEFAULT_DEDUPE_HORIZON_S = 3600.0
_ROTATE_RETRY_S = 60.0
_SCAN_CHUNK = 1 << 20


class SinkError(Exception):
    """The line could not be written; the event must be redelivered."""


class _TimestampOnly(msgspec.Struct):
    timestamp: str


# --------------------------------------------------------------------------- the sink


class JsonlSink:
    """Mirror CloudEvents to a JSONL file, one line per event id.

    ``await start()`` before writing, ``await close()`` at the end (pending lines
    are written first). ``await write(event)`` returns True when it wrote the
    line, False when the id was already written; it raises :class:`SinkError`
    when the line could not be written.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        fsync: bool = False,
        max_ids: int = DEFAULT_MAX_IDS,
        clock: Callable[[], float] = time.time,
        scan_chunk_bytes: int = _SCAN_CHUNK,
        redact_keys: frozenset[str] = DEFAULT_REDACT_KEYS,
        rotate_bytes: int = DEFAULT_ROTATE_BYTES,
        rotate_daily: bool = True,
        retention_files: int = DEFAULT_RETENTION_FILES,
        dedupe_horizon_s: float = DEFAULT_DEDUPE_HORIZON_S,
        keep_context: KeepContext = keep_none,
    ):
        self.path = Path(path)
        self.keep_context = keep_context  # which configs keep request context values (privacy.py)
        self.rotate_bytes = max(0, int(rotate_bytes or 0))
        self.rotate_daily = rotate_daily
        self.retention_files = retention_files
        self.dedupe_horizon_s = dedupe_horizon_s
        self.redact_keys = frozenset(k.lower() for k in redact_keys)
        self.fsync = fsync
        self.clock = clock
        self._scan_chunk = max(64, scan_chunk_bytes)
        self._written = RecentIds(max_ids)
        self._inflight: dict[bytes, asyncio.Future] = {}
        self._buf: list[bytes] = []
        self._batch: list[tuple[bytes, asyncio.Future]] = []
        self._fd: int | None = None
        self._size = 0
        self._day: str | None = None  # UTC day of the live file's first line
        self._rotate_retry_at = 0.0
        self._bg: set[asyncio.Task] = set()
        self._compress_lock: asyncio.Lock | None = None
        self._wake: asyncio.Event | None = None
        self._flusher: asyncio.Task | None = None
        self._closing = False
        self.lines_written = 0
        self.duplicates_skipped = 0
        self.batches = 0
        self.repaired_bytes = 0
        self.rotations = 0
        self.compress_errors = 0

    @property
    def max_ids(self) -> int:
        return self._written.maxlen

    @property
    def remembered(self) -> int:
        return len(self._written)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        if self._fd is not None:
            return
        await asyncio.to_thread(self._open)
        self._compress_lock = asyncio.Lock()
        self._closing = False
        self._wake = wake = asyncio.Event()
        self._flusher = asyncio.create_task(self._flush_loop(wake), name=f"jsonl-flusher:{self.path.name}")

    async def flush(self) -> None:
        """Wait until every line enqueued so far is written (or failed)."""
        pending = [f for _, f in self._batch] + list(self._inflight.values())
        if pending:
            await asyncio.gather(*(asyncio.shield(f) for f in pending), return_exceptions=True)

    async def close(self) -> None:
        """Write what is pending, stop the flusher, close the file, finish compressing."""
        if self._fd is None:
            await self.wait_compressed()
            return
        self._closing = True
        if self._wake is not None:
            self._wake.set()
        if self._flusher is not None:
            await self._flusher
            self._flusher = None
        fd, self._fd = self._fd, None
        if self.fsync:
            try:
                os.fsync(fd)
            except OSError:
                pass
        os.close(fd)
        await self.wait_compressed()

    async def wait_compressed(self) -> None:
        """Wait until every rotated file handed over so far is compressed (or failed)."""
        while self._bg:
            await asyncio.gather(*list(self._bg), return_exceptions=True)

    # ------------------------------------------------------------------ writing
    async def write(self, event: CloudEvent) -> bool:
        wake = self._wake
        if self._fd is None or wake is None or self._closing:
            raise SinkError(f"sink {self.path} is not open")
        key = id_key(event.id)
        pending = self._inflight.get(key)
        if pending is not None:
            # The same id is being written right now: its outcome is ours.
            await asyncio.shield(pending)
            self.duplicates_skipped += 1
            return False
        if key in self._written:
            self.duplicates_skipped += 1
            return False
        line = encode_line(event, now_rfc3339(self.clock()), self.redact_keys, self.keep_context)
        fut = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        self._buf.append(line)
        self._batch.append((key, fut))
        wake.set()
        # shield: a cancelled writer must not cancel the batch's future
        # (the line is written anyway, and duplicates may be waiting on it).
        await asyncio.shield(fut)
        return True

    async def _flush_loop(self, wake: asyncio.Event) -> None:
        while True:
            await wake.wait()
            wake.clear()
            if not self._buf:
                if self._closing:
                    return
                continue
            buf, batch = self._buf, self._batch
            self._buf, self._batch = [], []
            data = b"".join(buf)
            del buf
            rotated: list[Path] = []
            try:
                if self.fsync:
                    await asyncio.to_thread(self._write_batch, data, rotated)
                else:
                    self._write_batch(data, rotated)
            except Exception as e:
                log.error("telemetry sink: writing %d lines to %s failed: %s", len(batch), self.path, e)
                err = SinkError(f"writing to {self.path} failed: {e}")
                for key, fut in batch:
                    self._inflight.pop(key, None)
                    if not fut.done():
                        fut.set_exception(err)
            else:
                written = self._written
                for key, fut in batch:
                    self._inflight.pop(key, None)
                    written.add(key)
                    if not fut.done():
                        fut.set_result(None)
                self.lines_written += len(batch)
                self.batches += 1
            for plain in rotated:
                self._compress_later(plain)
            # Lines enqueued while we were writing, or a close waiting: go round again.
            if self._buf or self._closing:
                wake.set()

    def _write_batch(self, data: bytes, rotated: list[Path]) -> None:
        """Rotate first if needed (the renamed file goes into ``rotated``), then append."""
        now = self.clock()
        if self._size > 0 and now >= self._rotate_retry_at:
            day = rotation.utc_day(now)
            if (self.rotate_bytes and self._size + len(data) > self.rotate_bytes) or (
                self.rotate_daily and self._day is not None and day != self._day
            ):
                try:
                    rotated.append(self._rotate())
                except OSError as e:
                    # Keep writing to the file we have; nothing is lost. Try again later.
                    self._rotate_retry_at = now + _ROTATE_RETRY_S
                    log.error("telemetry sink: rotating %s failed (retrying in %ds): %s", self.path, _ROTATE_RETRY_S, e)
        self._append(data)
        if self._day is None:
            self._day = rotation.utc_day(now)

    def _rotate(self) -> Path:
        """Rename the live file to its rotated name and open a new one. Blocking, but only
        metadata operations (plus an fsync in fsync mode)."""
        old_fd = self._fd
        assert old_fd is not None and self._day is not None
        if self.fsync:
            os.fsync(old_fd)
        target = rotation.rotated_name(self.path, self._day, rotation.next_seq(self.path, self._day))
        os.rename(self.path, target)
        try:
            new_fd = self._create()
        except OSError:
            try:
                os.rename(target, self.path)
            except OSError as e:  # lines keep going to the renamed file; recover() picks it up
                log.error("telemetry sink: could not rename %s back to %s: %s", target, self.path, e)
            raise
        os.close(old_fd)
        self._fd, self._size, self._day = new_fd, 0, None
        self.rotations += 1
        log.info("telemetry sink: rotated %s to %s", self.path, target.name)
        return target

    def _compress_later(self, plain: Path) -> None:
        task = asyncio.get_running_loop().create_task(self._compress(plain), name=f"jsonl-gzip:{plain.name}")
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    async def _compress(self, plain: Path) -> None:
        assert self._compress_lock is not None
        async with self._compress_lock:  # one at a time: retention sees a settled directory
            try:
                await asyncio.to_thread(self._compress_and_retain, plain)
            except Exception as e:
                self.compress_errors += 1
                log.error("telemetry sink: compressing %s failed (kept as it is): %s", plain, e)

    def _compress_and_retain(self, plain: Path) -> None:
        try:
            rotation.compress(plain, fsync=self.fsync)
        except FileNotFoundError:
            pass  # retention already deleted it
        finally:
            rotation.apply_retention(self.path, self.retention_files)

    def _append(self, data: bytes) -> None:
        fd = self._fd
        assert fd is not None
        done = 0
        try:
            done = os.write(fd, data)
            while done < len(data):  # a short write (rare on a regular file): finish it
                done += os.write(fd, memoryview(data)[done:])
            if self.fsync:
                os.fsync(fd)
        except BaseException:
            if done:  # never leave part of a batch behind: its writers will retry
                try:
                    os.ftruncate(fd, self._size)
                except OSError as e:
                    log.error("telemetry sink: could not truncate %s back to %d: %s", self.path, self._size, e)
            raise
        self._size += len(data)

    # ------------------------------------------------------------------ opening
    def _create(self) -> int:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if stat.S_IMODE(os.fstat(fd).st_mode) != 0o600:
                os.fchmod(fd, 0o600)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # A crash may have left a rotated file uncompressed or a half-written .gz.tmp.
        rotation.recover(self.path, fsync=self.fsync)
        rotation.apply_retention(self.path, self.retention_files)
        fd = self._create()
        try:
            size = self._repair(fd, os.fstat(fd).st_size)
            self._day = self._first_day(size)
            self._load_ids(size)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._size = size

    def _first_day(self, size: int) -> str | None:
        """The UTC day of the live file's first line (its mtime's day if that line is unreadable)."""
        if size == 0:
            return None
        with open(self.path, "rb") as f:
            first = f.readline(1 << 16)
        try:
            ts = msgspec.json.decode(first, type=_TimestampOnly).timestamp
            _dt.date.fromisoformat(ts[:10])
            return ts[:10]
        except (msgspec.DecodeError, ValueError):
            return rotation.utc_day(os.stat(self.path).st_mtime)

    def _repair(self, fd: int, size: int) -> int:
        """Cut a torn last line off; return the new size."""
        if size == 0:
            return 0
        with open(self.path, "rb") as f:
            f.seek(size - 1)
            if f.read(1) == b"\n":
                return size
            pos = size
            keep = 0
            while pos > 0:
                n = min(self._scan_chunk, pos)
                pos -= n
                f.seek(pos)
                chunk = f.read(n)
                nl = chunk.rfind(b"\n")
                if nl >= 0:
                    keep = pos + nl + 1
                    break
        os.ftruncate(fd, keep)
        self.repaired_bytes = size - keep
        log.warning("telemetry sink: cut a torn last line (%d bytes) off %s", size - keep, self.path)
        return keep

    def _load_ids(self, size: int) -> None:
        """Remember the ids of the last ``max_ids`` lines, reading the file backwards."""
        limit = self._written.maxlen
        found: list[list[bytes]] = []  # per chunk, newest chunk first
        count = 0
        bad = 0
        with open(self.path, "rb") as f:
            pos = size
            carry = b""  # the start of a line whose beginning is in an earlier chunk
            while pos > 0 and count < limit:
                n = min(self._scan_chunk, pos)
                pos -= n
                f.seek(pos)
                buf = f.read(n) + carry
                if pos > 0:
                    nl = buf.find(b"\n")
                    if nl < 0:
                        carry = buf
                        continue
                    carry, buf = buf[: nl + 1], buf[nl + 1 :]
                else:
                    carry = b""
                keys, nbad = ids_of(buf)
                bad += nbad
                found.append(keys)
                count += len(keys)
        if bad:
            log.warning("telemetry sink: %d unreadable lines in %s were skipped", bad, self.path)
        keys_in_order = [k for chunk in reversed(found) for k in chunk]
        if count < limit:
            keys_in_order = self._rotated_ids(limit - count) + keys_in_order
        for k in keys_in_order[-limit:]:
            self._written.add(k)

    def _rotated_ids(self, wanted: int) -> list[bytes]:
        """Up to ``wanted`` of the newest ids in the rotated files, oldest first (see the
        module docstring for where this stops)."""
        # A rotated file's mtime is the time of its last write (compression keeps it). Real
        # time, not ``clock``: the horizon is about how long ago the process wrote.
        horizon = time.time() - self.dedupe_horizon_s
        per_file: list[list[bytes]] = []
        got = 0
        for r in reversed(rotation.list_rotated(self.path)):
            if got >= wanted:
                break
            try:
                if os.stat(r.path).st_mtime < horizon:
                    break
            except FileNotFoundError:
                continue
            try:
                keys = ids_of_file(r.path, self._scan_chunk)
            except (OSError, EOFError) as e:
                log.warning("telemetry sink: could not read ids from %s: %s", r.path, e)
                keys = []
            per_file.append(keys[-(wanted - got) :])
            got += len(per_file[-1])
        return [k for keys in reversed(per_file) for k in keys]
