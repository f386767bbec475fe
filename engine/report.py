"""The drift report of one radiograph: both checkpoints' predictions, their attribution maps for the same
class, every drift metric per method, a drift score and its severity.

Pipeline per batch: ``core.preprocess.preprocess`` -> one forward per checkpoint (logits + features) ->
closed-form LayerCAM / GradCAM++ for the target class (:mod:`engine.cams`) -> metrics
(:func:`engine.metrics.compare_maps`). The target class is the fine-tuned model's prediction unless
one is requested; the score that is attributed is the class *logit*, never a softmax probability
(docs/DESIGN.md trap 3). Probabilities are reported for display only.

Metrics are computed on a common *analysis grid* (``metric_size``, default 64 x 64): the maps are the
library's normalized maps, bilinearly resized from the native CAM grid (7x7 to 9x9 at native input sizes),
so a 64 x 64 grid keeps everything the native grid holds, makes the metrics comparable between
architectures with different input sizes (224 vs 299 px: SSIM's 7x7 window spans the same share of the
image) and costs a fraction of the input-size grid. ``metric_size=None`` uses the input size. The EMD uses the
native grid.

Drift score (per method): ``1 - IoU_k``, the top-``topk_percent`` % IoU between the transfer and the
fine-tuned map, in [0, 1]: 0 when both checkpoints rank the same pixels highest, 1 when their top regions are
disjoint. Severity: ``high`` if score >= thresholds["high"], ``moderate`` if >= thresholds["moderate"], else
``low``; ``flagged`` is ``severity == "high"``. Thresholds come from the manifest's ``drift_thresholds``
(written by ``cxr-drift calibrate``) when present for the same score, else the documented fallback
:data:`FALLBACK_THRESHOLDS` (``calibrated: false``).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypedDict

import numpy as np

from core.errors import InputError
from core.preprocess import preprocess_batch
from core.vocabulary import CHECKPOINTS
from engine.cams import DEFAULT_EPS, METHODS, CamResult, closed_form_cams, postprocess
from engine.metrics import DEFAULT_K_GRID, compare_maps, map_flags
from engine.reference import reference_cams
from engine.runtime import ModelPair

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_METRIC_SIZE",
    "EPS_DOMINATED_FRACTION",
    "FALLBACK_THRESHOLDS",
    "METHODS",
    "DriftReport",
    "MethodResult",
    "Prediction",
    "TargetClass",
    "drift_report",
    "drift_reports",
    "resolve_target_class",
    "severity_of",
    "thresholds_for",
]

DEFAULT_METRIC_SIZE = 64
# Uncalibrated severity cut-offs for the score 1 - IoU@20%. Two unrelated maps score ~0.9 (random top-20%
# sets overlap with IoU 0.2 / 1.8 = 0.11); the paper's mean LayerCAM IoU of 0.6-0.8 between checkpoints
# scores 0.2-0.4. "moderate" starts where less than 60% of the top region is shared, "high" below 40%.
FALLBACK_THRESHOLDS: dict[str, float] = {"moderate": 0.4, "high": 0.6}
# GradCAM++ maps whose denominators are mostly eps are cubic in the head weights (docs/DESIGN.md trap 2)
EPS_DOMINATED_FRACTION = 0.5


def _score_name(topk_percent: float) -> str:
    return f"1 - top-{topk_percent:g}% IoU"


# One checkpoint's prediction: the arg-max class and the softmax probabilities (display only). Functional
# form because "class" is a keyword.
Prediction = TypedDict("Prediction", {"index": int, "class": str, "probabilities": dict[str, float]})


class TargetClass(TypedDict):
    """The class both checkpoints' maps explain, and where it came from."""

    index: int
    name: str
    source: str  # "finetuned_prediction" or "requested"


class MethodResult(TypedDict):
    """One attribution method's comparison of the two checkpoints' maps."""

    metrics: dict[str, Any]  # engine.metrics.compare_maps
    drift_score: float
    severity: str  # "low", "moderate" or "high"
    flagged: bool
    flags: list[str]
    diagnostics: dict[str, Any]


