"""How long a finished batch's results are kept: the results TTL.

When the assembler reads a batch's ``batch_completed`` back from the stream (the record is
marked finished, :func:`services.assembler.handlers.on_announced`), it calls
:func:`keep_batch_results`, which

1. writes every item outcome (``batch.<id>.item.<n>``) again with a per-message TTL of
   ``results_ttl_s`` (``Nats-TTL``: the server removes them when it runs out; one pipelined
   write per item, nothing polls or sweeps), then
2. sets ``results_expire_at`` on the batch record (compare-and-set). Readers
   (:func:`composition.batch_records.read_batch_page`: `chora batch results`, the gateway)
   answer "expired" from that moment, whatever of the items is still on its way out.

The record itself keeps no TTL: it lives as long as the bucket keeps it (the stream's max
age), as long as its request can still be delivered, so that a redelivered request is
recognised and not run again; it is a few hundred bytes. Done in this order, a crash in
between is redone on the completion's redelivery (step 2 not done yet); once step 2 is done,
the function does nothing more.

A bucket whose stream does not allow message TTLs (created before nats-server 2.11 / by an
old client) refuses step 1: the results are then kept until the bucket's max age, and a
warning says so; the completion is not retried for it.
"""

from __future__ import annotations

import logging
from typing import Any

from services.assembler.state import batch_item_prefix, batch_key, decode_batch, encode

log = logging.getLogger("chora.assembler")

MAX_ATTEMPTS = 20  # compare-and-set rounds on the record (other writers are rare once it is finished)


async def keep_batch_results(batch_id: str, deps: Any) -> bool:
    """Give the finished batch ``batch_id``'s results their TTL (``deps.results_ttl_s``; None:
    keep them until the bucket's max age). True when this call set it."""
    ttl = deps.results_ttl_s
    if ttl is None:
        return False
    state, key = deps.state, batch_key(batch_id)
    got = await state.get(key)
    if got is None or decode_batch(got[0]).results_expire_at is not None:
        return False
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
        record.results_expire_at = deps.clock() + ttl
        if await state.update(key, encode(record), revision) is not None:
            return True
        got = await state.get(key)
        if got is None:
            return False
    log.warning("batch %s: its record kept changing; results_expire_at not set", batch_id)
    return False
