"""The assembler: artifacts and batches, the only stateful service.

``chora.artifact.requested`` and ``chora.batch.requested`` become generation
requests (``origin`` = the artifact run or batch, and the part id or item
index); their outcomes are collected in JetStream KV, and exactly one
``chora.artifact_assembled`` / ``chora.batch_completed`` announces the end.

State (see :mod:`.state`): one small record per batch (``batch.<id>``: total,
counters, started_at, a bitmap of the items that have an outcome, ``closed``
with ``closed_by``, ``finished``) and per artifact run (``artifact.<run>``: the
plan frozen at request time and each part's status), changed only by
compare-and-set; item outcomes and part contents in keys of their own, put
*before* the compare-and-set that counts them. Within one process the
updates of a record are serialised and folded (group commit: 256 outcomes of
one batch arriving together cost a handful of writes, not 256 fights over
one key); a compare-and-set lost to another instance re-reads and re-folds.

Exactly once, with any number of instances and a kill -9 anywhere
------------------------------------------------------------------

What it rests on:

1. The consumer loop acknowledges a message only after the events its handler
   returned are stored (PubAcks received). A message not acknowledged is
   delivered again (after ``ack_wait``, 30 s, or a nak), to any instance.
2. Every event the assembler publishes has an id fixed by what it *is*:
   uuid5 of (batch id, item index), (run id, part id), (batch id,
   "completed"), (run id, "assembled"). JetStream drops a publish whose id it
   stored within the duplicate window (2 minutes).
3. A record changes only by compare-and-set, and every change is idempotent
   and happens once: setting an item's bit that is set, or settling a part
   that is settled, changes nothing; counters move only with a bit going
   from 0 to 1. The one write that sets ``closed`` also records
   ``closed_by``: the id of the event whose handling closed it (the outcome
   that filled the bitmap, or the first failure when ``continue_on_error`` is
   false; for artifacts the outcome that settled the last part or failed a
   required one; the request itself when it was refused before any work).
4. Only that event announces: its handler returns the completion, and so does
   every later delivery *of that same event* while the record is not
   ``finished``. Nothing else ever announces.
5. ``finished`` is set by a second durable consumer of the assembler,
   ``assembler-completions``, when it reads the completion back *from the
   stream*: finished means "stored", not "about to be published".

A kill -9 of the instance handling the event X that closes a batch:

- before X's item outcome is put: nothing happened; X is redelivered.
- between the put and the compare-and-set: the item key exists, its bit does
  not; X is redelivered, the put is repeated (same value), the bit is set
  then. If the batch stopped meanwhile, the bitmap decides: X is "skipped",
  never counted (the completion lists items from the bitmap, not the keys).
- between the compare-and-set (``closed_by`` = X) and the publish: X is
  redelivered; its bit is set, so this is a duplicate; a fresh read shows
  ``closed_by`` = X and not finished: the completion is announced.
- between the publish and the ack: the same, and the second publish, 30 s
  later, falls in the duplicate window and is dropped (usually the record is
  already finished and nothing is even re-published).
- between the ack and ``finished``: X is gone, nobody announces; the
  completions consumer's message is redelivered and sets ``finished``.
- any other outcome's handler: cases 1 and 2 only; it is not ``closed_by``,
  so it never announces.
- the ``batch.requested`` handler: before the record is created, the
  redelivery starts afresh; after, the redelivery finds the record and
  resumes: it re-publishes the requests of the items without an outcome
  (same ids: the ones already stored are dropped as duplicates).

Two instances: their compare-and-sets serialise; a bit is set once, a batch
is closed once, by one event. When both handle the same message (its
ack_wait expired while the first was still on it), one sets the bit and the
other sees a duplicate; both may then announce, under the same id, within
seconds: one copy is stored. Artifacts follow the same rules with parts
instead of bits; the requests of the parts a settled part made ready carry
``requested_by`` = that event and are re-published on its redelivery.

The one limit is the duplicate window. A redelivery of X more than 2
minutes after X's completion was published (X died between publish and ack
and no instance ran for over 90 s) could store a second copy; so a
re-announcement of a completion decided more than (window - ack_wait) ago
waits (nak, 5 s) for the completions consumer (which restarts with the
instance) to find the stored one and set ``finished``, and only on its last
delivery announces anyway: a second copy is preferred to none.

Cancel, deadlines and compensation (:mod:`.saga`, docs/saga.md)
---------------------------------------------------------------

They add closing events and one announcing step, under the same rules:

- a ``cancel.requested``, or the run's own ``deadline.requested`` timer when due,
  closes an open run by compare-and-set with a closed reason (``outcome``
  cancelled / timed_out) and becomes ``closed_by``; a closed run ignores it. The
  stopped-run marker ``cancelled.<kind>.<run>`` is put first (the generator skips the
  run's requests). A cancel that arrives before its request leaves the early marker
  ``cancelled.early.<kind>.<run>`` (not followed by the generator), and the request's
  handler, which reads both markers after creating the record, closes the run itself
  (``closed_by`` = the request) before asking for any generation.
- who announces is :func:`.saga_ops.announcer`: the closing event, which (for a
  run that ended badly) first fixes the compensation plan once and publishes
  the ``compensation.requested`` events, re-publishing them on each redelivery
  under the same ids while they wait; then the completion, by the closing event
  if there was nothing to undo, else by the ``effects_compensated`` whose count
  completed the plan (``compensated_by``), again on each of its redeliveries.
- ``finished`` is still set only by the completions consumer.
"""