@dataclass
class DriftReport:
    """One image's report for one model pair: what the service returns and the audit layer stores.

    :meth:`to_dict` is its JSON form (without the maps).
    """

    model: str
    class_names: list[str]
    predictions: dict[str, Prediction]  # by checkpoint
    agreement: bool
    target_class: TargetClass
    methods: dict[str, MethodResult]  # by method
    thresholds: dict[str, Any]
    timings_ms: dict[str, float]
    maps: dict[str, dict[str, np.ndarray]] | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "class_names": list(self.class_names),
            "predictions": self.predictions,
            "agreement": self.agreement,
            "target_class": self.target_class,
            "methods": self.methods,
            "thresholds": self.thresholds,
            "timings_ms": self.timings_ms,
        }


def resolve_target_class(target: int | str | None, class_names: Sequence[str]) -> int | None:
    """Class index for a requested target (index or name); ``None`` stays ``None`` (= the FT prediction)."""
    if target is None:
        return None
    valid = ", ".join(f"{i}={n}" for i, n in enumerate(class_names))
    if isinstance(target, bool) or not isinstance(target, int | str | np.integer):
        raise InputError(
            f"target_class must be a class index or name, got {target!r}; valid classes: {valid}"
        )
    if isinstance(target, str):
        if target in class_names:
            return list(class_names).index(target)
        raise InputError(f"unknown target class {target!r}; valid classes: {valid}")
    if not 0 <= int(target) < len(class_names):
        raise InputError(f"target class index {int(target)} is out of range; valid classes: {valid}")
    return int(target)


def thresholds_for(
    manifest_thresholds: Mapping[str, Any] | None, *, methods: Sequence[str], topk_percent: float
) -> dict[str, Any]:
    """Severity thresholds per method: the calibrated ones when the manifest has them for this score."""
    score = _score_name(topk_percent)
    calibrated: dict[str, dict[str, float]] = {}
    if manifest_thresholds:
        per_method = manifest_thresholds.get("methods", {})
        same_score = manifest_thresholds.get("score") == score
        if not same_score:
            log.warning(
                "manifest drift thresholds are for %r, not %r: using the fallback",
                manifest_thresholds.get("score"),
                score,
            )
        for method in methods:
            entry = per_method.get(method) if same_score and isinstance(per_method, Mapping) else None
            if isinstance(entry, Mapping) and {"moderate", "high"} <= set(entry):
                calibrated[method] = {"moderate": float(entry["moderate"]), "high": float(entry["high"])}
    if calibrated and len(calibrated) == len(methods):
        out: dict[str, Any] = {"calibrated": True, "source": "manifest", "score": score}
        if manifest_thresholds is not None:
            out.update(
                {k: manifest_thresholds[k] for k in ("subset", "n", "created_at") if k in manifest_thresholds}
            )
        return {**out, **calibrated}
    return {
        "calibrated": False,
        "source": "fallback",
        "score": score,
        **{m: dict(FALLBACK_THRESHOLDS) for m in methods},
    }


def severity_of(score: float, thresholds: Mapping[str, float]) -> str:
    """``"high"`` if score >= thresholds["high"], ``"moderate"`` if >= thresholds["moderate"], else ``"low"``."""
    if score >= thresholds["high"]:
        return "high"
    if score >= thresholds["moderate"]:
        return "moderate"
    return "low"


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _check_grays(grays: Sequence[np.ndarray]) -> None:
    if len(grays) == 0:
        raise InputError("expected at least one image, got none")
    for i, gray in enumerate(grays):
        arr = np.asarray(gray)
        if arr.ndim != 2:
            raise InputError(f"image {i}: expected a grayscale (H, W) array, got shape {arr.shape}")
        if not np.isfinite(arr).all():
            raise InputError(f"image {i}: contains NaN or infinite values")


