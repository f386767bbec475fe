"""Learn per-method drift thresholds from a reference split and store them in the model pair's manifest.

The drift score of each method (``1 - top-k% IoU``, see :mod:`engine.report`) is computed for every
reference image; its percentiles give the thresholds: ``moderate = p90``, ``high = p99``. As in the paper,
only **true-positive** images are used when labels are given and at least ``min_true_positives`` of them
exist (the fine-tuned prediction equals the label, so the target class is the true class); otherwise all
images are used, and ``subset`` says which.

``manifest["drift_thresholds"]`` (written by ``cxr-drift calibrate``)::

    {"score": "1 - top-20% IoU", "topk_percent": 20.0, "subset": "true_positive" | "all",
     "n": 180, "n_total": 200, "created_at": "...Z", "percentiles": [50, 90, 95, 99],
     "rule": "moderate = p90, high = p99",
     "methods": {"layercam": {"moderate": 0.21, "high": 0.43,
                              "drift_score": {"50": ..., "90": ..., ...},
                              "metrics": {"iou": {"50": ...}, "ssim": {...}, ...}},
                 "gradcampp": {...}}}

``manifest.json`` is not in its own hash list, so writing this keeps the artifact verifiable.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from core.dataset import load_split
from core.errors import InputError
from core.imageio import read_image
from engine.cams import METHODS
from engine.report import drift_reports
from engine.runtime import ModelPair

log = logging.getLogger(__name__)

__all__ = ["calibrate", "calibrate_folder", "write_thresholds"]

MODERATE_PERCENTILE = 90.0
HIGH_PERCENTILE = 99.0


def _pkey(p: float) -> str:
    return str(int(p)) if float(p).is_integer() else str(float(p))


def calibrate(
    pair: ModelPair,
    grays: Sequence[np.ndarray],
    labels: Sequence[int] | None = None,
    *,
    percentiles: Sequence[float] = (50, 90, 95, 99),
    methods: Sequence[str] = METHODS,
    topk_percent: float = 20.0,
    batch_size: int = 8,
    min_true_positives: int = 20,
) -> dict[str, Any]:
    """Drift-score and metric percentiles per method over ``grays``, and thresholds (see module docstring)."""
    if len(grays) == 0:
        raise InputError("calibration needs at least one reference image, got none")
    if labels is not None and len(labels) != len(grays):
        raise InputError(f"expected one label per image ({len(grays)}), got {len(labels)} labels")
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    reports = []
    for start in range(0, len(grays), batch_size):
        chunk = list(grays[start : start + batch_size])
        reports.extend(drift_reports(pair, chunk, methods=methods, topk_percent=topk_percent))
        log.info("calibration: %d/%d images", len(reports), len(grays))
    subset = "all"
    chosen = reports
    if labels is not None:
        tp = [
            r for r, y in zip(reports, labels, strict=True) if r.predictions["finetuned"]["index"] == int(y)
        ]
        if len(tp) >= min_true_positives:
            subset, chosen = "true_positive", tp
        else:
            log.warning(
                "only %d true positives (< %d): calibrating on all %d images",
                len(tp),
                min_true_positives,
                len(reports),
            )
    levels = sorted({*map(float, percentiles), MODERATE_PERCENTILE, HIGH_PERCENTILE})
    per_method: dict[str, Any] = {}
    for method in methods:
        scores = np.array([r.methods[method]["drift_score"] for r in chosen])
        metric_names = [k for k in chosen[0].methods[method]["metrics"] if k != "iou_k"]
        values = {k: np.array([r.methods[method]["metrics"][k] for r in chosen]) for k in metric_names}
        per_method[method] = {
            "moderate": float(np.percentile(scores, MODERATE_PERCENTILE)),
            "high": float(np.percentile(scores, HIGH_PERCENTILE)),
            "drift_score": {_pkey(p): float(np.percentile(scores, p)) for p in levels},
            "metrics": {k: {_pkey(p): float(np.percentile(v, p)) for p in levels} for k, v in values.items()},
        }
    return {
        "score": f"1 - top-{topk_percent:g}% IoU",
        "topk_percent": float(topk_percent),
        "subset": subset,
        "n": len(chosen),
        "n_total": len(reports),
        "created_at": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "percentiles": levels,
        "rule": f"moderate = p{MODERATE_PERCENTILE:g}, high = p{HIGH_PERCENTILE:g}",
        "methods": per_method,
    }


def write_thresholds(folder: str | Path, thresholds: dict[str, Any]) -> Path:
    """Store ``thresholds`` as ``drift_thresholds`` in ``folder/manifest.json`` (atomic replace)."""
    path = Path(folder) / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["drift_thresholds"] = thresholds
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def calibrate_folder(
    model_dir: str | Path,
    data: str | Path,
    *,
    split: str = "val",
    limit: int | None = None,
    topk_percent: float = 20.0,
    batch_size: int = 8,
    threads: int | None = None,
) -> dict[str, Any]:
    """Calibrate the pair in ``model_dir`` on ``split`` of ``data`` and store the thresholds in its manifest."""
    pair = ModelPair.load(model_dir, threads=threads)
    samples, _ = load_split(data, class_names=pair.class_names, split=split, limit=limit)
    grays = [read_image(s.path) for s in samples]
    thresholds = calibrate(
        pair, grays, [s.label for s in samples], topk_percent=topk_percent, batch_size=batch_size
    )
    write_thresholds(model_dir, thresholds)
    return thresholds
