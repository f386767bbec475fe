"""``POST /predict``: one image -> both checkpoints of each requested pair, their maps, the drift report.

The audit row is written (and committed) before the answer: if it cannot be, the client gets 503 and no
prediction. Options come as multipart form fields or as query parameters (a form field wins).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from core.vocabulary import METHODS
from service.app.deps import PredictKeyDep, StateDep
from service.app.errors import ApiError, error_responses
from service.app.schemas import ImageInfo, PredictResponse
from service.app.state import AppState

log = logging.getLogger(__name__)

router = APIRouter(tags=["predict"])

MAP_MODES = ("none", "overlay", "raw")
TOPK_RANGE = (5.0, 50.0)
MapMode = Literal["none", "overlay", "raw"]
_INTEGER = re.compile(r"-?[0-9]{1,9}")

_MODELS_HELP = "comma-separated model pair names; default: every loaded pair"
_METHODS_HELP = f"comma-separated among {', '.join(METHODS)}; default: both"
_TARGET_HELP = "class index or name; default: the fine-tuned checkpoint's prediction"
_TOPK_HELP = "top-k percent for the overlap metrics, 5..50 (default 20)"
_MAPS_HELP = "none (default), overlay (base64 PNG per checkpoint) or raw (the (S, S) maps as nested lists)"


@dataclass(frozen=True)
class _Options:
    models: list[str]
    methods: list[str]
    target_class: int | str | None
    topk: float
    maps: MapMode


def _split(value: str | None) -> list[str] | None:
    if value is None or not value.strip():
        return None
    return list(dict.fromkeys(p.strip() for p in value.split(",") if p.strip()))


def _resolve_options(
    state: AppState,
    *,
    models: str | None,
    methods: str | None,
    target_class: str | None,
    topk: float | None,
    maps: str | None,
) -> _Options:
    ready = state.ready_names()
    if not ready:
        raise ApiError(
            503,
            "no_models",
            "no model pair is loaded; see GET /readyz for the reasons",
            details={"failed": [f.name for f in state.failed]},
        )
    chosen_models = _split(models) or ready
    unknown = [m for m in chosen_models if m not in state.pairs]
    if unknown:
        raise ApiError(
            422,
            "unknown_model",
            f"unknown or not loaded model(s) {', '.join(map(repr, unknown))}; "
            f"valid options: {', '.join(ready)}",
            details={"unknown": unknown, "valid": ready},
        )
    chosen_methods = _split(methods) or list(METHODS)
    bad_methods = [m for m in chosen_methods if m not in METHODS]
    if bad_methods:
        raise ApiError(
            422,
            "unknown_method",
            f"unknown method(s) {', '.join(map(repr, bad_methods))}; valid options: {', '.join(METHODS)}",
            details={"unknown": bad_methods, "valid": list(METHODS)},
        )
    chosen_topk = 20.0 if topk is None else float(topk)
    if not (TOPK_RANGE[0] <= chosen_topk <= TOPK_RANGE[1]) or not np.isfinite(chosen_topk):
        raise ApiError(422, "validation_error", f"topk must be in 5..50 (percent), got {topk}")
    chosen_maps = (maps or "none").strip().lower()
    if chosen_maps not in MAP_MODES:
        raise ApiError(422, "validation_error", f"maps must be one of {', '.join(MAP_MODES)}, got {maps!r}")
    target: int | str | None = None
    if target_class is not None and target_class.strip():
        text = target_class.strip()
        # ASCII digits only: str.isdigit() also accepts "²" or "--5", which int() refuses
        target = int(text) if _INTEGER.fullmatch(text) else text
        for name in chosen_models:
            _check_target(name, list(state.pairs[name].class_names), target)
    return _Options(
        models=chosen_models,
        methods=chosen_methods,
        target_class=target,
        topk=chosen_topk,
        maps=chosen_maps,  # type: ignore[arg-type]
    )


def _check_target(model: str, class_names: list[str], target: int | str) -> None:
    if isinstance(target, int):
        if not 0 <= target < len(class_names):
            raise ApiError(
                422,
                "unknown_class",
                f"target_class index {target} is out of range for {model!r} ({len(class_names)} classes: "
                f"0..{len(class_names) - 1} = {', '.join(class_names)})",
                details={"model": model, "valid": class_names},
            )
    elif target not in class_names:
        raise ApiError(
            422,
            "unknown_class",
            f"unknown target_class {target!r} for {model!r}; valid options: {', '.join(class_names)} "
            f"(or an index 0..{len(class_names) - 1})",
            details={"model": model, "valid": class_names},
        )


def _decode(data: bytes, max_pixels: int) -> tuple[np.ndarray, Any]:
    from core.imageio import (
        ImageDecodeError,
        ImageTooLargeError,
        NoPixelDataError,
        UnsupportedFormatError,
        read_image_with_info,
    )

    try:
        return read_image_with_info(data, max_pixels=max_pixels)
    except ImageTooLargeError as exc:
        raise ApiError(413, "image_too_large", str(exc), details={"max_pixels": max_pixels}) from exc
    except UnsupportedFormatError as exc:
        raise ApiError(
            415, "unsupported_media_type", str(exc), details={"valid": ["png", "jpeg", "dicom"]}
        ) from exc
    except NoPixelDataError as exc:
        raise ApiError(422, "no_pixel_data", str(exc)) from exc
    except ImageDecodeError as exc:
        raise ApiError(422, "undecodable_image", str(exc)) from exc
    except Exception as exc:
        # decoders (PIL, pydicom, their plugins) raise many types on corrupt input (ValueError, OSError,
        # IndexError, struct.error, RuntimeError, NotImplementedError...); none of them is the server's fault
        raise ApiError(
            422, "undecodable_image", f"cannot decode image bytes: {type(exc).__name__}: {exc}"
        ) from exc


def _encode_maps(report: Any, gray: np.ndarray, mode: MapMode) -> dict[str, dict[str, Any]]:
    from engine.overlay import overlay_png

    out: dict[str, dict[str, Any]] = {}
    for method, by_checkpoint in report.maps.items():
        out[method] = {}
        for checkpoint, cam in by_checkpoint.items():
            if mode == "overlay":
                out[method][checkpoint] = base64.b64encode(overlay_png(gray, cam)).decode("ascii")
            else:
                out[method][checkpoint] = np.asarray(cam, dtype=np.float64).tolist()
    return out


def _run_pair(pair: Any, gray: np.ndarray, options: _Options) -> tuple[dict[str, Any], dict[str, Any] | None]:
    from engine.report import drift_report

    report = drift_report(
        pair,
        gray,
        methods=tuple(options.methods),
        target_class=options.target_class,
        topk_percent=options.topk,
        include_maps=options.maps != "none",
    )
    as_dict = dict(report.to_dict())
    as_dict.pop("maps", None)  # the audit row never holds maps
    maps = _encode_maps(report, gray, options.maps) if options.maps != "none" else None
    return as_dict, maps


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000.0, 3)


@router.post(
    "/predict",
    response_model=PredictResponse,
    summary="predict with both checkpoints, compute their attribution maps and the drift report (audited)",
    responses=error_responses(401, 403, 413, 415, 422, 503),
)
async def predict(
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
    settings = state.settings
    options = _resolve_options(
        state,
        models=models if models is not None else models_query,
        methods=methods if methods is not None else methods_query,
        target_class=target_class if target_class is not None else target_class_query,
        topk=topk if topk is not None else topk_query,
        maps=maps if maps is not None else maps_query,
    )
    request_id = uuid.uuid4().hex
    timings: dict[str, float] = {}

    t = time.perf_counter()
    data = await file.read()
    if not data:
        raise ApiError(422, "empty_file", "the uploaded file is empty; send one PNG, JPEG or DICOM image")
    image_sha256, (gray, info) = await run_in_threadpool(_hash_and_decode, data, settings.max_pixels)
    timings["decode_ms"] = _ms(t)

    reports: list[dict[str, Any]] = []
    maps_by_model: dict[str, dict[str, Any] | None] = {}
    for name in options.models:
        t = time.perf_counter()
        try:
            report, pair_maps = await run_in_threadpool(_run_pair, state.pairs[name], gray, options)
        except ApiError:
            raise
        except ValueError as exc:
            # options were checked above; what is left is an input the engine refuses
            raise ApiError(422, "invalid_input", f"{name}: {exc}", details={"model": name}) from exc
        timings[f"{name}_ms"] = _ms(t)
        reports.append(report)
        maps_by_model[name] = pair_maps

    option_record = {
        "models": options.models,
        "methods": options.methods,
        "target_class": options.target_class,
        "topk": options.topk,
        "maps": options.maps,
    }
    image = ImageInfo(
        sha256=image_sha256,
        format=str(info.format),
        width=int(info.width),
        height=int(info.height),
        nbytes=len(data),
    )
    t = time.perf_counter()
    appended = await _write_audit(
        state,
        request_id=request_id,
        api_key_name=principal.name,
        image=image,
        options=option_record,
        reports=reports,
        timings_ms=dict(timings),
    )
    timings["audit_ms"] = _ms(t)
    for report in reports:
        state.metrics.record_report(report)
    timings["total_ms"] = _ms(started)

    results = [{**report, "maps": maps_by_model.get(str(report.get("model")))} for report in reports]
    # Validating and encoding the answer (raw maps: several (S, S) float arrays per model) is CPU-bound:
    # do it off the event loop and hand FastAPI finished JSON (non-finite floats become null).
    body = await run_in_threadpool(
        _render_response,
        {
            "request_id": request_id,
            "audit_record_id": appended.id,
            "audit_row_hash": appended.row_hash,
            "image": image.model_dump(),
            "options": option_record,
            "results": results,
            "timings_ms": timings,
        },
    )
    return Response(content=body, media_type="application/json")


def _render_response(content: dict[str, Any]) -> bytes:
    return PredictResponse.model_validate(content).model_dump_json(by_alias=True).encode()


def _hash_and_decode(data: bytes, max_pixels: int) -> tuple[str, tuple[np.ndarray, Any]]:
    return hashlib.sha256(data).hexdigest(), _decode(data, max_pixels)


async def _write_audit(
    state: AppState,
    *,
    request_id: str,
    api_key_name: str | None,
    image: ImageInfo,
    options: dict[str, Any],
    reports: list[dict[str, Any]],
    timings_ms: dict[str, float],
) -> Any:
    """Append the audit row; any failure is a 503 and the prediction is not returned."""
    from service.app import audit

    entry = audit.AuditEntry(
        request_id=request_id,
        created_at=datetime.now(UTC),
        api_key_name=api_key_name,
        image_sha256=image.sha256,
        image_format=image.format,
        image_width=image.width,
        image_height=image.height,
        image_nbytes=image.nbytes,
        options=options,
        reports=reports,
        timings_ms=timings_ms,
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
