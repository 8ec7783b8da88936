"""JSON Schema files for every event payload, generated from the Structs.

``python -m contracts.schemas`` rewrites ``contracts/schemas/``; a test fails
when the files drift from the Structs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import msgspec

from contracts.catalogue import CATALOGUE

SCHEMA_DIR = Path(__file__).parent / "schemas"


def generate() -> dict[str, str]:
    files: dict[str, str] = {}
    for spec in CATALOGUE.values():
        schema = msgspec.json.schema(spec.struct)
        doc = {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": f"https://chora-compose.dev/schemas/{spec.type}.json",
            "title": spec.type,
            "description": f"{spec.description} (the data of a CloudEvent of type {spec.type})",
            "x-chora-kind": spec.kind,
            "x-chora-subject": spec.subject(),
            **({"x-chora-callback-subject": spec.callback_subject()} if spec.by_callback else {}),
            **schema,
        }
        files[f"{spec.type}.json"] = json.dumps(doc, indent=2, sort_keys=True) + "\n"
    return files


def write(directory: Path = SCHEMA_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in generate().items():
        path = directory / name
        path.write_text(text)
        written.append(path)
    for stale in directory.glob("*.json"):
        if stale.name not in generate():
            stale.unlink()
    return written


if __name__ == "__main__":
    for p in write():
        print(p)
    sys.exit(0)
