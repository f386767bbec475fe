"""The FastAPI application: ``create_app(settings=None)`` builds it; the lifespan loads what it serves.

Middleware, outermost first: security headers (service.app.headers: CSP, nosniff, no-store... per path),
the request id, metrics (counts every answer, 413s included), then the body cap, then the body read timeout
(408), then the inference admission (503 overloaded from the headers alone when ``queue_bound`` predictions
are in flight: the cheapest possible refusal, no worker thread, no key lookup), then the upload-route
authentication (401/403 before a multipart body is read), then the routes. ``/docs`` is Swagger UI served
from local assets (service.app.docs); ReDoc is off. Every route except ``/healthz`` and ``/readyz`` needs
an API key (see ``service.app.deps``); the ``/dashboard`` pages need a session cookie obtained with one (see
``service.dashboard``).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.routing import APIRoute

from service.app.docs import install_docs
from service.app.errors import RequestIdMiddleware, install_error_handlers
from service.app.headers import SecurityHeadersMiddleware
from service.app.inference import AdmissionMiddleware
from service.app.limits import BodyReadTimeoutMiddleware, BodySizeLimitMiddleware
from service.app.metrics import Metrics, MetricsMiddleware
from service.app.routes import include_routers
from service.app.settings import Settings, get_settings
from service.app.state import load_state
from service.app.upload_auth import UploadAuthMiddleware
from service.dashboard.routes import install as install_dashboard

log = logging.getLogger(__name__)

__all__ = ["create_app", "operation_id"]

DESCRIPTION = (
    "Predictions from the transfer-learning and the fine-tuned checkpoint of each chest X-ray model pair, "
    "their LayerCAM / GradCAM++ maps, a per-request semantic-drift report between them, and an append-only, "
    'hash-chained audit trail. Errors always answer `{"error": {"code", "message", "details"}}`.'
)


def operation_id(route: APIRoute) -> str:
    """Stable operation ids: ``{tag}-{route name}`` (e.g. ``audit-verify``)."""
    tag = route.tags[0] if route.tags else "default"
    return f"{tag}-{route.name}"


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("cxr-drift")
    except Exception:
        return "0.0.0"


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app. ``settings`` default to :func:`get_settings` (the environment), read when called."""
    settings = settings if settings is not None else get_settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = await run_in_threadpool(load_state, settings, metrics=metrics)
        log.info(
            "serving %d model pair(s) %s; %d not ready",
            len(state.pairs),
            ", ".join(state.ready_names()),
            len(state.failed),
        )
        app.state.cxr = state
        try:
            yield
        finally:
            app.state.cxr = None
            state.close()

    app = FastAPI(
        title="cxr-drift",
        version=_version(),
        description=DESCRIPTION,
        lifespan=lifespan,
        generate_unique_id_function=operation_id,
        docs_url=None,  # served from local assets by install_docs (no CDN)
        redoc_url=None,
    )
    app.state.cxr = None
    app.state.metrics = metrics
    install_error_handlers(app)
    include_routers(app)
    install_docs(app)
    install_dashboard(app, settings)  # /dashboard: browser pages behind a signed session cookie
    app.add_middleware(UploadAuthMiddleware)
    app.add_middleware(AdmissionMiddleware)
    app.add_middleware(BodyReadTimeoutMiddleware, timeout_s=settings.body_read_timeout_s)
    app.add_middleware(BodySizeLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.add_middleware(RequestIdMiddleware)  # runs before the rest, so every answer carries the id
    app.add_middleware(SecurityHeadersMiddleware)  # outermost: every answer, 413 and 401 included
    return app
