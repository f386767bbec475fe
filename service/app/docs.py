"""The interactive API documentation, served with no request leaving the service's own origin.

``GET /docs`` is a Swagger UI page whose script, stylesheet and icon come from ``/docs/assets/`` (the
Swagger UI 5 files shipped in the ``fastapi-offline`` package, read from its installed folder), started by
a small script of our own (no inline script, so the page's CSP allows scripts from ``'self'`` only). The
online validator badge is off. ReDoc is not served (``redoc_url=None``): it loads web fonts from a CDN.
"""

from __future__ import annotations

import html
from importlib.util import find_spec
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, Response

__all__ = ["DOCS_ASSETS", "DOCS_PATH", "install_docs", "swagger_assets_dir"]

DOCS_PATH = "/docs"
ASSETS_PATH = "/docs/assets"

# the script that starts Swagger UI; reads the OpenAPI URL from the page's data attribute
_INIT_JS = """\
"use strict";
(function () {
  var root = document.getElementById("swagger-ui");
  window.ui = SwaggerUIBundle({
    url: root.getAttribute("data-openapi-url"),
    dom_id: "#swagger-ui",
    layout: "BaseLayout",
    deepLinking: true,
    showExtensions: true,
    showCommonExtensions: true,
    validatorUrl: null,
    presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset],
  });
})();
"""


def swagger_assets_dir() -> Path:
    """The folder holding ``swagger-ui-bundle.js``, ``swagger-ui.css`` and ``favicon.png``."""
    spec = find_spec("fastapi_offline")
    if spec is None or spec.origin is None:
        raise RuntimeError("the package fastapi-offline (Swagger UI assets for /docs) is not installed")
    return Path(spec.origin).parent / "static"


# name -> media type: the only files /docs/assets serves
DOCS_ASSETS: dict[str, str] = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "favicon.png": "image/png",
    "swagger-init.js": "text/javascript; charset=utf-8",
}


def _page(title: str, prefix: str, openapi_url: str) -> str:
    assets = f"{prefix}{ASSETS_PATH}"
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{html.escape(title)} - API documentation</title>
<link rel="stylesheet" href="{assets}/swagger-ui.css">
<link rel="icon" type="image/png" href="{assets}/favicon.png">
</head>
<body>
<div id="swagger-ui" data-openapi-url="{html.escape(prefix + openapi_url)}"></div>
<script src="{assets}/swagger-ui-bundle.js"></script>
<script src="{assets}/swagger-init.js"></script>
</body>
</html>
"""


def install_docs(app: FastAPI) -> None:
    """Add ``/docs`` and ``/docs/assets/{name}`` (not in the OpenAPI document). The app must be built with
    ``docs_url=None, redoc_url=None``."""
    folder = swagger_assets_dir()
    openapi_url = app.openapi_url or "/openapi.json"

    @app.get(DOCS_PATH, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        prefix = str(request.scope.get("root_path", "")).rstrip("/")
        return HTMLResponse(_page(app.title, prefix, openapi_url))

    @app.get(ASSETS_PATH + "/{name}", include_in_schema=False)
    async def swagger_asset(name: str) -> Response:
        media_type = DOCS_ASSETS.get(name)
        if media_type is None:
            raise HTTPException(404, f"no documentation asset {name!r}")
        if name == "swagger-init.js":
            return Response(_INIT_JS, media_type=media_type)
        return FileResponse(folder / name, media_type=media_type)
