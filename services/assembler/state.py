"""The assembler's KV records, their keys and codecs, and the group committer.

Keys (in the state bucket; KV keys allow ``[-/_=.A-Za-z0-9]``):

- ``batch.<id>``                 :class:`BatchRecord`, updated with compare-and-set
- ``batch.<id>.item.<index>``    one :class:`~contracts.events.BatchItemOutcome`, written (put) before
                                 the bitmap update that counts it
- ``batch.<id>.spec``            the items' content config ids (zlib JSON), only for
                                 ``continue_on_error: false`` (skipped items are listed with them)
- ``artifact.<run>``             :class:`ArtifactRun`, updated with compare-and-set
- ``artifact.<run>.part.<part>`` :class:`PartContent` of a done part, written before the update
                                 that marks it done
- ``artifact.<run>.cache.<part>`` the result cache key a part's generation wrote (its effect, to
                                 undo if the run ends badly; see docs/saga.md)
- ``<batch.<id>|artifact.<run>>.comp.<chunk>`` the keys one compensation request undid (JSON list),
                                 written before the update that counts it

``<id>`` is the event id of the request when it is a safe key token, else a
hash of it (:func:`key_id`): a foreign producer may use any CloudEvent id.

Records are msgpack (msgspec): a 5,000-item batch record is about 700 bytes.

:class:`Committer` serialises the updates of one record within a process and
folds every update that queued up while the previous compare-and-set was in
flight into one (group commit); a lost compare-and-set (another instance
changed the record) re-reads and re-folds.
"""

from __future__ import annotations

import asyncio
import json
import logging
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Generic, Protocol, Sequence, TypeVar

import msgspec

# The batch records' readers (CLI, gateway) share these: they live a layer down, re-exported here.
from composition.batch_records import BatchRecord as BatchRecord
from composition.batch_records import batch_item_key as batch_item_key
from composition.batch_records import batch_item_prefix as batch_item_prefix
from composition.batch_records import batch_key as batch_key
from composition.batch_records import decode_batch as decode_batch
from composition.batch_records import decode_item as decode_item
from composition.keys import key_id as key_id
from composition.runs import artifact_key as artifact_key
from contracts.events import BatchItemOutcome, ErrorInfo

log = logging.getLogger("chora.assembler")


def batch_spec_key(batch_id: str) -> str:
    return f"{batch_key(batch_id)}.spec"


def part_key(run_id: str, part_id: str) -> str:
    return f"{artifact_key(run_id)}.part.{part_id}"


def part_cache_key(run_id: str, part_id: str) -> str:
    return f"{artifact_key(run_id)}.cache.{part_id}"


def comp_key(record_key: str, chunk: int) -> str:
    """Under a run's record key (``batch.<id>`` or ``artifact.<run>``): what compensation request ``chunk`` undid."""
    return f"{record_key}.comp.{chunk}"


# --------------------------------------------------------------------------- bitmaps


