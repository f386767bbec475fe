"""``POST /predict``: one image -> both checkpoints of each requested pair, their maps, the drift report.

A thin handler over :mod:`engine.predict`: it reads the upload, calls the use case off the event loop,
writes (and commits) the audit row before the answer (if that fails, the client gets 503 and no
prediction), and encodes the maps. Options come as multipart form fields or as query parameters (a form
field wins).
"""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from core.vocabulary import METHODS
from engine.overlay import overlay_png
from engine.predict import MapMode, PairResult, PredictOptions, decode_image, predict_pairs, resolve_options
from engine.report import DriftReport
from engine.review_maps import review_maps
from service.app.concurrency import decode_limiter
from service.app.deps import PredictKeyDep, StateDep
from service.app.errors import ApiError, error_responses, request_id_of
from service.app.schemas import ImageInfo, PredictResponse
from service.app.state import AppState
from service.audit import chain as audit

log = logging.getLogger(__name__)

router = APIRouter(tags=["predict"])

_MODELS_HELP = (
    "comma-separated model names (folder names) or architectures (= that architecture's default version: "
    "the served name that sorts last); default: CXR_DRIFT_DEFAULT_MODELS, or every served pair"
)
_METHODS_HELP = f"comma-separated among {', '.join(METHODS)}; default: both"
_TARGET_HELP = "class index or name; default: the fine-tuned checkpoint's prediction"
_TOPK_HELP = "top-k percent for the overlap metrics, 5..50 (default 20)"
_MAPS_HELP = "none (default), overlay (base64 PNG per checkpoint) or raw (the (S, S) maps as nested lists)"


def _encode_maps(report: DriftReport, gray: np.ndarray, mode: MapMode) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for method, by_checkpoint in (report.maps or {}).items():
        out[method] = {}
        for checkpoint, cam in by_checkpoint.items():
            if mode == "overlay":
                out[method][checkpoint] = base64.b64encode(overlay_png(gray, cam)).decode("ascii")
            else:
                out[method][checkpoint] = np.asarray(cam, dtype=np.float64).tolist()
    return out


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000.0, 3)


