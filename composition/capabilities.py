"""What the generator service reports of its generators, for capability discovery.

On start, each generator instance writes one record (key :data:`GENERATORS_KEY` in the
state bucket) with every generator it has loaded, what it needs (credential variable
names, never values; upstream endpoints) and whether it has it (its pre-flight
readiness). The gateway reads it for ``GET /v1/capabilities/generators``; the last
instance to start wins, which is right as long as instances share their environment.
"""

from __future__ import annotations

import msgspec

GENERATORS_KEY = "capabilities.generators"


class GeneratorInfo(msgspec.Struct, kw_only=True, omit_defaults=True):
    name: str
    ready: bool
    missing: list[str] = []  # what is missing, for people ("environment variable ANTHROPIC_API_KEY")
    credentials: list[str] = []  # environment variable names it needs
    endpoints: list[str] = []  # upstream URLs it calls
    deterministic: bool = False


class GeneratorsRecord(msgspec.Struct, kw_only=True, omit_defaults=True):
    instance: str  # host and pid of the generator that wrote it
    updated_at: float
    generators: list[GeneratorInfo] = []
    broken: dict[str, str] = {}  # generators that failed to load: name -> why


def encode_generators(record: GeneratorsRecord) -> bytes:
    return msgspec.json.encode(record)


def decode_generators(raw: bytes) -> GeneratorsRecord:
    return msgspec.json.decode(raw, type=GeneratorsRecord)
