"""A batch's state record as readers see it: keys, the record, progress and lookup.

The assembler writes these records (``services/assembler/state.py`` re-exports them);
the CLI (`chora batch status`) and the gateway (``GET /v1/batches/{id}``) read them.
They live here, one layer down, so that readers need not import the assembler.
Reading takes any store with ``get(key)`` and ``matching(pattern)`` (the bus's
:class:`bus.state.StateStore`): nothing here touches NATS.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Protocol

import msgspec

from composition.keys import key_id
from contracts.events import BatchItemOutcome


def batch_key(batch_id: str) -> str:
    return f"batch.{key_id(batch_id)}"


def batch_item_prefix(batch_id: str) -> str:
    return f"{batch_key(batch_id)}.item"


def batch_item_key(batch_id: str, index: int) -> str:
    return f"{batch_item_prefix(batch_id)}.{index}"


class BatchRecord(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One batch: counters and the bitmap of items that have an outcome."""

    v: int = 1
    total: int
    started_at: float
    continue_on_error: bool = True
    successful: int = 0
    failed: int = 0
    bitmap: bytes = b""
    closed: bool = False  # the outcome is decided: every item has one, or the batch stopped on an error
    closed_at: float | None = None
    closed_by: str | None = None  # id of the event whose update closed the batch: it announces the completion
    stopped_by_index: int | None = None  # continue_on_error false: the failed item that stopped the batch
    finished: bool = False  # the batch_completed is in the stream (set by the completions consumer)
    # when the item outcomes expire (set once finished: services/assembler/retention.py); past it
    # readers answer "expired", and the item records are gone (per-message TTL)
    results_expire_at: float | None = None
    # the saga (docs/saga.md): a cancel or the deadline closes it; a stopped, cancelled or timed-out
    # batch has its items' effects undone before its completion is announced
    outcome: str | None = None  # cancelled | timed_out: how it was stopped (None: it ran or stopped on an error)
    deadline_at: float | None = None
    compensation: int | None = None  # compensation requests planned once closed (None: not yet; 0: none)
    compensated: list[int] = []  # the requests (chunks) whose effects_compensated was counted
    compensated_at: float | None = None
    compensated_by: str | None = None  # the effects_compensated that completed it: it announces

    @property
    def done(self) -> int:
        """Items with an outcome (each set bit counted one of the two counters)."""
        return self.successful + self.failed

    @property
    def skipped(self) -> int:
        return self.total - self.done if self.closed else 0


_dec_batch = msgspec.msgpack.Decoder(BatchRecord)
_dec_item = msgspec.msgpack.Decoder(BatchItemOutcome)


def decode_batch(raw: bytes) -> BatchRecord:
    return _dec_batch.decode(raw)


def decode_item(raw: bytes) -> BatchItemOutcome:
    return _dec_item.decode(raw)


class Readable(Protocol):
    """What reading needs of a KV store (:class:`bus.state.StateStore` is one)."""

    async def get(self, key: str) -> tuple[bytes, int] | None: ...
    async def matching(self, pattern: str, timeout: float = 30.0) -> dict[str, bytes]: ...


class BatchLookupError(Exception):
    """No batch has that id or id prefix, or more than one does."""


class ResultsExpired(BatchLookupError):
    """The batch finished longer ago than the results TTL: its item outcomes are gone."""


def results_expired(r: BatchRecord, now: float | None = None) -> bool:
    return r.results_expire_at is not None and (time.time() if now is None else now) >= r.results_expire_at


def batch_progress(batch_id: str, r: BatchRecord) -> dict[str, Any]:
    """A batch's progress, as `chora batch status` and the gateway show it."""
    return {
        "batch_id": batch_id,
        "total": r.total,
        "done": r.successful + r.failed,
        "successful": r.successful,
        "failed": r.failed,
        "skipped": r.skipped,
        "closed": r.closed,
        "finished": r.finished,
        "outcome": r.outcome,
        "continue_on_error": r.continue_on_error,
        "started_at": r.started_at,
        "elapsed_s": round((r.closed_at or time.time()) - r.started_at, 3),
        "results_expire_at": r.results_expire_at,  # set once finished: the results TTL
    }


