"""Liveness, readiness and Prometheus metrics.

Readiness rule (``GET /readyz``): 200 only if at least one model pair is loaded with its file hashes
verified, no model-pair folder failed to load (only with ``CXR_DRIFT_STRICT_MODELS=true``, the default;
failed folders are listed either way), every model lifecycle record is written, and the audit database
accepts a write (within the database time limit of the settings). Otherwise 503 with the reasons. No key is
needed, so the answer names no server path (failed folders by name, paths in reasons relative to the
artifacts folder or hidden) and database reasons are generic (no host, port, user or driver message: those
go to the log). ``/healthz`` and ``/readyz`` need no key; ``/metrics`` needs a key of any role.
"""

from __future__ import annotations

import logging
import time

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from service.app.deps import AnyKeyDep, StateDep
from service.app.errors import ApiError, error_responses
from service.app.metrics import CONTENT_TYPE_LATEST
from service.app.routes.models import hide_paths
from service.app.schemas import HealthResponse, NotReadyModel, ReadyResponse
from service.audit.db import DatabaseUnavailable, check_writable

log = logging.getLogger(__name__)

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthResponse, summary="the process is up (no key needed)")
def healthz(request: Request) -> HealthResponse:
    state = getattr(request.app.state, "cxr", None)
    uptime = time.time() - state.started_at if state is not None else None
    return HealthResponse(status="ok", uptime_s=uptime)


@router.get(
    "/readyz",
    response_model=ReadyResponse,
    summary="ready to serve audited predictions (no key needed)",
    responses=error_responses(503),
)
async def readyz(state: StateDep) -> ReadyResponse:
    reasons: list[str] = []
    snapshot = state.registry.snapshot
    strict = state.settings.strict_models
    if not snapshot.served:
        reasons.append("no model pair is loaded")
    root = str(state.settings.artifacts_dir)
    failed = [
        NotReadyModel(name=f.name, folder=None, reason=hide_paths(f.reason, root)) for f in snapshot.failed
    ]
    if strict:
        reasons.extend(f"model pair {f.name!r} failed to load: {f.reason}" for f in failed)
    database = "ok"
    try:
        await run_in_threadpool(check_writable, state.engine)
    except Exception as exc:
        # the answer gives a generic reason, the log the details (host, driver error)
        public = exc.public if isinstance(exc, DatabaseUnavailable) else "check failed"
        log.warning("readiness: audit database not ready: %s: %s", type(exc).__name__, exc)
        database = f"not ready: {public}"
        reasons.append(f"audit database {database} (details in the service log)")
    if state.registry.pending:
        try:
            await run_in_threadpool(state.registry.flush_pending)
        except Exception as exc:
            log.warning("readiness: lifecycle records not written: %s: %s", type(exc).__name__, exc)
            reasons.append(
                f"{len(state.registry.pending)} model lifecycle record(s) not written yet: {type(exc).__name__}"
            )
    body = ReadyResponse(
        ready=not reasons,
        models_ready=sorted(snapshot.served),
        models_failed=failed,
        database=database,
        reasons=reasons,
        strict=strict,
    )
    if reasons:
        raise ApiError(503, "not_ready", "; ".join(reasons), details=body.model_dump())
    return body


@router.get(
    "/metrics",
    response_class=Response,
    summary="Prometheus metrics (text exposition format)",
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}, **error_responses(401, 403)},
)
def metrics(state: StateDep, principal: AnyKeyDep) -> Response:
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
