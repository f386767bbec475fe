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
disjoint. Severity is absolute (:mod:`engine.severity`): ``drift_index`` places the score between the
pair's noise floor (calibrated: how far the transfer checkpoint's own evidence moves under benign input
changes) and chance (unrelated maps), and fixed bands of it give ``low``/``moderate``/``high``; ``flagged``
is ``severity == "high"`` (GradCAM++: and not head-scale dominated, below). ``reference_percentile`` is how
unusual the score is *for this pair* (among its calibration images of the target class, or pooled) and
never changes severity. Without a calibration (``cxr-drift calibrate``) the floor is 0, there is no
percentile, and ``thresholds.calibrated`` is false. ``thresholds`` holds the anchors and bands used.

When the two checkpoints predict different classes, each method entry also carries ``own_prediction``:
the transfer map for the transfer prediction against the fine-tuned map for the fine-tuned prediction
(each checkpoint's evidence for what it decided), beside the common-target comparison.

GradCAM++ and head scale (docs/DESIGN.md trap 2). GradCAM++ weights depend on the *magnitude* of the head's
gradients, so a fine-tuned head that is only larger moves the map without any change in evidence. The
GradCAM++ entry carries a closed-form head-scale control (:func:`engine.cams.head_scale_control`: the
transfer features with the transfer head rescaled to the fine-tuned head's Frobenius norm, no extra
forward) in ``diagnostics.head_scale_control``: ``norm_ratio``, the control's ``iou`` / ``iou_k`` /
``drift_score`` against the transfer map, the ``real_drift_score``, ``head_scale_explained`` = control
drift / real drift clipped to [0, 1] (None when the real drift is below :data:`engine.regime.HEAD_SCALE_MIN_DRIFT`),
``residual_drift_score`` = 1 - IoU(control, fine-tuned map) (the drift left once head scale is matched)
and ``dominated``. The drift is *head-scale dominated* when ``head_scale_explained >=``
:data:`engine.regime.HEAD_SCALE_EXPLAINED` and the residual drift is not ``high`` on the absolute scale; the entry
then gets the flag :data:`engine.regime.HEAD_SCALE_FLAG`. **``severity`` stays as computed from the drift score (it
describes how far the maps moved), but ``flagged`` is False for a head-scale dominated entry**: ``flagged``
means "the evidence moved", and a pure head rescale must not be reported as high drift to a reviewer.
So for GradCAM++, ``flagged = severity == "high" and not dominated``; for LayerCAM (linear in the
gradient, exactly invariant to head scale) ``flagged = severity == "high"``.

GradCAM++ regime diagnostics per checkpoint (``diagnostics.eps_fraction``, ``diagnostics.saturation``):
the median eps share of the denominator and the median ``S_k g_k`` over contributing channels (closed form
only: pytorch-grad-cam does not expose its denominators), flagged ``<checkpoint>_eps_dominated`` above
:data:`engine.regime.EPS_DOMINATED_FRACTION` and ``<checkpoint>_saturated`` above :data:`engine.regime.SATURATED_PRODUCT`.
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
from engine.cams import (
    DEFAULT_EPS,
    METHODS,
    CamResult,
    closed_form_cams,
    head_norm_ratio,
    head_scale_control,
    postprocess,
)
from engine.metrics import DEFAULT_K_GRID, compare_maps, map_flags, topk_iou
from engine.reference import reference_cams
from engine.regime import EPS_DOMINATED_FRACTION, HEAD_SCALE_FLAG, SATURATED_PRODUCT, head_scale_block
from engine.runtime import ModelPair
from engine.severity import MethodCalibration, assess, calibration_for

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_METRIC_SIZE",
    "METHODS",
    "DriftReport",
    "MethodResult",
    "Prediction",
    "TargetClass",
    "drift_report",
    "drift_reports",
    "resolve_target_class",
    "score_name",
]

DEFAULT_METRIC_SIZE = 64


