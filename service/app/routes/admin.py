"""Administration: ``POST /admin/models/reload`` rescans the artifacts folder (admin role).

New folders are verified and loaded, removed ones retired, changed ones (another version digest) replaced
atomically; each change is a lifecycle record in the audit database, naming the admin key and the reason
(service/app/registry.py, service/audit/lifecycle.py). Requests in flight finish on the pairs they started
with. If the lifecycle records cannot be written, nothing changes and the answer is 503.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Depends
from fastapi.concurrency import run_in_threadpool

from service.app.deps import Principal, StateDep, require_role
from service.app.errors import ApiError, error_responses
from service.app.schemas import NotReadyModel, ReloadRequest, ReloadResponse
from service.audit.db import DatabaseUnavailable

router = APIRouter(prefix="/admin", tags=["admin"])

AdminKeyDep = Annotated[Principal, Depends(require_role("admin"))]


@router.post(
    "/models/reload",
    response_model=ReloadResponse,
    summary="rescan the artifacts folder: load new model pairs, replace changed ones, retire removed ones",
    responses=error_responses(401, 403, 422, 503),
)
async def reload_models(
    state: StateDep,
    principal: AdminKeyDep,
    body: Annotated[ReloadRequest | None, Body()] = None,
) -> ReloadResponse:
    reason = body.reason if body is not None else None
    try:
        report = await run_in_threadpool(state.registry.reload, actor=principal.name, reason=reason)
    except DatabaseUnavailable as exc:
        raise ApiError(
            503,
            "database_unavailable",
            f"the lifecycle records could not be written, so no model was changed: {exc}",
        ) from exc
    return ReloadResponse(
        loaded=report.loaded,
        replaced=report.replaced,
        retired=report.retired,
        unchanged=report.unchanged,
        failed=[NotReadyModel(name=f.name, folder=f.folder, reason=f.reason) for f in report.failed],
        event_ids=report.event_ids,
    )
