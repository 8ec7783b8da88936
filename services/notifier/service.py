"""Wiring of the notifier: ``build(settings)`` -> :class:`NotifierApp`.

Nothing happens at import or build time. :meth:`NotifierApp.start` loads the
subscriptions from ``settings.notifier_config`` (``CHORA_NOTIFIER_CONFIG``)
and their secrets from the environment; a bad file or a missing secret stops
the start with a :class:`~services.notifier.config.NotifierConfigError`
naming the subscription. Without a config file the notifier runs with no
subscriptions (and logs so).

Each subscription gets its own durable consumer ``notify-<name>`` (via
:meth:`NotifierApp.consumers`), filtered on the subjects of the event types
its patterns match, with ``max_deliver = max_attempts + circuit.max_deferrals``:
a dead or slow endpoint only holds back its own subscription, and starting
where the subscription's ``start`` says (new events by default; see
bus.topology.provision for an existing consumer). Each also gets its own HTTP
client and circuit breaker.

Per-request callbacks (:mod:`services.notifier.callbacks`) run on two more durable
consumers, ``notifier-callback-requests`` and ``notifier-callbacks``, once the app is
started by the runtime (they need the bus's state store); a started app without a
bus context (tests) has none.

Settings read: ``notifier_config``, ``callback_allow``, ``callback_secret_env``.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Any

from bus.topology import (
    CALLBACK_MAX_IN_FLIGHT,
    CALLBACK_OUTCOMES,
    CALLBACK_REQUESTS,
    ConsumerSpec,
    Topology,
    unread_consumers,
)
from contracts.handling import Bound, route
from services.circuit import CircuitBreaker
from services.notifier.callbacks import CALLBACK_HANDLERS, CallbackDeps, callback_policy, describe
from services.notifier.config import NotifierConfig, NotifierConfigError, load_config, load_secrets
from services.notifier.signing import SecretError, parse_secrets
from services.notifier.delivery import WebhookSender
from services.notifier.handlers import EVENT_HANDLERS, SOURCE, Deps, Target
from services.notifier.metrics import NotifierMetrics
from services.settings import Settings

log = logging.getLogger("chora.notifier")

ACK_WAIT_MARGIN_S = 10.0


class NotifierApp:
    """The notifier service app (see :class:`services.runtime.ServiceApp`)."""

    name = "notifier"

    def __init__(
        self,
        config_path: Path | None,
        *,
        environ: dict[str, str] | None = None,
        source: str = SOURCE,
        callback_allow: list[str] | None = None,
        callback_secret_env: str = "CHORA_CALLBACK_SECRET",
    ):
        self.config_path = config_path
        self.environ = environ
        self.source = source
        self.callbacks = CallbackDeps(
            callback_policy(callback_secret_env, CALLBACK_MAX_IN_FLIGHT),
            allow=[a for a in (callback_allow or []) if a.strip()],
            source=source,
            on_transition=self._transition,
        )
        self.handle_callbacks: Bound = route(CALLBACK_HANDLERS, self.callbacks, self.name)
        self.config = NotifierConfig()
        self.targets: dict[str, Target] = {}
        self.deps = Deps()  # the same targets, by durable consumer
        self.handle: Bound = route(EVENT_HANDLERS, self.deps, self.name)
        self.metrics = NotifierMetrics()
        self.metrics_registry = self.metrics.registry  # served on the process's /metrics by the runtime

    async def start(self, ctx: Any = None) -> None:
        config = load_config(self.config_path)
        secrets = load_secrets(config, self.environ)
        self._start_callbacks(ctx)
        self.config = config
        targets: dict[str, Target] = {}
        for sub in config.subscriptions:
            circuit = CircuitBreaker(
                sub.circuit,
                busy_retry_s=sub.timeout_s,
                on_transition=functools.partial(self._transition, sub.name),
            )
            targets[sub.name] = Target(sub, WebhookSender(sub, secrets[sub.name]), circuit, source=self.source)
        self.targets = targets
        self.deps.targets = {t.subscription.durable: t for t in targets.values()}
        self.metrics.watch(targets)
        if not self.targets:
            log.info(
                "notifier: no subscriptions (%s); set CHORA_NOTIFIER_CONFIG to a subscriptions file",
                f"{self.config_path} lists none" if self.config_path else "no config file",
            )
        else:
            for t in self.targets.values():
                log.info(
                    "subscription %s: %s -> %s",
                    t.subscription.name,
                    ", ".join(t.subscription.event_types),
                    t.subscription.safe_url,
                )

    def _start_callbacks(self, ctx: Any) -> None:
        """Callbacks on (an allow-list) need their signing secret: without it, no start."""
        cb = self.callbacks
        env = os.environ if self.environ is None else self.environ
        secret_env = cb.policy.secret_env
        if cb.allow:
            secret = env.get(secret_env)
            if not secret:
                raise NotifierConfigError(
                    f"notifier: callbacks are on (CHORA_CALLBACK_ALLOW lists {len(cb.allow)} entries) but their "
                    f"signing secret {secret_env} (CHORA_CALLBACK_SECRET_ENV names it) is "
                    + ("empty" if secret == "" else "not set")
                    + "; set it, or empty CHORA_CALLBACK_ALLOW to turn callbacks off"
                )
            try:  # like a subscription's: whsec_<base64> or raw, several during a rotation
                keys = parse_secrets(secret)
            except SecretError as e:
                raise NotifierConfigError(f"notifier: the callbacks' signing secret {secret_env}: {e}") from None
            cb.sender = WebhookSender(cb.policy, keys)
            log.info("callbacks on: to %s", ", ".join(cb.allow))
        else:
            log.info("callbacks off (CHORA_CALLBACK_ALLOW is empty): a request's callback_url is refused")
        if ctx is not None:
            cb.store = ctx.state
            cb.progress = ctx.progress(CALLBACK_REQUESTS) if ctx.progress is not None else None

    def _transition(self, subscription: str, frm: str, to: str) -> None:
        log.warning("subscription %s: circuit %s -> %s", subscription, frm, to)
        self.metrics.transition(subscription, frm, to)

    def consumers(self, topology: Topology) -> list[tuple[ConsumerSpec, Bound]]:
        """One durable consumer per subscription; each delivery names its subscription's target."""
        specs = {spec.durable: spec for spec in subscription_consumers(self.config, topology)}
        pairs = [(specs[t.subscription.durable], self.handle) for t in self.targets.values()]
        if self.callbacks.store is not None:
            # callbacks off: a request's callback_url is refused as the request is read (only the
            # requests that carry one reach the notifier), and no outcome is read at all
            durables = (CALLBACK_REQUESTS, CALLBACK_OUTCOMES) if self.callbacks.allow else (CALLBACK_REQUESTS,)
            pairs += [(topology.consumers[c], self.handle_callbacks) for c in durables]
        return pairs

    def retired_consumers(self) -> list[str]:
        """The durables to delete on start: the callbacks' outcomes while callbacks are off
        (left from a run with callbacks on, nobody would read them)."""
        return unread_consumers(self.callbacks.allow)

    async def close(self) -> None:
        if self.callbacks.sender is not None:
            await self.callbacks.sender.close()
        for t in self.targets.values():
            try:
                await t.sender.close()
            except Exception:  # closing a client must not hide the others
                log.exception("closing the HTTP client of %s", t.subscription.name)

    def info(self) -> dict[str, Any]:
        return {
            "config": str(self.config_path) if self.config_path else None,
            "subscriptions": {
                name: {
                    "consumer": t.subscription.durable,
                    "events": list(t.subscription.event_types),
                    "circuit": t.circuit.state,
                }
                for name, t in self.targets.items()
            },
            "callbacks": describe(self.callbacks),
        }

    def status(self) -> dict[str, Any]:
        """Live figures per subscription (circuit state and transitions, counters)."""
        return {name: {**t.circuit.snapshot(), **t.stats} for name, t in self.targets.items()}


def subscription_consumers(config: NotifierConfig, topology: Topology) -> list[ConsumerSpec]:
    """The durable consumer of each subscription (``notify-<name>``), from the config alone:
    what the notifier provisions on start, and `chora nats provision` with
    ``CHORA_NOTIFIER_CONFIG`` set (where the notifier's user may not create consumers)."""
    base = topology.consumers["generator"]
    return [
        topology.consumer_spec(
            sub.durable,
            sub.event_types,
            template="generator",
            max_deliver=sub.max_attempts + sub.circuit.max_deferrals,
            max_ack_pending=sub.max_in_flight,
            ack_wait_s=max(base.ack_wait_s, sub.timeout_s + ACK_WAIT_MARGIN_S),
            start=sub.start,
        )
        for sub in config.subscriptions
    ]


def build(settings: Settings) -> NotifierApp:
    return NotifierApp(
        settings.notifier_config,
        callback_allow=settings.callback_allow,
        callback_secret_env=settings.callback_secret_env,
    )