def score_name(topk_percent: float) -> str:
    """The drift score's name in thresholds and reports, e.g. ``"1 - top-20% IoU"``."""
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
    drift_index: float  # engine.severity.drift_index: 0 = the model's own noise, 1 = unrelated maps
    severity: str  # core.vocabulary.SEVERITIES, from the drift index's fixed bands
    reference_percentile: float | None  # "unusual for this pair"; None without a calibration
    flagged: bool
    flags: list[str]
    diagnostics: dict[str, Any]
    own_prediction: dict[str, Any] | None  # when the checkpoints disagree (module docstring)


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
    # the version that answered (core.identity): ``model`` is the pair's name, these its architecture and digest
    architecture: str | None = None
    model_digest: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "architecture": self.architecture,
            "model_digest": self.model_digest,
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
    control: CamResult | None = None  # the GradCAM++ head-scale control (module docstring)
    ratio = head_norm_ratio(pair.head_weights["transfer"], pair.head_weights["finetuned"])
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
        if "gradcampp" in methods:  # no extra forward: the transfer features with a rescaled head
            control = head_scale_control(
                outputs["transfer"].features,
                pair.head_weights["transfer"],
                pair.head_weights["finetuned"],
                classes,
                input_size=grid,
                eps=eps,
            )
    else:
        cams, logits, classes, control = _reference_cams(pair, batch, methods, requested, grid)
        timings["forward"] = 0.0  # the library's forwards are part of its CAM calls
    display: dict[tuple[str, str], np.ndarray] = {}
    if include_maps:
        for key, res in cams.items():
            display[key] = res.maps if grid == size else postprocess(res.raw, size)[0]
    timings["cams"] = time.perf_counter() - start

    start = time.perf_counter()
    own_cams: dict[str, tuple[CamResult, CamResult]] = {}
    disagree = logits["transfer"].argmax(axis=1) != logits["finetuned"].argmax(axis=1)
    if attribution == "closed_form" and disagree.any():  # each checkpoint's evidence for its own prediction
        for method in methods:
            t_cam, f_cam = (
                closed_form_cams(
                    outputs[name].features,
                    pair.head_weights[name],
                    logits[name].argmax(axis=1),
                    method=method,
                    input_size=grid,
                    eps=eps,
                )
                for name in CHECKPOINTS
            )
            own_cams[method] = (t_cam, f_cam)
    own_display: dict[tuple[str, str], np.ndarray] = {}
    if include_maps:
        for method, pair_of in own_cams.items():
            for name, res in zip(CHECKPOINTS, pair_of, strict=True):
                own_display[(method, name)] = res.maps if grid == size else postprocess(res.raw, size)[0]
    thresholds, calibrations = calibration_for(
        pair.drift_calibration, methods=methods, topk_percent=topk_percent, score=score_name(topk_percent)
    )
    reports = []
    for i in range(len(grays)):
        per_method = {
            method: _method_entry(
                cams[(method, "transfer")],
                cams[(method, "finetuned")],
                i,
                topk_percent,
                calibrations[method],
                class_name=pair.class_names[int(classes[i])],
                control=control if method == "gradcampp" else None,
                norm_ratio=ratio,
                own=own_cams.get(method) if disagree[i] else None,
            )
            for method in methods
        }
        reports.append(
            DriftReport(
                model=pair.name,
                architecture=getattr(pair, "architecture", None),
                model_digest=getattr(pair, "digest", None),
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
                maps={m: _maps_of(display, own_display, m, i, disagree[i]) for m in methods}
                if include_maps
                else None,
            )
        )
    timings["metrics"] = time.perf_counter() - start
    per_image = {k: round(1000.0 * v / len(grays), 3) for k, v in timings.items()}
    for report in reports:
        report.timings_ms = dict(per_image)
    return reports


def _maps_of(
    display: Mapping[tuple[str, str], np.ndarray],
    own_display: Mapping[tuple[str, str], np.ndarray],
    method: str,
    i: int,
    disagree: bool,
) -> dict[str, np.ndarray]:
    """Image ``i``'s maps of ``method``: both checkpoints for the common target, and, where they disagree,
    ``transfer_own``/``finetuned_own``: each checkpoint's map for its own prediction."""
    maps = {name: display[(method, name)][i] for name in CHECKPOINTS}
    if disagree and own_display:
        maps.update({f"{name}_own": own_display[(method, name)][i] for name in CHECKPOINTS})
    return maps


def _prediction(logits: np.ndarray, class_names: Sequence[str]) -> Prediction:
    probs = _softmax(logits[None, :])[0]
    index = int(logits.argmax())
    return {
        "index": index,
        "class": class_names[index],
        "probabilities": {name: float(p) for name, p in zip(class_names, probs, strict=True)},
    }


