"""Wiring of the validator: ``build(settings)`` -> :class:`ValidatorApp`.

Nothing happens at import or build time. :meth:`ValidatorApp.start` takes the
KV state store from the bus context (it records which broken config versions
were reported) and checks every config in the configs directory once,
logging (not failing on) the broken ones: their content still gets a verdict
(``valid=False``) and the config a ``chora.config_validated`` report.

Settings read: ``configs_dir``.
"""

from __future__ import annotations

import logging
from typing import Any

from composition.configs import ConfigError, ConfigStore
from contracts.handling import route
from services.settings import Settings
from services.validator.handlers import EVENT_HANDLERS, SOURCE, Deps, StateLike
from services.validator.rules import RuleCache, RulesError

log = logging.getLogger("chora.validator")


class ValidatorApp:
    """The validator service app (see :class:`services.runtime.ServiceApp`)."""

    name = "validator"

    def __init__(
        self,
        store: ConfigStore,
        rules: RuleCache | None = None,
        *,
        state: StateLike | None = None,
        source: str = SOURCE,
    ):
        self.deps = Deps(store, rules if rules is not None else RuleCache(), state, source)
        self.store, self.rules = self.deps.store, self.deps.rules
        self.config_errors: dict[str, str] = {}
        self.handle = route(EVENT_HANDLERS, self.deps, self.name)

    async def start(self, ctx: Any = None) -> None:
        if ctx is not None:
            self.deps.state = ctx.state
        self.config_errors = {}
        for config_id in self.store.list():
            try:
                _, rules = self.rules.for_config(self.store.get(config_id))
            except ConfigError as e:
                self.config_errors[config_id] = str(e)
                continue
            if isinstance(rules, RulesError):
                self.config_errors[config_id] = f"{rules.code}: {rules.message}"
        for config_id, why in self.config_errors.items():
            log.warning("content config %r cannot be validated against: %s", config_id, why)

    async def close(self) -> None:
        pass

    def info(self) -> dict[str, Any]:
        return {
            "configs_dir": str(self.store.root),
            "configs": self.store.list(),
            "broken_configs": sorted(self.config_errors),
        }


def build(settings: Settings) -> ValidatorApp:
    return ValidatorApp(ConfigStore(settings.configs_dir))
