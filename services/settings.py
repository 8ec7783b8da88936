"""The settings of a service process: the bus's (:mod:`bus.settings`) and the shared
ones of the domain (:mod:`composition.settings`), read together from the environment."""

from __future__ import annotations

from pydantic_settings import SettingsConfigDict

from bus.settings import BusSettings
from composition.settings import CompositionSettings

__all__ = ["Settings"]


class Settings(CompositionSettings, BusSettings):
    model_config = SettingsConfigDict(env_prefix="CHORA_", extra="ignore")