def _method_entry(
    transfer: CamResult,
    finetuned: CamResult,
    i: int,
    topk_percent: float,
    calibration: MethodCalibration,
    *,
    class_name: str,
    control: CamResult | None = None,
    norm_ratio: float | None = None,
    own: tuple[CamResult, CamResult] | None = None,
) -> MethodResult:
    """One method's entry for image ``i``; ``control`` (GradCAM++ only) is the head-scale control's maps,
    ``own`` the two checkpoints' maps for their own predictions (only where those differ: NaN-free rows)."""
    metrics = compare_maps(
        transfer.maps[i],
        finetuned.maps[i],
        p_native=transfer.native[i],
        q_native=finetuned.native[i],
        topk=topk_percent,
        k_grid=DEFAULT_K_GRID,
        p_raw=transfer.raw[i],
        q_raw=finetuned.raw[i],
    )
    score = float(np.clip(1.0 - metrics["iou"], 0.0, 1.0))
    flags: list[str] = []
    for name, res in (("transfer", transfer), ("finetuned", finetuned)):
        # a map without signal normalizes to all zeros; the raw map tells "no mass" from "flat non-zero"
        kind = next(
            iter(map_flags(res.raw[i] if res.all_zero[i] else res.maps[i], topk_percent=topk_percent)), None
        )
        if kind:
            flags.append(f"{name}_map_{kind}")
    diagnostics: dict[str, Any] = {
        "zones": "image",  # zone_shift's zones: thirds/halves of the image (no lung mask at request time)
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
    if transfer.saturation is not None and finetuned.saturation is not None:
        saturation = {
            "transfer": float(transfer.saturation[i]),
            "finetuned": float(finetuned.saturation[i]),
        }
        diagnostics["saturation"] = saturation
        flags.extend(f"{n}_saturated" for n, v in saturation.items() if v > SATURATED_PRODUCT)
    dominated = False
    if control is not None:
        block = head_scale_block(
            transfer, finetuned, control, i, topk_percent, score, calibration, class_name
        )
        block["norm_ratio"] = None if norm_ratio is None else float(norm_ratio)
        diagnostics["head_scale_control"] = block
        dominated = bool(block["dominated"])
        if dominated:
            flags.append(HEAD_SCALE_FLAG)
    assessed = assess(score, calibration, class_name=class_name)
    diagnostics["reference"] = assessed["reference"]
    own_prediction = None
    if own is not None:
        own_score = 1.0 - topk_iou(own[0].maps[i], own[1].maps[i], percent=topk_percent)
        own_prediction = {
            "iou": 1.0 - own_score,
            "drift_score": own_score,
            "drift_index": assess(own_score, calibration)["drift_index"],
        }
    return {
        "metrics": metrics,
        "drift_score": score,
        "drift_index": assessed["drift_index"],
        "severity": assessed["severity"],
        "reference_percentile": assessed["reference_percentile"],
        # severity describes how far the maps moved; a head-scale dominated move is not flagged (docstring)
        "flagged": assessed["severity"] == "high" and not dominated,
        "flags": flags,
        "diagnostics": diagnostics,
        "own_prediction": own_prediction,
    }


def _reference_result(method: str, native: np.ndarray, grid: int) -> CamResult:
    maps, normalized = postprocess(native, grid)
    return CamResult(
        method=method,
        maps=maps,
        native=normalized,
        raw=native.astype(np.float64),
        all_zero=native.max(axis=(1, 2)) <= 0,
        eps_fraction=None,  # the library does not expose its denominators
    )


def _reference_cams(
    pair: ModelPair, batch: np.ndarray, methods: Sequence[str], requested: int | None, grid: int
) -> tuple[dict[tuple[str, str], CamResult], dict[str, np.ndarray], np.ndarray, CamResult | None]:
    """pytorch-grad-cam maps: 2 checkpoints x len(methods) calls, each a forward + backward, plus the
    GradCAM++ head-scale control as the library computes it (a copy of the transfer model whose head weight
    is scaled to the fine-tuned head's Frobenius norm)."""
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
            cams[(method, name)] = _reference_result(method, ref.native, grid)
    if classes is None:
        raise ValueError("no CAM method requested")
    control: CamResult | None = None
    if "gradcampp" in methods:
        scaled = copy.deepcopy(pair.torch_model("transfer"))
        ratio = head_norm_ratio(pair.head_weights["transfer"], pair.head_weights["finetuned"])
        scaled.head.weight.data.mul_(ratio)  # .data: no autograd record, no torch import here
        ref = reference_cams(scaled, batch, classes, method="gradcampp")
        control = _reference_result("gradcampp", ref.native, grid)
    return cams, logits, classes, control
