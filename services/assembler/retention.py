"""How long a finished batch's results are kept: the results TTL.

When the assembler reads a batch's ``batch_completed`` back from the stream (the record is
marked finished, :func:`services.assembler.handlers.on_announced`), it calls
:func:`keep_batch_results`, which sets ``results_expire_at`` on the batch record (one
compare-and-set). Readers (:func:`composition.batch_records.read_batch_page`: `chora batch
results`, the gateway, MCP) answer "expired" from that moment. The item records
(``batch.<id>.item.<n>``) go by themselves, nothing polls or sweeps:

- Every item record was written after the batch started, so the bucket's max age (the
  stream's) removes none before ``started_at + max_age``. When the TTL reaches that far
  (the default: both are 7 days) the results expire then, and nothing more is written.
- A shorter TTL (``CHORA_BATCH_RESULTS_TTL_S``) is kept exactly: every item record is
  written again with a per-message TTL (``Nats-TTL``; the server removes it when it runs
  out), pipelined, before the record says when they expire. This costs one write per item
  (bench/results_ttl.py: about 2,000 to 20,000 items/s on the 2-core VM, by its load).

The record itself keeps no TTL: it lives as long as the bucket keeps it, as long as its
request can still be delivered, so that a redelivered request is recognised and not run
again; it is a few hundred bytes. A crash between the writes and the record's update is
redone on the completion's redelivery; once the record has ``results_expire_at`` this does
nothing more.

A bucket whose stream does not allow message TTLs (provisioning lets the state bucket take
them: :func:`bus.topology.allow_msg_ttl`) refuses the writes: the results are then kept
until the bucket's max age, and a warning says so; the completion is not retried for it.
"""

from __future__ import annotations

import logging
from typing import Any

from services.assembler.state import batch_item_prefix, batch_key, decode_batch, encode

log = logging.getLogger("chora.assembler")

MAX_ATTEMPTS = 20  # compare-and-set rounds on the record (other writers are rare once it is finished)


async def keep_batch_results(batch_id: str, deps: Any) -> bool:
    """Give the finished batch ``batch_id``'s results their TTL (``deps.results_ttl_s``; None:
    keep them until the bucket's max age, ``deps.state_max_age_s``). True when this call set it."""
    ttl = deps.results_ttl_s
    if ttl is None:
        return False
    state, key = deps.state, batch_key(batch_id)
    got = await state.get(key)
    first = decode_batch(got[0]) if got is not None else None
    if got is None or first is None or first.results_expire_at is not None:
        return False
    expire_at = deps.clock() + ttl
    max_age = deps.state_max_age_s
    natural = first.started_at + max_age if max_age else None
    if natural is not None and expire_at >= natural:
        expire_at = natural  # the bucket's max age takes the items then: no write needed
    else:
        try:
            await state.put_many(await state.items(batch_item_prefix(batch_id)), ttl)
        except Exception as e:  # noqa: BLE001 - keeping them longer is the safe side
            log.warning("batch %s: its results keep no TTL (kept until the bucket's max age): %s", batch_id, e)
            return False
    for _ in range(MAX_ATTEMPTS):
        raw, revision = got
        record = decode_batch(raw)
        if record.results_expire_at is not None:
            return False
        record.results_expire_at = expire_at
        if await state.update(key, encode(record), revision) is not None:
            return True
        got = await state.get(key)
        if got is None:
            return False
    log.warning("batch %s: its record kept changing; results_expire_at not set", batch_id)
    return False
