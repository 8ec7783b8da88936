"""The gateway's OpenAPI document, checked in as contracts/openapi/gateway.json.

``chora contracts openapi`` rewrites the file from the app's models; a test fails when the
file drifts from what the app serves.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

OPENAPI_PATH = Path(__file__).resolve().parents[2] / "contracts" / "openapi" / "gateway.json"


def document() -> dict[str, Any]:
    """The document the app serves at /openapi.json (it depends on no setting)."""
    from services.gateway.app import create_app
    from services.gateway.security import KeyRing
    from services.gateway.settings import GatewaySettings

    app = create_app(None, GatewaySettings(), KeyRing([]), ready=lambda: False)  # type: ignore[arg-type]
    return app.openapi()


def text(doc: dict[str, Any] | None = None) -> str:
    return json.dumps(document() if doc is None else doc, indent=2, sort_keys=True) + "\n"


def write(path: Path = OPENAPI_PATH) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text())
    return path
