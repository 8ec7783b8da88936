"""How far a durable consumer has got: has it handled every message up to a stream sequence?

A service that reads two consumers of one stream (e.g. the notifier: requests on one,
their outcomes on the other) knows that a request is stored before its outcome, but
not that the request's consumer has handled it by the time the outcome arrives: the
two are not ordered relative to each other. :meth:`ConsumerProgress.handled_through`
answers from the consumer's state on the server:

- its ack floor is at or past ``seq``: every message of it up to ``seq`` is settled;
- or it is caught up: nothing pending, nothing unacknowledged: every message stored
  so far is settled, ``seq`` included.

One consumer-info request answers many callers: the last answer is kept, and a
caller whose ``seq`` it already covers asks nothing; concurrent callers share one
request (at most one every ``min_interval`` seconds), and an answer "caught up" covers
every caller that asked before it was sent (each one's ``seq`` is stored by then), not
only the one that sent it: a backlog of waiting callers is answered by one request,
not one request per interval each.
"""

from __future__ import annotations

import asyncio
import time

from nats.js import JetStreamContext


class ConsumerProgress:
    def __init__(self, js: JetStreamContext, stream: str, durable: str, *, min_interval: float = 0.05):
        self.js, self.stream, self.durable = js, stream, durable
        self.min_interval = min_interval
        self.floor = 0  # every message up to this stream sequence is settled
        self._asked = 0.0
        self._lock = asyncio.Lock()
        self._highest = 0  # the highest ``seq`` asked about: stored, since its caller holds its message

    async def handled_through(self, seq: int) -> bool:
        """Whether the consumer has settled every one of its messages up to stream sequence ``seq``."""
        if seq <= self.floor:
            return True
        self._highest = max(self._highest, seq)
        async with self._lock:
            if seq <= self.floor:
                return True
            wait = self._asked + self.min_interval - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)  # rate limit: one request per interval for everyone
            await self._refresh(seq)
        return seq <= self.floor

    async def _refresh(self, seq: int) -> None:
        # ``seq`` and every sequence asked about so far are stored (their callers hold their
        # messages) before we ask: when the answer says the consumer is caught up, everything
        # up to the highest of them is settled
        top = max(seq, self._highest)
        info = await self.js.consumer_info(self.stream, self.durable)
        self._asked = time.monotonic()
        floor = info.ack_floor.stream_seq if info.ack_floor else 0
        # nothing left to deliver and nothing unacknowledged: every message stored so far is
        # settled. (Not also "ack floor at the last delivered": after a stream leader change
        # a clustered consumer can report an ack floor behind its last delivery for good.)
        caught_up = not info.num_pending and not info.num_ack_pending
        self.floor = max(self.floor, top if caught_up else floor or 0)
