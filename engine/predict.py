"""The prediction use case, without HTTP: image bytes -> decoded pixels; options -> checked options; pixels and
options -> one typed :class:`engine.report.DriftReport` per model pair.

``POST /predict`` (service/app/routes/predict.py) calls these functions; so can a script, the study or a test. Every refusal is a
:class:`core.errors.InputError` (or an image-decoding subclass of it) with a stable ``code`` and ``details``
naming the valid options; anything else raised here is a bug.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
from pydantic import BaseModel, ConfigDict

from core.errors import ArtifactError, InputError
from core.imageio import ImageDecodeError, ImageInfo, read_image_with_info
from core.vocabulary import METHODS
from engine.report import DriftReport, drift_report
from engine.runtime import ModelPair

__all__ = [
    "MAP_MODES",
    "TOPK_RANGE",
    "DecodedImage",
    "MapMode",
    "PairResult",
    "PredictOptions",
    "decode_image",
    "predict_pairs",
    "resolve_models",
    "resolve_options",
]

MapMode = Literal["none", "overlay", "raw"]
MAP_MODES: tuple[str, ...] = get_args(MapMode)
TOPK_RANGE = (5.0, 50.0)
DEFAULT_TOPK = 20.0
_INTEGER = re.compile(r"-?[0-9]{1,9}")


class PredictOptions(BaseModel):
    """What a prediction was asked for, after checking: it is echoed in the answer and stored in the audit."""

    model_config = ConfigDict(frozen=True)

    models: list[str]
    methods: list[str]
    target_class: int | str | None
    topk: float
    maps: MapMode


@dataclass(frozen=True)
class DecodedImage:
    """A decoded upload: grayscale pixels in [0, 1], what was decoded, and the SHA-256 of the bytes."""

    gray: np.ndarray
    info: ImageInfo
    sha256: str
    nbytes: int


@dataclass(frozen=True)
class PairResult:
    """One model pair's report and how long it took."""

    report: DriftReport
    elapsed_ms: float


def _split(value: str | None) -> list[str] | None:
    if value is None or not value.strip():
        return None
    return list(dict.fromkeys(p.strip() for p in value.split(",") if p.strip()))


def resolve_models(
    pairs: Mapping[str, ModelPair], requested: Sequence[str], *, strict: bool = True
) -> list[str]:
    """The served names that ``requested`` names (order kept, duplicates dropped).

    Each entry is a model name (a pair's folder name) or an architecture. A name wins; an architecture that
    is no name means that architecture's **default version**: among the served pairs of that architecture,
    the one whose name sorts last (so ``densenet201-2027-01`` beats ``densenet201-2026-12`` and
    ``densenet201``). With ``strict``, an entry that names nothing is an ``unknown_model`` error; otherwise
    it is left out.
    """
    ready = sorted(pairs)
    by_architecture: dict[str, str] = {}
    for name in ready:  # sorted: the last name of an architecture wins
        by_architecture[str(getattr(pairs[name], "architecture", name))] = name
    chosen: list[str] = []
    unknown: list[str] = []
    for entry in requested:
        found = entry if entry in pairs else by_architecture.get(entry)
        if found is None:
            unknown.append(entry)
        elif found not in chosen:
            chosen.append(found)
    if unknown and strict:
        valid = ready + sorted(a for a in by_architecture if a not in pairs)
        raise InputError(
            f"unknown or not loaded model(s) {', '.join(map(repr, unknown))}; valid options: {', '.join(valid)} "
            "(a model name, or an architecture for its default version)",
            code="unknown_model",
            details={"unknown": unknown, "valid": valid},
        )
    return chosen


