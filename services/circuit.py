"""A circuit breaker, one per upstream: a webhook subscription (notifier), a model API (generator).

- closed: calls go through; ``failure_threshold`` consecutive failures open it.
- open: no call goes through; :meth:`CircuitBreaker.acquire` raises
  :class:`CircuitOpen` with the seconds left until it turns half-open
  (``reset_timeout_s`` after it opened).
- half-open: at most ``half_open_max_calls`` trial calls at a time; a trial
  that succeeds closes the circuit, one that fails opens it again.

A call's outcome is reported with the :class:`Permit` it got, so that a call
started before a transition (e.g. still running when the circuit opened)
cannot close or reopen it afterwards: only outcomes of the current phase count.

"Failure" means the endpoint is unavailable; what that is is the caller's
business (the notifier: connection error, timeout, 5xx, 408, 429); an endpoint
that answers a bad request with a 4xx is available.

The clock is injected (monotonic seconds), so the transitions are tested
without sleeping. ``peek()``, ``transitions`` and ``on_transition`` are there
for metrics.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Protocol


CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


class BreakerPolicy(Protocol):
    """What a breaker reads of its config (the notifier's ``CircuitConfig`` is one)."""

    @property
    def failure_threshold(self) -> int: ...

    @property
    def reset_timeout_s(self) -> float: ...

    @property
    def half_open_max_calls(self) -> int: ...


@dataclass(frozen=True)
class Policy:
    """A plain :class:`BreakerPolicy`: the defaults."""

    failure_threshold: int = 5
    reset_timeout_s: float = 30.0
    half_open_max_calls: int = 1


class CircuitOpen(Exception):
    """The endpoint is not called now; try again in ``retry_in`` seconds."""

    def __init__(self, retry_in: float, state: str):
        super().__init__(f"circuit {state}: retry in {retry_in:.3f}s")
        self.retry_in = retry_in
        self.state = state


@dataclass(frozen=True)
class Permit:
    generation: int  # the phase the call was allowed in
    trial: bool  # a half-open trial call


class CircuitBreaker:
    def __init__(
        self,
        config: BreakerPolicy | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        busy_retry_s: float = 1.0,
        on_transition: Callable[[str, str], None] | None = None,
    ):
        self.config: BreakerPolicy = config or Policy()
        self.clock = clock
        # While half-open with every trial slot taken: how long others wait (at most reset_timeout_s).
        self.busy_retry_s = busy_retry_s
        self.on_transition = on_transition
        self._state = CLOSED
        self._generation = 0
        self._failures = 0  # consecutive, while closed
        self._opened_at = 0.0
        self._trials = 0  # trial calls in flight, while half-open
        self.transitions: Counter[tuple[str, str]] = Counter()

    # ------------------------------------------------------------------ state
    @property
    def state(self) -> str:
        """closed, open or half_open (an open circuit whose reset timeout passed is half_open)."""
        if self._state == OPEN and self.clock() - self._opened_at >= self.config.reset_timeout_s:
            self._move(HALF_OPEN)
            self._trials = 0
        return self._state

    def peek(self) -> str:
        """The state as :attr:`state` tells it, without moving it: safe to call from
        another thread (a metrics scrape) while the event loop uses the breaker."""
        state, opened_at = self._state, self._opened_at
        if state == OPEN and self.clock() - opened_at >= self.config.reset_timeout_s:
            return HALF_OPEN
        return state

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    @property
    def transition_count(self) -> int:
        return sum(self.transitions.values())

    def _move(self, to: str) -> None:
        frm, self._state = self._state, to
        self._generation += 1
        self.transitions[(frm, to)] += 1
        if self.on_transition is not None:
            self.on_transition(frm, to)

    def _open(self) -> None:
        self._opened_at = self.clock()
        self._failures = 0
        self._trials = 0
        self._move(OPEN)

    # ------------------------------------------------------------------ calls
    def acquire(self) -> Permit:
        """A permit to call the endpoint now, or :class:`CircuitOpen`."""
        state = self.state
        if state == CLOSED:
            return Permit(self._generation, trial=False)
        if state == OPEN:
            left = self.config.reset_timeout_s - (self.clock() - self._opened_at)
            raise CircuitOpen(max(0.0, left), OPEN)
        if self._trials >= self.config.half_open_max_calls:
            raise CircuitOpen(min(self.busy_retry_s, self.config.reset_timeout_s), HALF_OPEN)
        self._trials += 1
        return Permit(self._generation, trial=True)

    def success(self, permit: Permit) -> None:
        if permit.generation != self._generation:
            return  # started in an earlier phase
        if self._state == HALF_OPEN:
            self._failures = 0
            self._trials = 0
            self._move(CLOSED)
        elif self._state == CLOSED:
            self._failures = 0

    def failure(self, permit: Permit) -> None:
        if permit.generation != self._generation:
            return
        if self._state == HALF_OPEN:
            self._open()
        elif self._state == CLOSED:
            self._failures += 1
            if self._failures >= self.config.failure_threshold:
                self._open()

    def release(self, permit: Permit) -> None:
        """The call ended without telling anything about the endpoint (e.g. cancelled)."""
        if permit.trial and permit.generation == self._generation and self._state == HALF_OPEN:
            self._trials = max(0, self._trials - 1)

    def snapshot(self) -> dict:
        return {
            "state": self.state,
            "consecutive_failures": self._failures,
            "transitions": {f"{a}->{b}": n for (a, b), n in sorted(self.transitions.items())},
        }
