"""Drift severity on an absolute scale, and "unusual for this pair" as a separate number.

A drift score ``s = 1 - IoU@k`` is placed between two anchors that mean the same for every model pair:

- **chance**: the score of two *unrelated* maps. The top-k% sets of two independent maps overlap in
  ``k^2 / 100`` % of the pixels on average, so their IoU is ``(k^2/100) / (2k - k^2/100) = k / (200 - k)``
  and ``chance = 1 - k / (200 - k)`` (0.889 at k = 20).
- **noise floor**: how far the *transfer* checkpoint's own evidence moves under benign input changes (a
  shift of about 1% of the side, sensor noise, an exposure change), measured at calibration as the median
  score between its map of a reference image and its map of the perturbed image.

``drift_index = clip((s - noise) / (chance - noise), 0, 1)``: 0 is "no more than the model moves under
benign input changes", 1 is "as different as unrelated maps". Severity is a fixed band of the index
(:data:`SEVERITY_BANDS`), the same for every pair, so a pair whose drift is large everywhere is reported as
such, not as 90% "low" (which percentile thresholds of its own reference scores would give by
construction). Without a calibrated noise floor the floor is 0 and the report says ``calibrated: false``.

How unusual a request is *for this pair* is :func:`reference_percentile`: the share of the pair's reference
scores (calibration images on which both checkpoints are right) at or below it, per class where the class
had enough reference images. It is reported beside severity and never changes it.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

__all__ = [
    "CALIBRATION_VERSION",
    "SEVERITY_BANDS",
    "MethodCalibration",
    "assess",
    "benign_perturbations",
    "calibration_for",
    "chance_drift",
    "drift_index",
    "reference_percentile",
    "severity_of_index",
]

# Bands of the drift index: below a third of the way from the noise floor to chance the evidence is "low",
# past two thirds it is closer to unrelated maps than to the model's own jitter: "high".
SEVERITY_BANDS: dict[str, float] = {"moderate": 1.0 / 3.0, "high": 2.0 / 3.0}
# The manifest's drift_calibration this code reads (engine/calibrate.py writes it).
CALIBRATION_VERSION = 2


def chance_drift(topk_percent: float) -> float:
    """``1 - k / (200 - k)``: the expected drift score of two independent maps at top-``k`` %."""
    k = float(topk_percent)
    if not 0.0 < k <= 100.0:
        raise ValueError(f"topk_percent must be in (0, 100], got {topk_percent!r}")
    return 1.0 - k / (200.0 - k)


def drift_index(score: float, *, noise_floor: float, chance: float) -> float:
    """``clip((score - noise_floor) / (chance - noise_floor), 0, 1)``; a floor at or above chance (a model whose
    own evidence is as unstable as unrelated maps) gives 0: nothing can be told apart from its noise."""
    if not np.isfinite(score):
        raise ValueError(f"score must be finite, got {score!r}")
    span = float(chance) - float(noise_floor)
    if span <= 0.0:
        return 0.0
    return float(np.clip((float(score) - float(noise_floor)) / span, 0.0, 1.0))


def severity_of_index(index: float) -> str:
    """``"high"`` from :data:`SEVERITY_BANDS` ``["high"]``, ``"moderate"`` from ``["moderate"]``, else ``"low"``."""
    if index >= SEVERITY_BANDS["high"]:
        return "high"
    if index >= SEVERITY_BANDS["moderate"]:
        return "moderate"
    return "low"


def reference_percentile(score: float, reference: Sequence[float]) -> float | None:
    """Percent of ``reference`` scores at or below ``score`` (``scipy.stats.percentileofscore(kind="weak")``);
    ``None`` without reference scores. ``reference`` must be sorted ascending."""
    if len(reference) == 0:
        return None
    return 100.0 * bisect.bisect_right(reference, float(score)) / len(reference)


def benign_perturbations(gray: np.ndarray, *, seed: int) -> list[np.ndarray]:
    """Three benign variants of a [0, 1] radiograph: a shift of 1% of the side (edge pixels repeated),
    Gaussian noise (SD 0.01), and an exposure change (gamma 0.9 or 1.1 with a gain of 0.97 or 1.03)."""
    image = np.asarray(gray, dtype=np.float64)
    if image.ndim != 2:
        raise ValueError(f"expected a grayscale (H, W) image, got shape {image.shape}")
    rng = np.random.default_rng(seed)
    step = max(1.0, 0.01 * max(image.shape))
    shift = rng.choice([-1.0, 1.0], size=2) * step
    shifted = ndimage.shift(image, shift, order=1, mode="nearest")
    noisy = image + rng.normal(0.0, 0.01, size=image.shape)
    gamma, gain = rng.choice([0.9, 1.1]), rng.choice([0.97, 1.03])
    exposed = gain * np.power(np.clip(image, 0.0, 1.0), gamma)
    return [np.clip(v, 0.0, 1.0).astype(np.float32) for v in (shifted, noisy, exposed)]


@dataclass(frozen=True)
class MethodCalibration:
    """What severity needs for one method: the anchors and the reference scores (sorted), pooled and per
    class. Uncalibrated: a noise floor of 0 and no reference."""

    calibrated: bool
    noise_floor: float
    chance: float
    reference: tuple[float, ...] = ()
    classes: Mapping[str, tuple[float, ...]] = field(default_factory=dict)


def _finite_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and bool(np.isfinite(value))


def _method_block_ok(block: Any) -> bool:
    """A method's calibration has a finite noise floor and numeric reference lists (a hand-edited or damaged
    manifest is treated as uncalibrated, never as a crash on every request)."""
    if not isinstance(block, Mapping) or not _finite_number(block.get("noise_floor")):
        return False
    references = [block.get("reference", [])]
    classes = block.get("classes", {})
    if not isinstance(classes, Mapping):
        return False
    references += [c.get("reference", []) if isinstance(c, Mapping) else None for c in classes.values()]
    return all(isinstance(r, list) and all(_finite_number(v) for v in r) for r in references)


def calibration_for(
    manifest_calibration: Mapping[str, Any] | None, *, methods: Sequence[str], topk_percent: float, score: str
) -> tuple[dict[str, Any], dict[str, MethodCalibration]]:
    """The calibration of each method from the manifest's ``drift_calibration`` when it is of this version,
    for this score and has every method; else uncalibrated anchors. Returns (a summary for the report,
    per-method calibrations)."""
    chance = chance_drift(topk_percent)
    entry = manifest_calibration if isinstance(manifest_calibration, Mapping) else None
    usable = (
        entry is not None
        and entry.get("version") == CALIBRATION_VERSION
        and entry.get("score") == score
        and isinstance(entry.get("methods"), Mapping)
        and all(_method_block_ok(entry["methods"].get(m)) for m in methods)
    )
    summary: dict[str, Any] = {
        "score": score,
        "chance": chance,
        "index": "clip((drift_score - noise_floor) / (chance - noise_floor), 0, 1)",
        "bands": dict(SEVERITY_BANDS),
    }
    if not usable:
        summary["calibrated"] = False
        summary["note"] = (
            "no drift calibration of this version and score in the manifest: noise floor 0, no reference "
            "percentile; run `cxr-drift calibrate`"
        )
        return summary, {
            m: MethodCalibration(calibrated=False, noise_floor=0.0, chance=chance) for m in methods
        }
    assert entry is not None
    summary.update(
        calibrated=True,
        subset=entry.get("subset"),
        n=entry.get("n"),
        created_at=entry.get("created_at"),
        noise_floor={m: float(entry["methods"][m]["noise_floor"]) for m in methods},
    )
    out = {}
    for method in methods:
        block = entry["methods"][method]
        classes = block.get("classes") or {}
        out[method] = MethodCalibration(
            calibrated=True,
            noise_floor=float(block["noise_floor"]),
            chance=chance,
            reference=tuple(sorted(float(v) for v in block.get("reference", ()))),
            classes={
                name: tuple(sorted(float(v) for v in c.get("reference", ()))) for name, c in classes.items()
            },
        )
    return summary, out


def assess(score: float, calibration: MethodCalibration, *, class_name: str | None = None) -> dict[str, Any]:
    """``drift_index``, ``severity`` (absolute) and ``reference_percentile`` ("unusual for this pair": among
    the reference scores of ``class_name`` when the class has its own, else pooled; ``reference`` says which)
    of one drift score."""
    index = drift_index(score, noise_floor=calibration.noise_floor, chance=calibration.chance)
    reference: tuple[float, ...] = ()
    which: str | None = None
    if class_name is not None and calibration.classes.get(class_name):
        reference, which = calibration.classes[class_name], f"class:{class_name}"
    elif calibration.reference:
        reference, which = calibration.reference, "pooled"
    return {
        "drift_index": index,
        "severity": severity_of_index(index),
        "reference_percentile": reference_percentile(score, reference),
        "reference": which,
    }
