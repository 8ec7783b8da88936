"""Wiring of the assembler: ``build(settings)`` -> :class:`AssemblerApp`.

Nothing happens at import or build time. :meth:`AssemblerApp.start` takes the
KV state and the Object Store from the runtime's :class:`BusContext`. The app
runs two durable consumers (see :meth:`AssemblerApp.consumers`):

- ``assembler`` (declared in the topology): artifact and batch requests and
  the outcomes of their generations;
- ``assembler-completions`` (declared here, at run time): the assembler's own
  ``batch_completed`` / ``artifact_assembled``, read back from the stream to
  mark their records finished (see :mod:`services.assembler`);
- ``assembler-cancels``: cancel requests and the compensations' facts, and
  ``assembler-deadlines``: the runs' deadline timers (see :mod:`.saga`, docs/saga.md).

Settings read: ``configs_dir`` (content configs, and artifact configs in its
``artifacts/``), ``max_event_bytes``, ``batch_results_ttl_s``, ``batch_deadline_s``, and through the topology
``duplicate_window_s`` and ``ack_wait_s``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from composition.artifacts import ArtifactStore
from composition.configs import ConfigStore
from contracts.envelope import CloudEvent
from contracts.handling import Bound, Delivery, route
from services.assembler.handlers import COMPLETIONS_CONSUMER, EVENT_HANDLERS, SOURCE, Deps
from services.assembler.saga import SAGA_HANDLERS
from services.settings import Settings

CANCELS_CONSUMER = "assembler-cancels"
DEADLINES_CONSUMER = "assembler-deadlines"


class AssemblerApp:
    """The assembler service app (see :class:`services.runtime.ServiceApp`)."""

    name = "assembler"

    def __init__(
        self,
        configs_dir: Path | str,
        *,
        source: str = SOURCE,
        max_event_bytes: int = 1 << 20,
        results_ttl_s: float | None = None,
        batch_deadline_s: float | None = None,
    ):
        self.max_event_bytes = max_event_bytes
        self.results_ttl_s = results_ttl_s
        self.batch_deadline_s = batch_deadline_s
        self.configs = ConfigStore(configs_dir)
        self.artifacts = ArtifactStore(configs_dir)
        self.source = source
        self.deps: Deps | None = None
        self._routed: Bound | None = None
        self._saga: Bound | None = None

    async def start(self, ctx: Any) -> None:
        topo = ctx.topology
        self.deps = Deps(
            state=ctx.state,
            content=ctx.content,
            configs=self.configs,
            artifacts=self.artifacts,
            source=self.source,
            duplicate_window_s=topo.duplicate_window_s,
            ack_wait_s=topo.consumers["assembler"].ack_wait_s,
            max_event_bytes=self.max_event_bytes,
            results_ttl_s=self.results_ttl_s,
            state_max_age_s=topo.max_age_s,
            batch_deadline_s=self.batch_deadline_s,
        )
        self._routed = route(EVENT_HANDLERS, self.deps, self.name)
        self._saga = route(SAGA_HANDLERS, self.deps, self.name)

    def consumers(self, topology: Any) -> list[tuple[Any, Any]]:
        return [
            (topology.consumers["assembler"], self.handle),
            (topology.consumers[COMPLETIONS_CONSUMER], self.handle),
            (topology.consumers[CANCELS_CONSUMER], self.handle_saga),
            (topology.consumers[DEADLINES_CONSUMER], self.handle_saga),
        ]

    async def handle(self, event: CloudEvent, delivery: Delivery) -> Sequence[CloudEvent]:
        if self._routed is None:
            raise RuntimeError("the assembler was not started")
        return await self._routed(event, delivery)

    async def handle_saga(self, event: CloudEvent, delivery: Delivery) -> Sequence[CloudEvent]:
        if self._saga is None:
            raise RuntimeError("the assembler was not started")
        return await self._saga(event, delivery)

    async def close(self) -> None:
        if self.deps is not None:
            await self.deps.committers.close()

    def info(self) -> dict[str, Any]:
        return {
            "configs_dir": str(self.configs.root),
            "artifacts": self.artifacts.list(),
            "consumers": ["assembler", COMPLETIONS_CONSUMER, CANCELS_CONSUMER, DEADLINES_CONSUMER],
        }


def build(settings: Settings) -> AssemblerApp:
    return AssemblerApp(
        settings.configs_dir,
        max_event_bytes=settings.max_event_bytes,
        results_ttl_s=settings.batch_results_ttl_s,  # bounded by the state bucket's max age (retention.py)
        batch_deadline_s=settings.batch_deadline_s,
    )