async def read_batch_status(state: Readable, batch_id: str) -> dict[str, Any] | None:
    """The progress of the batch with exactly this id, or None if it has no record."""
    got = await state.get(batch_key(batch_id))
    return None if got is None else batch_progress(batch_id, decode_batch(got[0]))


async def read_batch_item(state: Readable, batch_id: str, index: int) -> BatchItemOutcome | None:
    """The outcome of item ``index``, or None while it has none."""
    got = await state.get(batch_item_key(batch_id, index))
    return None if got is None else decode_item(got[0])


# A page of more item indexes than this is read with one ordered consumer (every item of the
# batch), not one KV get per index.
_GETS_PER_PAGE = 256


async def read_batch_page(
    state: Readable, batch_id: str, r: BatchRecord, cursor: int = 0, limit: int | None = None
) -> dict[str, Any]:
    """Item outcomes ``cursor`` .. ``cursor + limit`` (all from ``cursor`` when ``limit`` is
    None) of the batch whose record is ``r``: ``{batch_id, total, cursor, next_cursor, items}``,
    each item an outcome's fields, or ``{index, status: skipped | pending}`` while it has none;
    ``next_cursor`` is None at the end. :class:`ResultsExpired` past the results TTL.
    `chora batch results` and the gateway (HTTP, MCP) both read through here."""
    if results_expired(r):
        raise ResultsExpired(
            f"the results of batch {batch_id} have expired: they are kept for the results TTL after it finished"
        )
    stop = r.total if limit is None else min(r.total, cursor + limit)
    indexes = range(cursor, max(cursor, stop))
    outcomes: dict[int, BatchItemOutcome]
    if len(indexes) > _GETS_PER_PAGE:
        prefix = batch_item_prefix(batch_id)
        raw = await state.matching(f"{prefix}.*")
        outcomes = {}
        for k, v in raw.items():
            token = k.rsplit(".", 1)[1]
            if token.isdigit() and int(token) in indexes:
                outcomes[int(token)] = decode_item(v)
    else:
        got = await asyncio.gather(*(read_batch_item(state, batch_id, i) for i in indexes))
        outcomes = {i: o for i, o in zip(indexes, got) if o is not None}
    items: list[dict[str, Any]] = []
    for i in indexes:
        o = outcomes.get(i)
        if o is not None:
            items.append(msgspec.to_builtins(o))
        else:
            items.append({"index": i, "status": "skipped" if r.closed else "pending"})
    end = indexes.stop
    return {
        "batch_id": batch_id,
        "total": r.total,
        "cursor": cursor,
        "next_cursor": end if end < r.total else None,
        "items": items,
    }


async def find_batch(state: Readable, batch_id: str) -> tuple[str, bytes]:
    """(full batch id, its record) for ``batch_id`` or an unambiguous prefix of it (the
    8 characters the progress bar shows); :class:`BatchLookupError` says why not."""
    got = await state.get(batch_key(batch_id))
    if got is not None:
        return batch_id, got[0]
    if not batch_id or "." in batch_id or "*" in batch_id or ">" in batch_id:
        raise BatchLookupError(f"no batch {batch_id} (unknown, or expired)")
    records = await state.matching("batch.*")
    hits = sorted((k.split(".", 1)[1], v) for k, v in records.items() if k.split(".", 1)[1].startswith(batch_id))
    if not hits:
        raise BatchLookupError(f"no batch {batch_id} (no batch id starts with it; unknown, or expired)")
    if len(hits) > 1:
        shown = ", ".join(h[0] for h in hits[:10]) + (f" and {len(hits) - 10} more" if len(hits) > 10 else "")
        raise BatchLookupError(
            f"{batch_id} is ambiguous: {len(hits)} batches start with it ({shown}); give more characters"
        )
    return hits[0]
