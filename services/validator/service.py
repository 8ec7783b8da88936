"""Wiring of the validator: ``build(settings)`` -> :class:`ValidatorApp`.

Nothing happens at import or build time. :meth:`ValidatorApp.start` takes the
KV state store (it records which config versions were reported) and the
publish function from the bus context, and starts a background task that
checks every config in the configs directory at once and then every
``rescan_interval_s``, reporting each version not reported yet as one
``chora.config_validated`` (see :mod:`services.validator.reports`). A broken
config is logged, never fatal: its content still gets a verdict
(``valid=False``). A scan that fails (KV store or NATS away) is logged and
tried again at the next interval.

Settings read: ``configs_dir``.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

from composition.configs import ConfigStore
from contracts.handling import route
from services.settings import Settings
from services.validator.handlers import EVENT_HANDLERS, SOURCE, Deps, StateLike
from services.validator.reports import Checked, Publish, check_config, scan
from services.validator.rules import RuleCache

log = logging.getLogger("chora.validator")

DEFAULT_RESCAN_INTERVAL_S = 60.0


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
        rescan_interval_s: float = DEFAULT_RESCAN_INTERVAL_S,
    ):
        self.deps = Deps(store, rules if rules is not None else RuleCache(), state, source)
        self.store, self.rules = self.deps.store, self.deps.rules
        self.config_errors: dict[str, str] = {}
        self.handle = route(EVENT_HANDLERS, self.deps, self.name)
        self.publish: Publish | None = None
        self.rescan_interval_s = rescan_interval_s
        self.scanner = f"scan:{uuid.uuid4().hex[:12]}"  # the owner a scan writes in the KV claims
        self.scans = 0  # completed scans
        self.reported = 0  # config versions this instance's scans published
        self._scan_task: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None

    async def start(self, ctx: Any = None) -> None:
        if ctx is not None:
            self.deps.state = ctx.state
            self.publish = getattr(ctx, "publish", None)
        self.check_all()
        if self.publish is not None:
            self._wake = asyncio.Event()
            self._scan_task = asyncio.create_task(self._scan_loop(self._wake), name="validator-config-scan")

    def check_all(self) -> list[Checked]:
        """Check every config in the directory (no KV, no publish); remember the broken ones."""
        checked = [check_config(self.store, self.rules, config_id) for config_id in self.store.list()]
        self.config_errors = {}
        for c in checked:
            err = c.report.error
            if c.rules is None and err is not None:
                self.config_errors[c.config_id] = f"{err.code}: {err.message}"
                log.warning("content config %r cannot be validated against: %s: %s", c.config_id, err.code, err.message)
        return checked

    async def scan(self) -> list[Checked]:
        """Report every config version in the directory not reported yet (see reports.scan)."""
        if self.publish is None:
            raise RuntimeError("the validator has no publish function (not started with a bus context)")
        published = await scan(
            self.store,
            self.rules,
            self.deps.state,
            self.deps.claims,
            self.publish,
            source=self.deps.source,
            scanner=self.scanner,
        )
        self.scans += 1
        self.reported += len(published)
        return published

    async def _scan_loop(self, wake: asyncio.Event) -> None:
        failing = False
        while True:
            try:
                await self.scan()
                if failing:
                    log.info("validator: config scan works again")
                failing = False
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if not failing:
                    log.warning("validator: config scan failed (retrying every %ss): %s", self.rescan_interval_s, e)
                failing = True
            if self.rescan_interval_s <= 0:
                return
            try:
                await asyncio.wait_for(wake.wait(), timeout=self.rescan_interval_s)
            except asyncio.TimeoutError:
                continue
            return  # woken: closing

    async def close(self) -> None:
        task, self._scan_task = self._scan_task, None
        if task is not None:
            if self._wake is not None:
                self._wake.set()
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    def info(self) -> dict[str, Any]:
        return {
            "configs_dir": str(self.store.root),
            "configs": self.store.list(),
            "broken_configs": sorted(self.config_errors),
        }


def build(settings: Settings) -> ValidatorApp:
    return ValidatorApp(ConfigStore(settings.configs_dir))
