"""The service's OpenAPI document, built from the app and rendered deterministically, so that the
committed ``openapi/openapi.json`` changes only when the API does (``cxr-drift openapi``)."""

from __future__ import annotations

import json
from typing import Any

from service.app.main import create_app
from service.app.settings import Settings

__all__ = ["openapi_document", "render"]


def openapi_document() -> dict[str, Any]:
    """The app's OpenAPI schema; building it loads no models and touches no database."""
    # defaults, not the environment: the document must not depend on who generates it
    return create_app(Settings(_env_file=None, api_keys=[], auth_enabled=True, host="127.0.0.1")).openapi()  # type: ignore[call-arg]


def render(document: dict[str, Any]) -> str:
    """Deterministic JSON: sorted keys, two-space indent, trailing newline."""
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
