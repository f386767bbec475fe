"""Authenticate upload routes *before* their body is read.

FastAPI parses a multipart body before it runs a route's dependencies, so without this a client with no
valid key could make the server read and parse up to ``max_body_bytes`` before getting its 401. This pure
ASGI middleware answers 401/403 for the upload routes from the headers alone; the route's own dependency
still authenticates (defence in depth, and it is what the OpenAPI document describes).
"""

from __future__ import annotations

from collections.abc import Mapping

from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Receive, Scope, Send

from service.app.deps import AUTHENTICATED_STATE_KEY, allowed_roles, check_key, key_from_headers
from service.app.errors import ApiError, error_json

__all__ = ["UPLOAD_ROUTES", "UploadAuthMiddleware"]

# (method, path) -> roles allowed (admin always is)
UPLOAD_ROUTES: Mapping[tuple[str, str], frozenset[str]] = {("POST", "/predict"): allowed_roles("predict")}


class UploadAuthMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        allowed = (
            UPLOAD_ROUTES.get((scope.get("method", ""), scope.get("path", "")))
            if scope["type"] == "http"
            else None
        )
        state = getattr(scope.get("app"), "state", None)
        cxr = getattr(state, "cxr", None) if state is not None else None
        if allowed is None or cxr is None:  # not an upload route, or not started (the route answers 503)
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        key = key_from_headers(headers.get("x-api-key"), headers.get("authorization"))
        try:
            principal = await run_in_threadpool(check_key, cxr, key, allowed)
        except ApiError as exc:
            response = error_json(exc.status_code, exc.code, exc.message, exc.details, exc.headers)
            await response(scope, receive, send)
            return
        # the route's dependency takes it from here instead of looking the key up a second time
        scope.setdefault("state", {})[AUTHENTICATED_STATE_KEY] = principal
        await self.app(scope, receive, send)
