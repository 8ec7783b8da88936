"""The circuit breaker, on an injected clock: no sleeps."""

from __future__ import annotations

import pytest

from services.notifier.circuit import CLOSED, HALF_OPEN, OPEN, CircuitBreaker, CircuitOpen
from services.notifier.config import CircuitConfig


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def breaker(threshold=3, reset=10.0, half_open=1, clock=None) -> CircuitBreaker:
    return CircuitBreaker(
        CircuitConfig(failure_threshold=threshold, reset_timeout_s=reset, half_open_max_calls=half_open),
        clock=clock or Clock(),
        busy_retry_s=2.0,
    )


def fail(cb: CircuitBreaker, n: int) -> None:
    for _ in range(n):
        cb.failure(cb.acquire())


def test_opens_after_threshold_consecutive_failures_only():
    cb = breaker(threshold=3)
    fail(cb, 2)
    cb.success(cb.acquire())  # a success resets the count
    fail(cb, 2)
    assert cb.state == CLOSED and cb.consecutive_failures == 2
    fail(cb, 1)
    assert cb.state == OPEN
    assert cb.transitions[(CLOSED, OPEN)] == 1 and cb.transition_count == 1


def test_open_refuses_calls_with_the_time_left_until_half_open():
    clock = Clock()
    cb = breaker(threshold=1, reset=10.0, clock=clock)
    fail(cb, 1)
    clock.t += 4.0
    with pytest.raises(CircuitOpen) as e:
        cb.acquire()
    assert e.value.retry_in == pytest.approx(6.0)
    assert e.value.state == OPEN
    clock.t += 6.0
    assert cb.state == HALF_OPEN
    assert cb.transitions[(OPEN, HALF_OPEN)] == 1


def test_half_open_allows_limited_trials_and_success_closes():
    clock = Clock()
    cb = breaker(threshold=1, reset=5.0, half_open=2, clock=clock)
    fail(cb, 1)
    clock.t += 5.0
    p1, p2 = cb.acquire(), cb.acquire()
    assert p1.trial and p2.trial
    with pytest.raises(CircuitOpen) as e:  # both trial slots taken
        cb.acquire()
    assert e.value.state == HALF_OPEN and e.value.retry_in == pytest.approx(2.0)
    cb.success(p1)
    assert cb.state == CLOSED
    assert cb.transitions[(HALF_OPEN, CLOSED)] == 1
    cb.failure(p2)  # a trial of the previous phase no longer counts
    assert cb.state == CLOSED and cb.consecutive_failures == 0


def test_half_open_failure_reopens_for_a_full_reset_timeout():
    clock = Clock()
    cb = breaker(threshold=2, reset=5.0, clock=clock)
    fail(cb, 2)
    clock.t += 5.0
    trial = cb.acquire()
    clock.t += 1.0
    cb.failure(trial)
    assert cb.state == OPEN
    with pytest.raises(CircuitOpen) as e:
        cb.acquire()
    assert e.value.retry_in == pytest.approx(5.0)
    assert cb.transitions == {(CLOSED, OPEN): 1, (OPEN, HALF_OPEN): 1, (HALF_OPEN, OPEN): 1}


def test_outcomes_of_calls_started_before_opening_are_ignored():
    cb = breaker(threshold=2)
    early = cb.acquire()
    fail(cb, 2)
    assert cb.state == OPEN
    cb.success(early)  # it started while closed: it cannot close an open circuit
    assert cb.state == OPEN


def test_released_trial_frees_its_slot():
    clock = Clock()
    cb = breaker(threshold=1, reset=1.0, clock=clock)
    fail(cb, 1)
    clock.t += 1.0
    p = cb.acquire()
    with pytest.raises(CircuitOpen):
        cb.acquire()
    cb.release(p)
    assert cb.acquire().trial


def test_transition_hook_and_snapshot():
    seen = []
    cb = CircuitBreaker(
        CircuitConfig(failure_threshold=1), clock=Clock(), on_transition=lambda a, b: seen.append((a, b))
    )
    fail(cb, 1)
    assert seen == [(CLOSED, OPEN)]
    snap = cb.snapshot()
    assert snap["state"] == OPEN and snap["transitions"] == {"closed->open": 1}