def resolve_options(
    pairs: Mapping[str, ModelPair],
    *,
    models: str | None = None,
    methods: str | None = None,
    target_class: str | None = None,
    topk: float | None = None,
    maps: str | None = None,
    default_models: Sequence[str] = (),
) -> PredictOptions:
    """Check the raw options (comma-separated lists, a class index or name...) against the loaded ``pairs``.

    Defaults: ``default_models`` (names or architectures, :func:`resolve_models`; those not served are left
    out) or, when empty, every pair; both methods, the fine-tuned prediction as target, top-20 %, no maps.
    """
    ready = sorted(pairs)
    if not ready:
        raise ArtifactError("no model pair is loaded", code="no_models")
    requested = _split(models)
    if requested is not None:
        chosen_models = resolve_models(pairs, requested)
    elif default_models:
        chosen_models = resolve_models(pairs, list(default_models), strict=False)
        if not chosen_models:
            raise ArtifactError(
                f"none of the default models ({', '.join(default_models)}) is served; choose with models= "
                f"among {', '.join(ready)}",
                code="no_models",
            )
    else:
        chosen_models = ready
    chosen_methods = _split(methods) or list(METHODS)
    bad_methods = [m for m in chosen_methods if m not in METHODS]
    if bad_methods:
        raise InputError(
            f"unknown method(s) {', '.join(map(repr, bad_methods))}; valid options: {', '.join(METHODS)}",
            code="unknown_method",
            details={"unknown": bad_methods, "valid": list(METHODS)},
        )
    chosen_topk = DEFAULT_TOPK if topk is None else float(topk)
    if not np.isfinite(chosen_topk) or not TOPK_RANGE[0] <= chosen_topk <= TOPK_RANGE[1]:
        raise InputError(f"topk must be in 5..50 (percent), got {topk}", code="validation_error")
    chosen_maps = (maps or "none").strip().lower()
    if chosen_maps not in MAP_MODES:
        raise InputError(f"maps must be one of {', '.join(MAP_MODES)}, got {maps!r}", code="validation_error")
    target: int | str | None = None
    if target_class is not None and target_class.strip():
        text = target_class.strip()
        # ASCII digits only: str.isdigit() also accepts "²" or "--5", which int() refuses
        target = int(text) if _INTEGER.fullmatch(text) else text
        for name in chosen_models:
            _check_target(name, list(pairs[name].class_names), target)
    return PredictOptions(
        models=chosen_models,
        methods=chosen_methods,
        target_class=target,
        topk=chosen_topk,
        maps=chosen_maps,  # type: ignore[arg-type]
    )


def _check_target(model: str, class_names: list[str], target: int | str) -> None:
    if isinstance(target, int):
        if not 0 <= target < len(class_names):
            raise InputError(
                f"target_class index {target} is out of range for {model!r} ({len(class_names)} classes: "
                f"0..{len(class_names) - 1} = {', '.join(class_names)})",
                code="unknown_class",
                details={"model": model, "valid": class_names},
            )
    elif target not in class_names:
        raise InputError(
            f"unknown target_class {target!r} for {model!r}; valid options: {', '.join(class_names)} "
            f"(or an index 0..{len(class_names) - 1})",
            code="unknown_class",
            details={"model": model, "valid": class_names},
        )


def decode_image(data: bytes, *, max_pixels: int, max_pixels_per_byte: float | None = None) -> DecodedImage:
    """Hash and decode an upload; every failure is an :class:`ImageDecodeError` (or a subclass).

    ``max_pixels_per_byte``: see :func:`core.imageio.read_image_with_info`.
    """
    if not data:
        raise InputError("the uploaded file is empty; send one PNG, JPEG or DICOM image", code="empty_file")
    digest = hashlib.sha256(data).hexdigest()
    try:
        gray, info = read_image_with_info(
            data, max_pixels=max_pixels, max_pixels_per_byte=max_pixels_per_byte
        )
    except InputError:  # ImageDecodeError and its subclasses: already the client's error, with its code
        raise
    except Exception as exc:
        # decoders (PIL, pydicom, their plugins) raise many types on corrupt input (ValueError, OSError,
        # IndexError, struct.error, RuntimeError, NotImplementedError...); none of them is the server's fault
        raise ImageDecodeError(f"{type(exc).__name__}: {exc}") from exc
    return DecodedImage(gray=gray, info=info, sha256=digest, nbytes=len(data))


def predict_pair(
    pair: ModelPair, gray: np.ndarray, options: PredictOptions, *, with_maps: bool = False
) -> PairResult:
    """The drift report of one model pair for one image (maps kept when ``options.maps`` asks for them, or
    ``with_maps``: the service keeps low-resolution maps for review, :mod:`engine.review_maps`)."""
    started = time.perf_counter()
    try:
        report = drift_report(
            pair,
            gray,
            methods=tuple(options.methods),
            target_class=options.target_class,
            topk_percent=options.topk,
            include_maps=options.maps != "none" or with_maps,
        )
    except InputError as exc:
        raise InputError(
            f"{pair.name}: {exc}", code=exc.code or "invalid_input", details={"model": pair.name}
        ) from exc
    return PairResult(report=report, elapsed_ms=round((time.perf_counter() - started) * 1000.0, 3))


def predict_pairs(
    pairs: Mapping[str, ModelPair], gray: np.ndarray, options: PredictOptions, *, with_maps: bool = False
) -> Sequence[PairResult]:
    """:func:`predict_pair` for every model in ``options.models``, in that order."""
    return [predict_pair(pairs[name], gray, options, with_maps=with_maps) for name in options.models]
