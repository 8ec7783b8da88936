"""The generator's part in the saga: undo a run's effects, and follow the stopped runs.

``chora.compensation.requested`` (durable ``generator-compensations``) lists the
effects a run's generations had, in the order to undo them (the reverse of the
order they were made): result cache entries this generator wrote for the run, and
content stored by reference in the Object Store. The handler removes each
(removing what is already gone changes nothing, so a redelivery redoes it
harmlessly) and answers with one ``chora.effects_compensated`` whose id is fixed
by the request's (:func:`composition.runs.undone_id`): a redone compensation is a
duplicate JetStream drops. That fact is also the compensating notification: a
webhook subscription may take it like any other event (docs/saga.md).

:class:`StoppedRuns` keeps the set of cancelled or timed-out runs in memory from
a follow of their markers (``cancelled.<kind>.<run>`` in the state bucket), so that the
request handler checks a set, not the KV store, before rendering. The early markers of
cancels of runs not known yet (``cancelled.early.<kind>.<run>``) are not followed: such a
run is closed by its own request before any generation is asked for.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

from composition.runs import MARKERS, run_token, undone_id
from contracts.catalogue import COMPENSATION_REQUESTED, EFFECTS_COMPENSATED
from contracts.envelope import CloudEvent, new_event
from contracts.events import CompensationRequested, Effect, EffectsCompensated
from contracts.handling import Delivery, Retry, expect

log = logging.getLogger("chora.generator")


class Undo(Protocol):
    """What undoing needs: the result cache's and the Object Store's removals."""

    async def remove_cache_entry(self, key: str) -> None: ...
    async def remove_content(self, ref: str) -> None: ...


class BusUndo:
    """:class:`Undo` over the bus's cache store and content store."""

    def __init__(self, cache: Any, content: Any):
        self.cache, self.content = cache, content

    async def remove_cache_entry(self, key: str) -> None:
        if self.cache is not None:
            await self.cache.remove(key)

    async def remove_content(self, ref: str) -> None:
        if self.content is not None:
            await self.content.delete(ref)


WINDOW = 64  # effects undone at once (each is one or two KV / Object Store round trips)


async def on_compensation_requested(event: CloudEvent, delivery: Delivery, deps: Any) -> list[CloudEvent]:
    """Undo the listed effects in their order, a window of :data:`WINDOW` at a time (the
    effects of different items are independent; one item's are undone in order)."""
    data = expect(event, COMPENSATION_REQUESTED, CompensationRequested, "generator")
    undo: Undo | None = deps.undo
    done: list[str] = []
    failed: list[str] = []

    async def undo_one(effect: Effect) -> Exception | None:
        try:
            if undo is not None:
                if effect.cache_key:
                    await undo.remove_cache_entry(effect.cache_key)
                if effect.content_ref:
                    await undo.remove_content(effect.content_ref)
        except Exception as e:  # the store is in trouble
            return e
        return None

    effects = data.effects
    for start in range(0, len(effects), WINDOW):
        window = effects[start : start + WINDOW]
        for effect, error in zip(window, await asyncio.gather(*(undo_one(e) for e in window))):
            if error is None:
                done.append(effect.key)
                continue
            if not delivery.last:  # try the whole request again later: undoing twice is undoing once
                raise Retry(f"compensating {data.kind} {data.id}: {type(error).__name__}: {error}")
            log.warning("compensating %s %s: %s failed for good: %s", data.kind, data.id, effect.key, error)
            failed.append(effect.key)
    fact = EffectsCompensated(
        kind=data.kind, id=data.id, chunk=data.chunk, chunks=data.chunks, compensated=done, failed=failed
    )
    return [new_event(EFFECTS_COMPENSATED, fact, source=deps.source, cause=event, event_id=undone_id(event.id))]


class StoppedRuns:
    """The key tokens of stopped runs (a set, shared with the request handler), kept current by
    following their markers. The first follow reads every current marker. The follow is made
    again every :attr:`REFRESH_S` seconds (a follow lost with a server restart is replaced),
    from the last stream sequence it saw: a refresh reads only the markers written since, not
    all of them again (``python -m bench.markers``: 100,000 markers took 1.9-2.4 s of the
    loop's CPU to read, a refresh with 100 new ones 4-6 ms).

    Best effort: while no follow runs the set only misses runs, and a request of a missed run
    is rendered as before (its outcome is not counted). The set only grows while the process
    runs: one short string per stopped run."""

    REFRESH_S = 30.0
    RETRY_S = 5.0

    def __init__(self, runs: set[str]):
        self.runs = runs
        self.seen_seq = 0  # the highest stream sequence of a marker followed: the next follow starts after it
        self._task: asyncio.Task | None = None
        self._sub: Any = None

    def _changed(self, key: str, present: bool, seq: int) -> None:
        if seq > self.seen_seq:
            self.seen_seq = seq
        token = run_token(key)
        if token is not None and present:
            self.runs.add(token)

    def start(self, state: Any) -> None:
        if state is not None and hasattr(state, "follow"):
            self._task = asyncio.create_task(self._follow(state))

    async def _follow(self, state: Any) -> None:
        while True:
            try:
                sub = await state.follow(MARKERS, self._changed, after_seq=self.seen_seq)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("cannot follow the stopped runs (retrying in %.0fs): %s", self.RETRY_S, e)
                await asyncio.sleep(self.RETRY_S)  # a retry pause, not a synchronisation
                continue
            await self._drop()
            self._sub = sub
            await asyncio.sleep(self.REFRESH_S)  # the refresh period

    async def _drop(self) -> None:
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception:  # the connection is gone or going: the server drops the consumer
                pass
            self._sub = None

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._drop()
