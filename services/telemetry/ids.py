"""The sink's memory of the event ids it has written (see :mod:`services.telemetry.sink`,
"Exactly one line per event id"): 16-byte digests in a bounded set, and reading them
back from written (possibly gzipped) JSONL files."""

from __future__ import annotations

import collections
import hashlib
import logging
from pathlib import Path

import msgspec

from services.telemetry import rotation

log = logging.getLogger("chora.telemetry")


class _IdOnly(msgspec.Struct):
    """Decodes just the id of a stored line (every other key is skipped)."""

    event_id: str


_id_decoder = msgspec.json.Decoder(_IdOnly)


def id_key(event_id: str) -> bytes:
    """The remembered form of an event id: a 128-bit digest (collisions are not a concern)."""
    return hashlib.blake2b(event_id.encode("utf-8", "surrogatepass"), digest_size=16).digest()


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


def ids_of_file(path: Path, chunk: int) -> list[bytes]:
    """Keys of every line of a (possibly gzipped) file, oldest first."""
    keys: list[bytes] = []
    bad = 0
    carry = b""
    with rotation.open_lines(path) as f:
        while True:
            buf = f.read(max(chunk, 1 << 16))
            if not buf:
                break
            buf = carry + buf
            nl = buf.rfind(b"\n")
            if nl < 0:
                carry = buf
                continue
            carry = buf[nl + 1 :]
            k, b = ids_of(buf[: nl + 1])
            keys.extend(k)
            bad += b
    if carry.strip():
        k, b = ids_of(carry)
        keys.extend(k)
        bad += b
    if bad:
        log.warning("telemetry sink: %d unreadable lines in %s were skipped", bad, path)
    return keys


def ids_of(buf: bytes) -> tuple[list[bytes], int]:
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
