"""The JSONL mirror: one line per event id, written by group commit.

Line format (one JSON object per line, keys in this order)::

    timestamp    when the line was produced (RFC3339 UTC)
    event_time   the CloudEvent ``time``
    event_id     the CloudEvent ``id``
    trace_id     chora's trace id (``traceid`` extension)
    traceparent  W3C traceparent
    event_type   the CloudEvent ``type``
    source       the CloudEvent ``source``
    subject      the CloudEvent ``subject`` (only when set)
    status       ``data.status`` when the payload has one, else "ok"
    ...          the payload's own fields, flattened (``msgspec.to_builtins``):
                 ``error: {code, message}`` becomes ``error_code``/``error_message``,
                 ``content`` is dropped (it can be large; ``content_hash`` and
                 ``content_length`` stay, and are filled in when missing), and a
                 payload field whose name clashes with one above is kept as
                 ``data_<name>``.

Any event type is mirrored the same way: nothing here knows the catalogue.

Exactly one line per event id
-----------------------------
The sink remembers the ids it has written (as 16-byte BLAKE2b digests, to keep
memory low) and acknowledges an event it has already written without writing
it again. On :meth:`JsonlSink.start` the memory is rebuilt from the tail of the
existing file, so a restarted sink still recognises what it wrote before.

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
import collections
import hashlib
import logging
import os
import stat
import time
from pathlib import Path
from typing import Any, Callable

import msgspec

from contracts.envelope import CloudEvent, now_rfc3339

log = logging.getLogger("chora.telemetry")

DEFAULT_MAX_IDS = 1_000_000
_SCAN_CHUNK = 1 << 20

# Envelope keys of a line; a payload field with one of these names becomes data_<name>.
_HEAD_KEYS = frozenset(
    ("timestamp", "event_time", "event_id", "trace_id", "traceparent", "event_type", "source", "subject", "status")
)


class SinkError(Exception):
    """The line could not be written; the event must be redelivered."""


class _IdOnly(msgspec.Struct):
    """Decodes just the id of a stored line (every other key is skipped)."""

    event_id: str


_id_decoder = msgspec.json.Decoder(_IdOnly)
_encoder = msgspec.json.Encoder()


def id_key(event_id: str) -> bytes:
    """The remembered form of an event id: a 128-bit digest (collisions are not a concern)."""
    return hashlib.blake2b(event_id.encode("utf-8", "surrogatepass"), digest_size=16).digest()


# --------------------------------------------------------------------------- line format


REDACTED = "[REDACTED]"
DEFAULT_REDACT_KEYS = frozenset(
    {"password", "passwd", "secret", "token", "api_key", "apikey", "authorization", "access_token", "private_key"}
)


def redact(value: Any, keys: frozenset[str]) -> Any:
    """A copy of ``value`` with the value of every mapping key in ``keys`` (case-insensitive,
    at any depth) replaced by ``[REDACTED]``."""
    if isinstance(value, dict):
        return {k: REDACTED if isinstance(k, str) and k.lower() in keys else redact(v, keys) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, keys) for v in value]
    return value


def to_record(
    event: CloudEvent, timestamp: str | None = None, redact_keys: frozenset[str] = DEFAULT_REDACT_KEYS
) -> dict[str, Any]:
    """The JSON object mirrored for ``event`` (see the module docstring)."""
    data = msgspec.to_builtins(event.data) if event.data is not None else {}
    if redact_keys and isinstance(data, dict):
        data = {k: redact(v, redact_keys) if isinstance(v, (dict, list)) else v for k, v in data.items()}
    status = "ok"
    if isinstance(data, dict):
        s = data.get("status")
        if s is not None:
            status = s
    rec: dict[str, Any] = {
        "timestamp": timestamp or now_rfc3339(),
        "event_time": event.time,
        "event_id": event.id,
        "trace_id": event.traceid,
        "traceparent": event.traceparent,
        "event_type": event.type,
        "source": event.source,
    }
    if event.subject is not None:
        rec["subject"] = event.subject
    rec["status"] = status
    if not isinstance(data, dict):  # a payload that is not an object: keep it whole
        rec["data"] = data
        return rec
    for k, v in data.items():
        if k == "status":
            continue
        if k == "content":
            if isinstance(v, str):
                if "content_length" not in data:
                    rec["content_length"] = len(v)
                if "content_hash" not in data:
                    rec["content_hash"] = "sha256:" + hashlib.sha256(v.encode("utf-8", "surrogatepass")).hexdigest()
            continue
        if k == "error" and isinstance(v, dict):
            rec["error_code"] = v.get("code")
            rec["error_message"] = v.get("message")
            continue
        rec["data_" + k if k in _HEAD_KEYS else k] = v
    return rec


def encode_line(
    event: CloudEvent, timestamp: str | None = None, redact_keys: frozenset[str] = DEFAULT_REDACT_KEYS
) -> bytes:
    return _encoder.encode(to_record(event, timestamp, redact_keys)) + b"\n"


# --------------------------------------------------------------------------- remembered ids


class RecentIds:
    """A set that keeps only the ``maxlen`` most recently added keys."""

    __slots__ = ("maxlen", "_set", "_order")

    def __init__(self, maxlen: int):
        if maxlen < 1:
            raise ValueError("maxlen must be >= 1")
        self.maxlen = maxlen
        self._set: set[bytes] = set()
        self._order: collections.deque[bytes] = collections.deque()

    def __contains__(self, key: bytes) -> bool:
        return key in self._set

    def __len__(self) -> int:
        return len(self._set)

    def add(self, key: bytes) -> None:
        if key in self._set:
            return
        self._set.add(key)
        self._order.append(key)
        if len(self._order) > self.maxlen:
            self._set.discard(self._order.popleft())


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
    ):
        self.path = Path(path)
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
        self._wake: asyncio.Event | None = None
        self._flusher: asyncio.Task | None = None
        self._closing = False
        self.lines_written = 0
        self.duplicates_skipped = 0
        self.batches = 0
        self.repaired_bytes = 0

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
        self._closing = False
        self._wake = asyncio.Event()
        self._flusher = asyncio.create_task(self._flush_loop(), name=f"jsonl-flusher:{self.path.name}")

    async def flush(self) -> None:
        """Wait until every line enqueued so far is written (or failed)."""
        pending = [f for _, f in self._batch] + list(self._inflight.values())
        if pending:
            await asyncio.gather(*(asyncio.shield(f) for f in pending), return_exceptions=True)

    async def close(self) -> None:
        """Write what is pending, stop the flusher, close the file."""
        if self._fd is None:
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

    # ------------------------------------------------------------------ writing
    async def write(self, event: CloudEvent) -> bool:
        if self._fd is None or self._closing:
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
        line = encode_line(event, now_rfc3339(self.clock()), self.redact_keys)
        fut = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        self._buf.append(line)
        self._batch.append((key, fut))
        self._wake.set()
        # shield: a cancelled writer must not cancel the batch's future
        # (the line is written anyway, and duplicates may be waiting on it).
        await asyncio.shield(fut)
        return True

    async def _flush_loop(self) -> None:
        wake = self._wake
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
            try:
                if self.fsync:
                    await asyncio.to_thread(self._append, data)
                else:
                    self._append(data)
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
            # Lines enqueued while we were writing, or a close waiting: go round again.
            if self._buf or self._closing:
                wake.set()

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
    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            st = os.fstat(fd)
            if stat.S_IMODE(st.st_mode) != 0o600:
                os.fchmod(fd, 0o600)
            size = self._repair(fd, st.st_size)
            self._load_ids(size)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._size = size

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
                keys, nbad = _ids_of(buf)
                bad += nbad
                found.append(keys)
                count += len(keys)
        if bad:
            log.warning("telemetry sink: %d unreadable lines in %s were skipped", bad, self.path)
        keys_in_order = [k for chunk in reversed(found) for k in chunk]
        for k in keys_in_order[-limit:]:
            self._written.add(k)


def _ids_of(buf: bytes) -> tuple[list[bytes], int]:
    """Keys of the lines in ``buf`` (whole lines), oldest first, and the number of bad lines."""
    try:
        return [id_key(r.event_id) for r in _id_decoder.decode_lines(buf)], 0
    except msgspec.DecodeError:
        keys, bad = [], 0
        for line in buf.split(b"\n"):
            if not line.strip():
                continue
            try:
                keys.append(id_key(_id_decoder.decode(line).event_id))
            except msgspec.DecodeError:
                bad += 1
        return keys, bad