@router.post(
    "/predict",
    response_model=PredictResponse,
    summary="predict with both checkpoints, compute their attribution maps and the drift report (audited)",
    responses=error_responses(401, 403, 408, 413, 415, 422, 503),
)
async def predict(
    request: Request,
    state: StateDep,
    principal: PredictKeyDep,
    file: Annotated[UploadFile, File(description="one PNG, JPEG or DICOM image")],
    models: Annotated[str | None, Form(description=_MODELS_HELP)] = None,
    methods: Annotated[str | None, Form(description=_METHODS_HELP)] = None,
    target_class: Annotated[str | None, Form(description=_TARGET_HELP)] = None,
    topk: Annotated[float | None, Form(ge=5, le=50, description=_TOPK_HELP)] = None,
    maps: Annotated[MapMode | None, Form(description=_MAPS_HELP)] = None,
    models_query: Annotated[str | None, Query(alias="models", description=_MODELS_HELP)] = None,
    methods_query: Annotated[str | None, Query(alias="methods", description=_METHODS_HELP)] = None,
    target_class_query: Annotated[str | None, Query(alias="target_class", description=_TARGET_HELP)] = None,
    topk_query: Annotated[float | None, Query(alias="topk", ge=5, le=50, description=_TOPK_HELP)] = None,
    maps_query: Annotated[MapMode | None, Query(alias="maps", description=_MAPS_HELP)] = None,
) -> Response:
    started = time.perf_counter()
    request_id = request_id_of(request.scope)
    # One snapshot for the whole request: a reload meanwhile changes what the next request sees, and the
    # pairs used here stay open until this request is done (service/app/registry.py).
    with state.registry.use() as snapshot:
        pairs = snapshot.pairs
        if not pairs:
            raise ApiError(
                503,
                "no_models",
                "no model pair is loaded; see GET /readyz for the reasons",
                details={"failed": [f.name for f in snapshot.failed]},
            )
        options = resolve_options(
            pairs,
            models=models if models is not None else models_query,
            methods=methods if methods is not None else methods_query,
            target_class=target_class if target_class is not None else target_class_query,
            topk=topk if topk is not None else topk_query,
            maps=maps if maps is not None else maps_query,
            default_models=state.settings.default_models,
        )
        timings: dict[str, float] = {}

        parts = len((await request.form()).getlist("file"))  # FastAPI parsed it already: this is its cache
        if parts != 1:
            raise ApiError(
                422,
                "validation_error",
                f"send exactly one file part, got {parts}",
                details={"file_parts": parts},
            )
        data = await file.read()
        t = time.perf_counter()
        settings = state.settings
        async with decode_limiter(request.app, settings).slot():
            image = await run_in_threadpool(
                decode_image,
                data,
                max_pixels=settings.max_pixels,
                max_pixels_per_byte=settings.max_pixels_per_byte,
            )
        del data
        timings["decode_ms"] = _ms(t)

        # maps for review (engine.review_maps): the engine must draw them even when the client wants none
        keep_maps = state.settings.keep_maps
        results: Sequence[PairResult] = await run_in_threadpool(
            state.inference.run, predict_pairs, pairs, image.gray, options, with_maps=keep_maps != "none"
        )
    timings.update({f"{r.report.model}_ms": r.elapsed_ms for r in results})
    reports = [r.report for r in results]

    image_info = ImageInfo(
        sha256=image.sha256,
        format=str(image.info.format),
        width=int(image.info.width),
        height=int(image.info.height),
        nbytes=image.nbytes,
    )
    t = time.perf_counter()
    appended = await _write_audit(
        state,
        request_id=request_id,
        api_key_name=principal.name,
        image=image_info,
        options=options,
        reports=reports,
        timings_ms=dict(timings),
    )
    timings["audit_ms"] = _ms(t)
    state.metrics.record_stages(timings)
    for report in reports:
        state.metrics.record_report(report)
    timings["total_ms"] = _ms(started)
    # Validating and encoding the answer (raw maps: several (S, S) float arrays per model) is CPU-bound:
    # do it off the event loop and hand FastAPI finished JSON (non-finite floats become null).
    body = await run_in_threadpool(
        _render_response,
        request_id=request_id,
        appended=appended,
        image=image_info,
        options=options,
        reports=reports,
        gray=image.gray,
        timings=timings,
    )
    return Response(content=body, media_type="application/json")


def _render_response(
    *,
    request_id: str,
    appended: Any,
    image: ImageInfo,
    options: PredictOptions,
    reports: Sequence[DriftReport],
    gray: np.ndarray,
    timings: dict[str, float],
) -> bytes:
    results = [
        {
            **report.to_dict(),
            "maps": _encode_maps(report, gray, options.maps) if options.maps != "none" else None,
        }
        for report in reports
    ]
    content = {
        "request_id": request_id,
        "audit_record_id": appended.id,
        "audit_row_hash": appended.row_hash,
        "image": image.model_dump(),
        "options": options.model_dump(),
        "results": results,
        "timings_ms": timings,
    }
    return PredictResponse.model_validate(content).model_dump_json(by_alias=True).encode()


async def _write_audit(
    state: AppState,
    *,
    request_id: str,
    api_key_name: str | None,
    image: ImageInfo,
    options: PredictOptions,
    reports: Sequence[DriftReport],
    timings_ms: dict[str, float],
) -> Any:
    """Append the audit row; any failure is a 503 and the prediction is not returned."""
    entry = audit.AuditEntry(
        request_id=request_id,
        created_at=datetime.now(UTC),
        api_key_name=api_key_name,
        image_sha256=image.sha256,
        image_format=image.format,
        image_width=image.width,
        image_height=image.height,
        image_nbytes=image.nbytes,
        options=options.model_dump(),
        reports=list(reports),
        timings_ms=timings_ms,
        maps=review_maps(reports, state.settings.keep_maps),
    )
    try:
        return await run_in_threadpool(audit.append, state.engine, entry)
    except Exception as exc:
        state.metrics.audit_failures.inc()
        log.error("audit write failed for request %s: %s: %s", request_id, type(exc).__name__, exc)
        raise ApiError(
            503,
            "audit_unavailable",
            "the audit record could not be written, so no prediction is returned; retry later",
            details={"request_id": request_id, "reason": f"{type(exc).__name__}"},
        ) from exc