def new_bitmap(n: int) -> bytes:
    return bytes((n + 7) // 8)


def bit_is_set(bitmap: bytes | bytearray, i: int) -> bool:
    return bool(bitmap[i >> 3] & (1 << (i & 7)))


def set_bit(bitmap: bytearray, i: int) -> bool:
    """Set bit ``i``; True if it was not set before."""
    mask = 1 << (i & 7)
    if bitmap[i >> 3] & mask:
        return False
    bitmap[i >> 3] |= mask
    return True


def popcount(bitmap: bytes) -> int:
    return int.from_bytes(bitmap, "little").bit_count()


def unset_bits(bitmap: bytes, n: int) -> list[int]:
    """The indexes in ``range(n)`` whose bit is not set."""
    out = []
    for byte_i, b in enumerate(bitmap):
        if b == 0xFF:
            continue
        base = byte_i * 8
        for j in range(8):
            i = base + j
            if i < n and not b & (1 << j):
                out.append(i)
    return out


# --------------------------------------------------------------------------- records


class PartPlan(msgspec.Struct, kw_only=True, omit_defaults=True, frozen=True):
    id: str
    content_config_id: str
    context: dict[str, Any] = {}
    required: bool = True
    depends_on: list[str] = []


class PartState(msgspec.Struct, kw_only=True, omit_defaults=True):
    # pending -> requested -> done | failed | omitted  (failed: a required part; omitted: an optional one)
    status: str = "pending"
    requested_by: str | None = None  # id of the event whose handling requested it
    settled_by: str | None = None  # id of the event that made it terminal
    error: ErrorInfo | None = None


class ArtifactRun(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One artifact request: the plan (frozen at request time) and the state of each part."""

    v: int = 1
    run_id: str
    artifact_id: str
    started_at: float
    context: dict[str, Any] = {}  # artifact defaults < request context
    parts: list[PartPlan] = []  # composition order
    strategy: str = "concat"
    separator: str = "\n\n"
    layout: str | None = None
    layout_name: str = "<inline layout>"
    state: dict[str, PartState] = {}
    closed: bool = False
    closed_at: float | None = None
    closed_by: str | None = None
    status: str | None = None  # success | error | cancelled | timed_out, once closed
    failed_part: str | None = None
    error: ErrorInfo | None = None
    finished: bool = False  # the artifact_assembled is in the stream
    # the saga (docs/saga.md; the fields mean what they mean on a BatchRecord)
    settled: list[str] = []  # part ids in the order they were settled (compensation goes in reverse)
    outcome: str | None = None  # cancelled | timed_out
    deadline_at: float | None = None
    compensation: int | None = None
    compensated: list[int] = []
    compensated_at: float | None = None
    compensated_by: str | None = None

    def omitted(self) -> list[str]:
        return [p.id for p in self.parts if self.state[p.id].status == "omitted"]

    def plan(self, part_id: str) -> PartPlan | None:
        for p in self.parts:
            if p.id == part_id:
                return p
        return None


class StoredOutcome(BatchItemOutcome, kw_only=True, omit_defaults=True):
    """A batch item's outcome as stored under ``batch.<id>.item.<i>``: the outcome (readers
    decode it as a :class:`BatchItemOutcome`, ignoring the rest) and the effects its
    generation had, registered for compensation (docs/saga.md)."""

    cache_key: str | None = None
    content_ref: str | None = None


class PartContent(msgspec.Struct, kw_only=True, omit_defaults=True):
    content: str | None = None
    content_ref: str | None = None  # large content stays in the Object Store
    content_hash: str | None = None


_enc = msgspec.msgpack.Encoder()
_dec_run = msgspec.msgpack.Decoder(ArtifactRun)
_dec_part = msgspec.msgpack.Decoder(PartContent)
_dec_stored = msgspec.msgpack.Decoder(StoredOutcome)


def encode(record: msgspec.Struct) -> bytes:
    return _enc.encode(record)


def decode_run(raw: bytes) -> ArtifactRun:
    return _dec_run.decode(raw)


def decode_part(raw: bytes) -> PartContent:
    return _dec_part.decode(raw)


def decode_stored(raw: bytes) -> StoredOutcome:
    return _dec_stored.decode(raw)


def encode_spec(config_ids: Sequence[str]) -> bytes:
    return zlib.compress(json.dumps(list(config_ids), separators=(",", ":")).encode(), 6)


def decode_spec(raw: bytes) -> list[str]:
    return json.loads(zlib.decompress(raw))


# --------------------------------------------------------------------------- the group committer


class State(Protocol):
    """What the assembler needs of :class:`bus.state.StateStore`."""

    async def get(self, key: str) -> tuple[bytes, int] | None: ...
    async def create(self, key: str, value: bytes) -> int | None: ...
    async def update(self, key: str, value: bytes, revision: int) -> int | None: ...
    async def put(self, key: str, value: bytes) -> int: ...
    async def put_many(self, entries: dict[str, bytes], ttl_s: float) -> None: ...  # with a TTL each
    async def items(self, prefix: str) -> dict[str, bytes]: ...


R = TypeVar("R", bound=msgspec.Struct)
Op = TypeVar("Op")
Res = TypeVar("Res")

# fold(record, ops) -> (the new record, or None when nothing changed; one result per op)
Fold = Callable[[R, Sequence[Op]], tuple[R | None, list[Res]]]


class CommitConflict(Exception):
    """The record kept changing under us (many instances): retry the message later."""


@dataclass
class Committed(Generic[R, Res]):
    record: R
    result: Res


class Committer(Generic[R, Op, Res]):
    """Compare-and-set updates of one key, grouped.

    ``submit(op)`` queues ``op``; one task at a time reads the record (cached
    with its revision after the first read), applies *every* queued op with
    ``fold`` and writes the result with one ``update(key, value, revision)``.
    Ops that queue meanwhile go into the next round. A lost compare-and-set
    drops the cache and folds the same ops again on a fresh read, so an op is
    applied exactly once per successful write. ``fold`` must be pure: it gets
    a private copy of the record, which it may change and return.
    """

    MAX_ATTEMPTS = 50

    def __init__(self, state: State, key: str, decode: Callable[[bytes], R], fold: Fold):
        self.state, self.key, self.decode, self.fold = state, key, decode, fold
        self._cached: tuple[R, int] | None = None
        self._pending: list[tuple[Op, asyncio.Future]] = []
        self._task: asyncio.Task | None = None
        self.writes = 0  # successful updates (for tests and stats)
        self.conflicts = 0

    async def read(self, fresh: bool = False) -> R | None:
        """The record (the cached copy unless ``fresh``), or None if it does not exist."""
        if fresh or self._cached is None:
            got = await self.state.get(self.key)
            if got is None:
                self._cached = None
                return None
            self._cached = (self.decode(got[0]), got[1])
        return self._cached[0]

    def prime(self, record: R, revision: int) -> None:
        """Cache a record this process just created."""
        self._cached = (record, revision)

    @property
    def busy(self) -> bool:
        return bool(self._pending) or (self._task is not None and not self._task.done())

    async def submit(self, op: Op) -> Committed[R, Res]:
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._pending.append((op, fut))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())
        return await fut

    async def _run(self) -> None:
        while self._pending:
            group, self._pending = self._pending, []
            try:
                record, results = await self._commit([op for op, _ in group])
            except asyncio.CancelledError:
                for _, f in group:
                    if not f.done():
                        f.set_exception(CommitConflict("assembler stopping"))
                raise
            except Exception as e:  # noqa: BLE001 - handed to every waiter, who will be retried
                self._cached = None  # the write may have landed (a lost reply): read again next time
                for _, f in group:
                    if not f.done():
                        f.set_exception(e)
                continue
            for (_, f), res in zip(group, results):
                if not f.done():
                    f.set_result(Committed(record, res))

    async def _commit(self, ops: list[Op]) -> tuple[R, list[Res]]:
        for _ in range(self.MAX_ATTEMPTS):
            if self._cached is None:
                got = await self.state.get(self.key)
                if got is None:
                    raise KeyError(f"{self.key} does not exist")
                self._cached = (self.decode(got[0]), got[1])
            record, revision = self._cached
            new, results = self.fold(self.decode(encode(record)), ops)  # a private copy
            if new is None:
                return record, results
            rev = await self.state.update(self.key, encode(new), revision)
            if rev is not None:
                self._cached = (new, rev)
                self.writes += 1
                return new, results
            self.conflicts += 1
            self._cached = None  # another instance won: read again and fold again
        raise CommitConflict(f"{self.key}: {self.MAX_ATTEMPTS} compare-and-set attempts lost in a row")

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass


class Committers:
    """One :class:`Committer` per key, created on demand; idle ones are dropped beyond ``limit``."""

    def __init__(self, state: State, limit: int = 4096):
        self.state = state
        self.limit = limit
        self._by_key: dict[str, Committer] = {}

    def get(self, key: str, decode: Callable[[bytes], Any], fold: Fold) -> Committer:
        c = self._by_key.get(key)
        if c is None:
            if len(self._by_key) >= self.limit:
                self._evict()
            c = self._by_key[key] = Committer(self.state, key, decode, fold)
        return c

    def forget(self, key: str) -> None:
        c = self._by_key.get(key)
        if c is not None and not c.busy:
            del self._by_key[key]

    def _evict(self) -> None:
        for key in [k for k, c in self._by_key.items() if not c.busy][: max(1, self.limit // 4)]:
            del self._by_key[key]

    def __len__(self) -> int:
        return len(self._by_key)

    async def close(self) -> None:
        for c in list(self._by_key.values()):
            await c.close()
        self._by_key.clear()
