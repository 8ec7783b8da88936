"""The JSONL mirror: one line per stream message, in stream order, written by batches.

The line format is :mod:`services.telemetry.lines` (each line carries ``seq``, the
stream sequence of its message); what reads the stream is :mod:`bus.mirror` and what
turns a message into a line is :mod:`services.telemetry.mirror`.

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

Exactly once, by stream sequence
--------------------------------
The sink is the only writer of its file and it writes lines in stream order, so
its position in the stream is the ``seq`` of its last line. :meth:`JsonlSink.add`
takes a line only when its sequence is above the position (a sequence at or below
it is never written again) and :meth:`JsonlSink.flush` appends everything taken
since the last flush with ONE ``os.write`` to a file descriptor opened
``O_APPEND``. On :meth:`JsonlSink.start` the position is read back from the last
complete line: of the live file, or, when the live file is empty (just rotated),
of the newest rotated file. Nothing else is remembered, so memory does not grow
with the number of events.

The sink holds an exclusive lock on ``<file>.lock`` while it runs: a second sink
pointed at the same file refuses to start (two writers would interleave and each
write what the other did).

A file written before lines had a ``seq`` (an upgrade) has no position: the sink
then asks for the messages stored since the ``timestamp`` of its last line
(:meth:`JsonlSink.start_time`), which may repeat the events of the moments before
the upgrade once.

Crashes and failed writes
-------------------------
A line torn by a crash (``kill -9`` in the middle of a write: a file not ending
in a newline) is cut off on start; its message is read again, being above the
position. A batch is never left half-written: if a write fails, the part that
made it is truncated away, everything taken and not yet written is dropped, the
position falls back to the last written sequence and :class:`SinkError` is raised
(the reader then reads again from there).

Durability: with ``fsync=False`` (the default) a written line sits in the
kernel's page cache: it survives the process being killed (even ``kill -9``),
but not a machine crash or power loss, which can lose the last seconds of
lines; they are read again from the stream on start (the position is the last
line that reached the disk), as long as the stream still holds them. With
``fsync=True`` every batch is fsync'ed (in a thread) before :meth:`flush`
returns; lines keep being taken meanwhile, so the next batch simply grows.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import fcntl
import logging
import os
import stat
import time
from pathlib import Path
from typing import Callable

import msgspec

from contracts.envelope import CloudEvent, now_rfc3339
from services.telemetry import rotation
from services.telemetry.lines import DEFAULT_REDACT_KEYS, encode_seq_line
from services.telemetry.privacy import KeepContext, keep_none

log = logging.getLogger("chora.telemetry")

DEFAULT_ROTATE_BYTES = 64 << 20
DEFAULT_RETENTION_FILES = 30
_ROTATE_RETRY_S = 60.0
_SCAN_CHUNK = 1 << 20


class SinkError(Exception):
    """The lines could not be written; they must be read again from the stream."""


class _TimestampOnly(msgspec.Struct):
    timestamp: str


class _Position(msgspec.Struct):
    """What start-up reads of the last line: its sequence (None in lines written before
    lines had one) and when it was written."""

    seq: int | None = None
    timestamp: str | None = None


_position_decoder = msgspec.json.Decoder(_Position)


# --------------------------------------------------------------------------- the sink


class JsonlSink:
    """Mirror stream messages to a JSONL file, one line per stream sequence, in order.

    ``await start()`` before adding, ``await close()`` at the end (what was added is
    written first). ``add(seq, line)`` takes a line (False when ``seq`` is at or below
    the position); ``await flush()`` writes what was taken, or raises :class:`SinkError`.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        fsync: bool = False,
        clock: Callable[[], float] = time.time,
        scan_chunk_bytes: int = _SCAN_CHUNK,
        redact_keys: frozenset[str] = DEFAULT_REDACT_KEYS,
        rotate_bytes: int = DEFAULT_ROTATE_BYTES,
        rotate_daily: bool = True,
        retention_files: int = DEFAULT_RETENTION_FILES,
        keep_context: KeepContext = keep_none,
    ):
        self.path = Path(path)
        self.keep_context = keep_context  # which configs keep request context values (privacy.py)
        self.rotate_bytes = max(0, int(rotate_bytes or 0))
        self.rotate_daily = rotate_daily
        self.retention_files = retention_files
        self.redact_keys = frozenset(k.lower() for k in redact_keys)
        self.fsync = fsync
        self.clock = clock
        self._scan_chunk = max(64, scan_chunk_bytes)
        self._buf: list[bytes] = []
        self._last = 0  # the sequence of the last line taken (written or in _buf)
        self._written = 0  # the sequence of the last line written
        self._resume_time: float | None = None
        self._lock: asyncio.Lock | None = None
        self._fd: int | None = None
        self._lock_fd: int | None = None
        self._size = 0
        self._day: str | None = None  # UTC day of the live file's first line
        self._rotate_retry_at = 0.0
        self._today = ("", 0.0, 0.0)  # the UTC day of the last write, and its bounds (POSIX time)
        self._bg: set[asyncio.Task] = set()
        self._compress_lock: asyncio.Lock | None = None
        self.lines_written = 0
        self.duplicates_skipped = 0
        self.batches = 0
        self.repaired_bytes = 0
        self.rotations = 0
        self.compress_errors = 0

    # ------------------------------------------------------------------ position
    def position(self) -> int:
        """The stream sequence of the last line taken (0: none yet)."""
        return self._last

    @property
    def written_seq(self) -> int:
        """The stream sequence of the last line written to the file."""
        return self._written

    def start_time(self) -> float | None:
        """With no position but lines in the file (written before lines had a ``seq``): when
        the last one was written, to read the stream from there. None otherwise."""
        return self._resume_time if self._last == 0 else None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        if self._fd is not None:
            return
        await asyncio.to_thread(self._open)
        self._compress_lock = asyncio.Lock()
        self._lock = asyncio.Lock()

    async def close(self) -> None:
        """Write what was taken, close the file, finish compressing."""
        if self._fd is None:
            await self.wait_compressed()
            return
        try:
            await self.flush()
        except SinkError as e:
            log.error("telemetry sink: closing with lines not written (they are read again on start): %s", e)
        fd, self._fd = self._fd, None
        if self.fsync:
            try:
                os.fsync(fd)
            except OSError:
                pass
        os.close(fd)
        self._unlock()
        await self.wait_compressed()

    def _unlock(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)  # closing the descriptor releases the lock

    async def wait_compressed(self) -> None:
        """Wait until every rotated file handed over so far is compressed (or failed)."""
        while self._bg:
            await asyncio.gather(*list(self._bg), return_exceptions=True)

    # ------------------------------------------------------------------ writing
    def add(self, seq: int, line: bytes) -> bool:
        """Take the line of stream sequence ``seq`` (ending in a newline) to be written by the
        next :meth:`flush`; False (and nothing taken) when ``seq`` is at or below the position."""
        if seq <= self._last:
            self.duplicates_skipped += 1
            return False
        self._buf.append(line)
        self._last = seq
        return True

    @property
    def pending(self) -> int:
        """Lines taken and not yet written."""
        return len(self._buf)

    async def flush(self) -> None:
        """Write every line taken so far, in one write (after a rotation when one is due)."""
        lock = self._lock
        if self._fd is None or lock is None:
            if self._buf:
                raise SinkError(f"sink {self.path} is not open")
            return
        async with lock:
            if not self._buf:
                return
            buf, self._buf = self._buf, []
            last = self._last
            data = b"".join(buf)
            rotated: list[Path] = []
            try:
                if self.fsync:
                    await asyncio.to_thread(self._write_batch, data, rotated)
                else:
                    self._write_batch(data, rotated)
            except Exception as e:
                # Lines taken meanwhile follow the failed ones: they go too, so no gap is left.
                dropped = len(buf) + len(self._buf)
                self._buf = []
                self._last = self._written
                log.error("telemetry sink: writing %d lines to %s failed: %s", len(buf), self.path, e)
                raise SinkError(f"writing to {self.path} failed ({dropped} lines to read again): {e}") from e
            finally:
                for plain in rotated:
                    self._compress_later(plain)
            self._written = last
            self.lines_written += len(buf)
            self.batches += 1

    async def write(self, event: CloudEvent, seq: int | None = None) -> bool:
        """Add the line of ``event`` as stream sequence ``seq`` (default: the next one) and
        flush; False when ``seq`` is at or below the position. For tools and tests: the
        service goes through :mod:`services.telemetry.mirror`."""
        if self._fd is None:
            raise SinkError(f"sink {self.path} is not open")
        seq = self._last + 1 if seq is None else seq
        if not self.add(
            seq, encode_seq_line(seq, event, now_rfc3339(self.clock()), self.redact_keys, self.keep_context)
        ):
            return False
        await self.flush()
        return True

    def _write_batch(self, data: bytes, rotated: list[Path]) -> None:
        """Rotate first if needed (the renamed file goes into ``rotated``), then append."""
        now = self.clock()
        if self._size > 0 and now >= self._rotate_retry_at:
            day = self._utc_day(now)
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
            self._day = self._utc_day(now)

    def _utc_day(self, now: float) -> str:
        """rotation.utc_day(now), formatted once per day: POSIX time has no leap seconds, so a
        UTC day is [k * 86400, (k + 1) * 86400)."""
        day, start, end = self._today
        if not start <= now < end:
            start = (now // 86400) * 86400
            day, end = rotation.utc_day(now), start + 86400
            self._today = (day, start, end)
        return day

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

    def _take_file_lock(self) -> None:
        """One writer per file: an exclusive lock on ``<file>.lock`` (released by the kernel when
        the process ends, even by ``kill -9``). A second sink on the same file refuses to start."""
        fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise SinkError(
                f"another telemetry sink writes {self.path}: each instance needs a file of its own "
                "(CHORA_HOME or CHORA_TELEMETRY_PATH)"
            ) from None
        self._lock_fd = fd

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._take_file_lock()
        # A crash may have left a rotated file uncompressed or a half-written .gz.tmp.
        rotation.recover(self.path, fsync=self.fsync)
        rotation.apply_retention(self.path, self.retention_files)
        try:
            fd = self._create()
        except BaseException:
            self._unlock()
            raise
        try:
            size = self._repair(fd, os.fstat(fd).st_size)
            self._day = self._first_day(size)
            self._load_position(size)
        except BaseException:
            os.close(fd)
            self._unlock()
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

    def _load_position(self, size: int) -> None:
        """The position is the ``seq`` of the last readable line: of the live file, else of the
        newest rotated file that has one."""
        with open(self.path, "rb") as f:
            found = self._last_line_position(_tail_lines(f, size, self._scan_chunk))
        if found is None:
            for r in reversed(rotation.list_rotated(self.path)):
                try:
                    with rotation.open_lines(r.path) as f:
                        found = self._last_line_position(_all_lines_reversed(f))
                except (OSError, EOFError) as e:
                    log.warning("telemetry sink: could not read %s: %s", r.path, e)
                    continue
                if found is not None:
                    break
        if found is None:
            return
        if found.seq is not None:
            self._last = self._written = found.seq
            log.info("telemetry sink: %s goes on after stream sequence %d", self.path, found.seq)
            return
        try:
            self._resume_time = _dt.datetime.fromisoformat(found.timestamp or "").timestamp()
        except ValueError:
            self._resume_time = None
        log.warning(
            "telemetry sink: the last line of %s has no seq (written by an older sink): reading the stream from %s",
            self.path,
            found.timestamp,
        )

    @staticmethod
    def _last_line_position(lines_newest_first) -> _Position | None:
        bad = 0
        for line in lines_newest_first:
            if not line.strip():
                continue
            try:
                return _position_decoder.decode(line)
            except msgspec.DecodeError:
                bad += 1
                if bad == 1:
                    log.warning("telemetry sink: an unreadable line near the end of the file is skipped")
        return None


def _tail_lines(f, size: int, chunk: int):
    """The complete lines of a file of ``size`` bytes, last first, read backwards by chunks."""
    pos = size
    carry = b""
    while pos > 0:
        n = min(chunk, pos)
        pos -= n
        f.seek(pos)
        buf = f.read(n) + carry
        parts = buf.split(b"\n")
        carry = parts[0] if pos > 0 else b""
        for line in reversed(parts[1:] if pos > 0 else parts):
            yield line
    if carry:
        yield carry


def _all_lines_reversed(f):
    """The lines of a (decompressed) file object, last first: it is read through, keeping only
    the last chunk's worth of lines."""
    tail: list[bytes] = []
    carry = b""
    while True:
        buf = f.read(_SCAN_CHUNK)
        if not buf:
            break
        parts = (carry + buf).split(b"\n")
        carry = parts.pop()
        if parts:
            tail = parts
    if carry:
        tail.append(carry)
    return reversed(tail)