def drift_report(
    pair: ModelPair,
    gray: np.ndarray,
    *,
    methods: Sequence[str] = METHODS,
    target_class: int | str | None = None,
    topk_percent: float = 20.0,
    eps: float = DEFAULT_EPS,
    include_maps: bool = False,
    metric_size: int | None = DEFAULT_METRIC_SIZE,
    attribution: str = "closed_form",
) -> DriftReport:
    """The drift report of one grayscale image (H, W) float32 in [0, 1]; see the module docstring."""
    return drift_reports(
        pair,
        [gray],
        methods=methods,
        target_class=target_class,
        topk_percent=topk_percent,
        eps=eps,
        include_maps=include_maps,
        metric_size=metric_size,
        attribution=attribution,
    )[0]


def drift_reports(
    pair: ModelPair,
    grays: Sequence[np.ndarray],
    *,
    methods: Sequence[str] = METHODS,
    target_class: int | str | None = None,
    topk_percent: float = 20.0,
    eps: float = DEFAULT_EPS,
    include_maps: bool = False,
    metric_size: int | None = DEFAULT_METRIC_SIZE,
    attribution: str = "closed_form",
) -> list[DriftReport]:
    """Reports for a batch of images (one forward per checkpoint for the whole batch).

    ``attribution="reference"`` computes the maps with pytorch-grad-cam instead (needs a pair loaded with
    ``backend="torch"``): the slow path, for checks and benchmarks. Timings are per image (batch / B).
    """
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise InputError(
            f"unknown CAM method(s) {unknown or list(methods)}; valid options: {', '.join(METHODS)}"
        )
    if attribution not in ("closed_form", "reference"):
        raise InputError(f"unknown attribution {attribution!r}; valid options: closed_form, reference")
    requested = resolve_target_class(target_class, pair.class_names)
    _check_grays(grays)
    if not 0.0 < float(topk_percent) <= 100.0:  # fail before the forward, not after it
        raise InputError(f"topk_percent must be in (0, 100], got {topk_percent!r}")
    if metric_size is not None and (isinstance(metric_size, bool) or int(metric_size) < 3):
        raise InputError(f"metric_size must be an int >= 3 (SSIM needs 3x3) or None, got {metric_size!r}")
    size = pair.input_size
    grid = size if metric_size is None else min(int(metric_size), size)
    timings: dict[str, float] = {}

    start = time.perf_counter()
    batch = preprocess_batch(grays, input_size=size, mean=pair.mean, std=pair.std)
    timings["preprocess"] = time.perf_counter() - start

    start = time.perf_counter()
    if attribution == "closed_form":
        outputs = pair.forward(batch)
        logits = {name: outputs[name].logits for name in CHECKPOINTS}
        classes = logits["finetuned"].argmax(axis=1) if requested is None else np.full(len(grays), requested)
        timings["forward"] = time.perf_counter() - start
        start = time.perf_counter()
        cams = {
            (method, name): closed_form_cams(
                outputs[name].features,
                pair.head_weights[name],
                classes,
                method=method,
                input_size=grid,
                eps=eps,
            )
            for method in methods
            for name in CHECKPOINTS
        }
    else:
        cams, logits, classes = _reference_cams(pair, batch, methods, requested, grid)
        timings["forward"] = 0.0  # the library's forwards are part of its CAM calls
    display: dict[tuple[str, str], np.ndarray] = {}
    if include_maps:
        for key, res in cams.items():
            display[key] = res.maps if grid == size else postprocess(res.raw, size)[0]
    timings["cams"] = time.perf_counter() - start

    start = time.perf_counter()
    thresholds = thresholds_for(pair.drift_thresholds, methods=methods, topk_percent=topk_percent)
    reports = []
    for i in range(len(grays)):
        per_method = {
            method: _method_entry(
                cams[(method, "transfer")], cams[(method, "finetuned")], i, topk_percent, thresholds[method]
            )
            for method in methods
        }
        reports.append(
            DriftReport(
                model=pair.name,
                class_names=list(pair.class_names),
                predictions={name: _prediction(logits[name][i], pair.class_names) for name in CHECKPOINTS},
                agreement=bool(logits["transfer"][i].argmax() == logits["finetuned"][i].argmax()),
                target_class={
                    "index": int(classes[i]),
                    "name": pair.class_names[int(classes[i])],
                    "source": "finetuned_prediction" if requested is None else "requested",
                },
                methods=per_method,
                thresholds=copy.deepcopy(thresholds),  # each report owns its dicts, as a single report does
                timings_ms={},
                maps={m: {n: display[(m, n)][i] for n in CHECKPOINTS} for m in methods}
                if include_maps
                else None,
            )
        )
    timings["metrics"] = time.perf_counter() - start
    per_image = {k: round(1000.0 * v / len(grays), 3) for k, v in timings.items()}
    for report in reports:
        report.timings_ms = dict(per_image)
    return reports


