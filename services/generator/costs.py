"""What renders cost, per config version: what the result cache's default policy weighs
(services/generator/cache.py) and the render pool measures (services/generator/isolation.py)."""

from __future__ import annotations

from collections import OrderedDict

from composition.configs import LoadedConfig


class RenderCosts:
    """What renders of each config version cost: a moving average of seconds by
    (config id, config hash, template hash), for at most ``maxsize`` versions."""

    def __init__(self, maxsize: int = 4096, weight: float = 0.2):
        self.maxsize, self.weight = maxsize, weight
        self._avg: OrderedDict[tuple[str, str | None, str | None], float] = OrderedDict()

    @staticmethod
    def _key(config: LoadedConfig) -> tuple[str, str | None, str | None]:
        return (config.id, config.config_hash, config.template_hash)

    def get(self, config: LoadedConfig) -> float | None:
        return self._avg.get(self._key(config))

    def observe(self, config: LoadedConfig, seconds: float) -> None:
        key = self._key(config)
        before = self._avg.pop(key, None)
        self._avg[key] = seconds if before is None else before + self.weight * (seconds - before)
        while len(self._avg) > self.maxsize:
            self._avg.popitem(last=False)
