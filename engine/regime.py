"""The GradCAM++ regime and head scale (docs/DESIGN.md trap 2): the thresholds of the regime flags and the
head-scale control's assessment that engine/report.py attaches to each GradCAM++ entry."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from engine.cams import CamResult
from engine.metrics import DEFAULT_K_GRID, topk_iou_grid
from engine.severity import MethodCalibration, assess

__all__ = [
    "EPS_DOMINATED_FRACTION",
    "HEAD_SCALE_EXPLAINED",
    "HEAD_SCALE_FLAG",
    "HEAD_SCALE_MIN_DRIFT",
    "SATURATED_PRODUCT",
    "head_scale_block",
]

# GradCAM++ maps whose denominators are mostly eps are cubic in the head weights (docs/DESIGN.md trap 2).
# Ignoring S g^3, a channel's weight h w g^3 / (2 g^2 + eps) grows like g^(1 + 2r), r = its eps fraction, so
# r = 0.5 is the middle of the mixed regime (exponent 2), not "eps-dominated"; and r grows with the grid
# (g = W / (h w)). Measured on the test pairs (random-init timm heads, BatchNorm calibrated, 8 images): the
# median transfer-head fraction is 0.004 at 1x1, 0.05-0.06 at 2x2, 0.20-0.24 at 3x3, 0.44-0.51 at 4x4
# (128 px; the old 0.5 flagged about half of those heads at random) and 0.90-0.92 at 7x7/8x8 (224/299 px);
# fine-tuned heads (x2, x3) 0.001-0.20 up to 4x4. The eps fraction is a property of head and grid, nearly
# constant over images, and missed the case (0.035 where head x2 gave IoU 0.6: saturation, below).
# The flag now means what its name says: r > 0.9, the median channel's weight within 10% of the cubic
# exponent (> 2.8 of 3); no test pair reaches it below 7x7, a default-scale head at 224-299 px does.
EPS_DOMINATED_FRACTION = 0.9
# GradCAM++ saturation (engine.cams.gradcampp_saturation): ignoring eps, a channel's weight h w g / (2 + S g)
# grows like g^(2 / (2 + S g)). Above S g = 18 the median channel's weight keeps less than a tenth of the
# linear exponent (the mirror of EPS_DOMINATED_FRACTION's 90%): it tracks h w / S_k, how active the channel
# is, not how much the class uses it, and moves with head scale wherever channels straddle the crossover.
# Measured: the test pairs' heads sit at 0.002-0.5, except make_pair's inceptionv3 at 139 px (20 transfer,
# 40-60 fine-tuned), where a head x2 alone gives GradCAM++ IoU 0.61-0.86 (8 images) at eps fraction 0.035.
SATURATED_PRODUCT = 18.0
# The head-scale control (module docstring). "Dominated" needs the rescaled transfer head alone to move the
# transfer map at least half as far as the real fine-tune does: from there on, head scale is the larger
# share of the explanation and a reviewer should look at the residual, not the raw score. The residual
# (control vs fine-tuned map) must also stay below the "high" threshold, so a rescale that moves the map as
# far but elsewhere (an unexplained change on top of it) is never cleared.
HEAD_SCALE_EXPLAINED = 0.5
# Below this real drift score (IoU > 0.99 at 64 x 64: a handful of tied boundary pixels) the ratio compares
# two noise counts: head_scale_explained is None and the entry is never "dominated".
HEAD_SCALE_MIN_DRIFT = 0.01
HEAD_SCALE_FLAG = "gradcampp_head_scale_dominated"


def _iou_keys(grid: Mapping[float, float], percents: Sequence[float]) -> dict[str, float]:
    return {(str(int(k)) if float(k).is_integer() else str(float(k))): grid[float(k)] for k in percents}


def head_scale_block(
    transfer: CamResult,
    finetuned: CamResult,
    control: CamResult,
    i: int,
    topk_percent: float,
    real_score: float,
    calibration: MethodCalibration,
    class_name: str,
) -> dict[str, Any]:
    """The head-scale control of image ``i`` against the transfer map (the real drift's metric) and the
    fine-tuned map: the ``diagnostics.head_scale_control`` block of a GradCAM++ report entry."""
    percents = sorted({float(topk_percent), *map(float, DEFAULT_K_GRID)})
    grid = topk_iou_grid(transfer.maps[i], control.maps[i], percents=percents)
    iou = grid[float(topk_percent)]
    control_score = float(np.clip(1.0 - iou, 0.0, 1.0))
    residual_iou = topk_iou_grid(finetuned.maps[i], control.maps[i], percents=[topk_percent])
    residual = float(np.clip(1.0 - residual_iou[float(topk_percent)], 0.0, 1.0))
    explained = (
        float(np.clip(control_score / real_score, 0.0, 1.0)) if real_score >= HEAD_SCALE_MIN_DRIFT else None
    )
    residual_high = assess(residual, calibration, class_name=class_name)["severity"] == "high"
    dominated = explained is not None and explained >= HEAD_SCALE_EXPLAINED and not residual_high
    return {
        "norm": "frobenius",
        "iou": float(iou),
        "iou_k": _iou_keys(grid, DEFAULT_K_GRID),
        "drift_score": control_score,
        "real_drift_score": float(real_score),
        "head_scale_explained": explained,
        "residual_drift_score": residual,
        "dominated": bool(dominated),
    }
