"""The notifier's own metrics: live circuit-breaker state and per-subscription outcomes.

Read from the breakers and counters of the running notifier at scrape time,
so a dashboard shows the state the breaker is in now (an open circuit whose
reset timeout has passed shows as half_open), not the last event about it.

    chora_webhook_circuit_state{subscription,state}                  1 for the current state
        (closed, open, half_open), 0 for the other two
    chora_webhook_circuit_transitions_total{subscription,from_state,to_state}
    chora_webhook_consecutive_failures{subscription}                 endpoint failures in a row while closed
    chora_notifier_events_total{subscription,outcome}                events handled per subscription: delivered,
        retried (an attempt failed; another follows), failed (given up, dead-lettered),
        deferred (put off by an open circuit), skipped (filtered out)

Subscription names come from the notifier's config file: a short, closed set.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from services.metrics import label
from services.circuit import CLOSED, HALF_OPEN, OPEN

if TYPE_CHECKING:
    from services.notifier.handlers import Target

STATES = (CLOSED, OPEN, HALF_OPEN)
OUTCOMES = ("delivered", "retried", "failed", "deferred", "skipped")


class _Live(Collector):
    def __init__(self, metrics: "NotifierMetrics"):
        self.metrics = metrics

    def describe(self) -> Iterable[Any]:
        return []

    def collect(self) -> Iterable[Any]:
        state = GaugeMetricFamily(
            "chora_webhook_circuit_state",
            "The circuit breaker's current state of a webhook subscription: 1 for the state it is in.",
            labels=["subscription", "state"],
        )
        failures = GaugeMetricFamily(
            "chora_webhook_consecutive_failures",
            "Endpoint failures in a row of a subscription whose circuit is closed.",
            labels=["subscription"],
        )
        outcomes = CounterMetricFamily(
            "chora_notifier_events",
            "Events handled by a subscription's consumer, by outcome.",
            labels=["subscription", "outcome"],
        )
        for name, t in list(self.metrics.targets.items()):
            sub = label(name)
            now = t.circuit.peek()
            for s in STATES:
                state.add_metric([sub, s], 1.0 if s == now else 0.0)
            failures.add_metric([sub], t.circuit.consecutive_failures)
            for outcome in OUTCOMES:
                outcomes.add_metric([sub, outcome], t.stats.get(outcome, 0))
        yield from (state, failures, outcomes)


class NotifierMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.targets: Mapping[str, Target] = {}
        self.transitions = Counter(
            "chora_webhook_circuit_transitions",
            "Circuit breaker state changes of a webhook subscription.",
            ["subscription", "from_state", "to_state"],
            registry=self.registry,
        )
        self.registry.register(_Live(self))

    def watch(self, targets: Mapping[str, Target]) -> None:
        """Report on these subscriptions (the app's, once started)."""
        self.targets = targets
        for name in targets:
            for frm, to in ((CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, OPEN), (HALF_OPEN, CLOSED)):
                self.transitions.labels(label(name), frm, to)  # at 0, so the first change is an increase

    def transition(self, subscription: str, frm: str, to: str) -> None:
        self.transitions.labels(label(subscription), frm, to).inc()