def _prediction(logits: np.ndarray, class_names: Sequence[str]) -> Prediction:
    probs = _softmax(logits[None, :])[0]
    index = int(logits.argmax())
    return {
        "index": index,
        "class": class_names[index],
        "probabilities": {name: float(p) for name, p in zip(class_names, probs, strict=True)},
    }


def _method_entry(
    transfer: CamResult, finetuned: CamResult, i: int, topk_percent: float, thresholds: Mapping[str, float]
) -> MethodResult:
    metrics = compare_maps(
        transfer.maps[i],
        finetuned.maps[i],
        p_native=transfer.native[i],
        q_native=finetuned.native[i],
        topk=topk_percent,
        k_grid=DEFAULT_K_GRID,
    )
    score = float(np.clip(1.0 - metrics["iou"], 0.0, 1.0))
    flags: list[str] = []
    for name, res in (("transfer", transfer), ("finetuned", finetuned)):
        # a map without signal normalizes to all zeros; the raw map tells "no mass" from "flat non-zero"
        kind = next(iter(map_flags(res.raw[i] if res.all_zero[i] else res.maps[i])), None)
        if kind:
            flags.append(f"{name}_map_{kind}")
    diagnostics: dict[str, Any] = {
        "native_grid": list(transfer.native.shape[1:]),
        "metric_grid": list(transfer.maps.shape[1:]),
    }
    if transfer.eps_fraction is not None and finetuned.eps_fraction is not None:
        fractions = {
            "transfer": float(transfer.eps_fraction[i]),
            "finetuned": float(finetuned.eps_fraction[i]),
        }
        diagnostics["eps_fraction"] = fractions
        flags.extend(f"{n}_eps_dominated" for n, v in fractions.items() if v > EPS_DOMINATED_FRACTION)
    severity = severity_of(score, thresholds)
    return {
        "metrics": metrics,
        "drift_score": score,
        "severity": severity,
        "flagged": severity == "high",
        "flags": flags,
        "diagnostics": diagnostics,
    }


def _reference_cams(
    pair: ModelPair, batch: np.ndarray, methods: Sequence[str], requested: int | None, grid: int
) -> tuple[dict[tuple[str, str], CamResult], dict[str, np.ndarray], np.ndarray]:
    """pytorch-grad-cam maps: 2 checkpoints x len(methods) calls, each a forward + backward."""
    cams: dict[tuple[str, str], CamResult] = {}
    logits: dict[str, np.ndarray] = {}
    classes: np.ndarray | None = None if requested is None else np.full(batch.shape[0], requested)
    for name in ("finetuned", "transfer"):  # the fine-tuned call picks the default target class
        model = pair.torch_model(name)
        for method in methods:
            ref = reference_cams(model, batch, classes, method=method)
            if classes is None:
                classes = ref.logits.argmax(axis=1)
            logits[name] = ref.logits
            maps, native = postprocess(ref.native, grid)
            cams[(method, name)] = CamResult(
                method=method,
                maps=maps,
                native=native,
                raw=ref.native.astype(np.float64),
                all_zero=ref.native.max(axis=(1, 2)) <= 0,
                eps_fraction=None,  # the library does not expose its denominators
            )
    if classes is None:
        raise ValueError("no CAM method requested")
    return cams, logits, classes
