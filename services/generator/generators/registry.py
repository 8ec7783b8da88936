"""Generators by name: the ``chora.generators`` entry points."""

from __future__ import annotations

import logging
import threading
from importlib.metadata import entry_points
from typing import Any

from composition.configs import GenerationError
from services.generator.generators.base import ENTRY_POINT_GROUP

log = logging.getLogger("chora.generator")


# --------------------------------------------------------------------------- the registry


class GeneratorRegistry:
    """Generators by name: the ``chora.generators`` entry points, loaded once.

    An entry point may name a class (instantiated without arguments) or an
    object with ``render``. One that fails to load is remembered and reported
    as UNKNOWN_GENERATOR with the reason. ``generators`` given here (or
    :meth:`register`-ed) win over entry points of the same name.
    """

    def __init__(self, generators: dict[str, Any] | None = None, *, load_entry_points: bool = True):
        self._generators: dict[str, Any] = dict(generators or {})
        self._errors: dict[str, str] = {}
        self._loaded = not load_entry_points
        self._lock = threading.Lock()

    def load(self) -> None:
        """Load the entry points (once; later calls do nothing)."""
        with self._lock:
            if self._loaded:
                return
            for ep in entry_points(group=ENTRY_POINT_GROUP):
                if ep.name in self._generators:
                    continue
                try:
                    obj = ep.load()
                    gen = obj() if isinstance(obj, type) else obj
                    if not callable(getattr(gen, "render", None)):
                        raise TypeError(f"{ep.value} has no render(config, context)")
                except Exception as e:
                    self._errors[ep.name] = f"{type(e).__name__}: {e}"
                    log.warning("generator %r (%s) failed to load: %s", ep.name, ep.value, self._errors[ep.name])
                    continue
                self._generators[ep.name] = gen
            self._loaded = True

    def register(self, name: str, generator: Any) -> None:
        self._generators[name] = generator
        self._errors.pop(name, None)

    def get_generator(self, name: str) -> Any:
        gen = self._generators.get(name)
        if gen is not None:
            return gen
        if not self._loaded:
            self.load()
            gen = self._generators.get(name)
            if gen is not None:
                return gen
        if name in self._errors:
            raise GenerationError("UNKNOWN_GENERATOR", f"generator {name!r} failed to load: {self._errors[name]}")
        known = ", ".join(sorted(self._generators)) or "none"
        raise GenerationError("UNKNOWN_GENERATOR", f"no generator {name!r} is registered (known: {known})")

    def names(self) -> list[str]:
        self.load()
        return sorted(self._generators)

    @property
    def errors(self) -> dict[str, str]:
        return dict(self._errors)


_default: GeneratorRegistry | None = None


def default_registry() -> GeneratorRegistry:
    global _default
    if _default is None:
        _default = GeneratorRegistry()
    return _default


def get_generator(name: str) -> Any:
    """``default_registry().get_generator(name)``."""
    return default_registry().get_generator(name)
