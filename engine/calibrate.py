"""Calibrate a model pair's drift signal on a reference split and store it in the pair's manifest.

Severity is absolute (:mod:`engine.severity`): the drift score is placed between the pair's **noise floor**
and **chance**. Calibration measures the noise floor (the transfer checkpoint against itself under benign
input perturbations, per method: the median score) and keeps the pair's **reference distribution** (the
drift scores of the reference images, per method, and per class where a class has at least
:data:`MIN_CLASS_REFERENCE` images), from which a request's "unusual for this pair" percentile is read.

The reference images are those on which **both checkpoints are right** (``subset="both_correct"``, the
primary analysis: each map then explains the class its own checkpoint predicted). ``"finetuned_correct"``
(the paper's "true positive") and ``"all"`` exist as sensitivity analyses and are recorded as such. Fewer
reference images than ``min_reference`` (default 100: a p99 needs about that many) is an error that says
how many there were, never a silent switch to another subset.

``manifest["drift_calibration"]`` (written by ``cxr-drift calibrate``)::

    {"version": 2, "score": "1 - top-20% IoU", "topk_percent": 20.0, "chance": 0.889,
     "subset": "both_correct", "subset_definition": "...", "n": 120, "n_total": 150,
     "min_reference": 100, "created_at": "...Z", "metric_size": 64,
     "severity": {"index": "...", "bands": {"moderate": 0.333, "high": 0.667}},
     "perturbations": "...",
     "methods": {"layercam": {"noise_floor": 0.12, "noise": {"n": 360, "p50": 0.12, "p90": 0.25},
                              "reference": [0.05, ...sorted scores...],
                              "reference_percentiles": {"50": ..., "90": ..., "99": ...},
                              "classes": {"normal": {"n": 40, "reference": [...]}}},
                 "gradcampp": {...}}}

``manifest.json`` is not in its own hash list; :func:`write_calibration` checks the manifest's seal first (an
edited manifest is never re-sealed) and re-seals it with the calibration (core.manifest).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from core.dataset import load_split
from core.errors import InputError
from core.imageio import read_image
from core.manifest import read_manifest, verify_seal, write_manifest
from core.preprocess import preprocess_batch
from engine.cams import METHODS, closed_form_cams
from engine.metrics import topk_iou
from engine.report import DEFAULT_METRIC_SIZE, DriftReport, drift_reports, score_name
from engine.runtime import ModelPair
from engine.severity import CALIBRATION_VERSION, SEVERITY_BANDS, benign_perturbations, chance_drift
from engine.subsets import SUBSET_DEFINITIONS, SUBSETS, in_subset

log = logging.getLogger(__name__)

__all__ = [
    "CALIBRATION_VERSION",
    "MIN_CLASS_REFERENCE",
    "MIN_REFERENCE",
    "SUBSETS",
    "calibrate",
    "calibrate_folder",
    "write_calibration",
]

MIN_REFERENCE = 100
MIN_CLASS_REFERENCE = 30
PERTURBATIONS = (
    "transfer checkpoint vs itself on each reference image under three benign changes: a shift of 1% of the "
    "side, Gaussian noise (SD 0.01), an exposure change (gamma 0.9/1.1 x gain 0.97/1.03)"
)


def _noise_scores(
    pair: ModelPair,
    grays: Sequence[np.ndarray],
    classes: Sequence[int],
    *,
    methods: Sequence[str],
    topk_percent: float,
    seed: int,
) -> dict[str, list[float]]:
    """Per method, the drift scores of the transfer checkpoint's map of each image vs its map of each benign
    variant of that image (same target class, same analysis grid as the drift report)."""
    grid = min(DEFAULT_METRIC_SIZE, pair.input_size)
    scores: dict[str, list[float]] = {method: [] for method in methods}
    for i, (gray, cls) in enumerate(zip(grays, classes, strict=True)):
        images = [gray, *benign_perturbations(gray, seed=seed + i)]
        batch = preprocess_batch(images, input_size=pair.input_size, mean=pair.mean, std=pair.std)
        features = pair.forward(batch, checkpoints=("transfer",))["transfer"].features
        for method in methods:
            maps = closed_form_cams(
                features,
                pair.head_weights["transfer"],
                np.full(len(images), cls),
                method=method,
                input_size=grid,
            ).maps
            scores[method] += [1.0 - topk_iou(maps[0], m, percent=topk_percent) for m in maps[1:]]
    return scores


def calibrate(
    pair: ModelPair,
    grays: Sequence[np.ndarray],
    labels: Sequence[int] | None = None,
    *,
    subset: str = "both_correct",
    methods: Sequence[str] = METHODS,
    topk_percent: float = 20.0,
    batch_size: int = 8,
    min_reference: int = MIN_REFERENCE,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """The calibration of ``pair`` on ``grays`` (see the module docstring for what it holds)."""
    if subset not in SUBSETS:
        raise InputError(f"unknown subset {subset!r}; valid options: {', '.join(SUBSETS)}")
    if len(grays) == 0:
        raise InputError("calibration needs at least one reference image, got none")
    if labels is None and subset != "all":
        raise InputError(f"subset {subset!r} needs a label per image; without labels use subset 'all'")
    if labels is not None and len(labels) != len(grays):
        raise InputError(f"expected one label per image ({len(grays)}), got {len(labels)} labels")
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    if min_reference < 1:
        raise InputError(f"min_reference must be >= 1, got {min_reference}")
    bar = tqdm(total=2 * len(grays), desc=f"calibrate {pair.name}", unit="img", disable=not progress)
    reports: list[DriftReport] = []
    for start in range(0, len(grays), batch_size):
        chunk = list(grays[start : start + batch_size])
        reports.extend(drift_reports(pair, chunk, methods=methods, topk_percent=topk_percent))
        bar.update(len(chunk))
    labels_or_none: list[int | None] = [None] * len(grays) if labels is None else [int(y) for y in labels]
    chosen = [
        i
        for i, (r, y) in enumerate(zip(reports, labels_or_none, strict=True))
        if in_subset(
            subset,
            label=y,
            transfer=r.predictions["transfer"]["index"],
            finetuned=r.predictions["finetuned"]["index"],
        )
    ]
    if len(chosen) < min_reference:
        bar.close()
        raise InputError(
            f"only {len(chosen)} of {len(grays)} reference images are in subset {subset!r} "
            f"({SUBSET_DEFINITIONS[subset]}); at least {min_reference} are needed for the percentiles "
            "to mean something (a p99 needs about 100): use a larger reference split, or lower the minimum "
            "knowingly (--min-reference), or choose another subset as a sensitivity analysis (--subset)"
        )
    classes = [reports[i].target_class["index"] for i in chosen]
    noise = _noise_scores(
        pair, [grays[i] for i in chosen], classes, methods=methods, topk_percent=topk_percent, seed=seed
    )
    bar.update(len(grays))
    bar.close()
    per_method: dict[str, Any] = {}
    for method in methods:
        scores = np.array([reports[i].methods[method]["drift_score"] for i in chosen])
        by_class = {
            pair.class_names[c]: sorted(float(v) for v, k in zip(scores, classes, strict=True) if k == c)
            for c in sorted(set(classes))
        }
        floor = np.array(noise[method])
        per_method[method] = {
            "noise_floor": float(np.median(floor)),
            "noise": {
                "n": int(floor.size),
                "p50": float(np.median(floor)),
                "p90": float(np.percentile(floor, 90)),
            },
            "reference": sorted(float(v) for v in scores),
            "reference_percentiles": {str(p): float(np.percentile(scores, p)) for p in (50, 90, 95, 99)},
            "classes": {
                name: {"n": len(values), "reference": values}
                for name, values in by_class.items()
                if len(values) >= MIN_CLASS_REFERENCE
            },
        }
    return {
        "version": CALIBRATION_VERSION,
        "score": score_name(topk_percent),
        "topk_percent": float(topk_percent),
        "chance": chance_drift(topk_percent),
        "subset": subset,
        "subset_definition": SUBSET_DEFINITIONS[subset],
        "n": len(chosen),
        "n_total": len(reports),
        "min_reference": int(min_reference),
        "min_class_reference": MIN_CLASS_REFERENCE,
        "metric_size": min(DEFAULT_METRIC_SIZE, pair.input_size),
        "created_at": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "severity": {
            "index": "clip((drift_score - noise_floor) / (chance - noise_floor), 0, 1)",
            "bands": dict(SEVERITY_BANDS),
        },
        "perturbations": PERTURBATIONS,
        "methods": per_method,
    }


def write_calibration(
    folder: str | Path, calibration: dict[str, Any], *, manifest_key: bytes | None = None
) -> Path:
    """Store ``calibration`` as ``drift_calibration`` in ``folder/manifest.json`` and re-seal it (atomic
    replace; with ``manifest_key``, an HMAC seal). The seal is checked first, so an edited or unsealed manifest
    is refused, never laundered. A calibration of the old kind (``drift_thresholds``) is removed."""
    manifest = read_manifest(Path(folder))
    verify_seal(Path(folder), manifest, key=manifest_key)
    manifest.pop("drift_thresholds", None)
    manifest["drift_calibration"] = calibration
    return write_manifest(Path(folder), manifest, key=manifest_key)


def calibrate_folder(
    model_dir: str | Path,
    data: str | Path,
    *,
    split: str = "val",
    limit: int | None = None,
    subset: str = "both_correct",
    min_reference: int = MIN_REFERENCE,
    topk_percent: float = 20.0,
    batch_size: int = 8,
    threads: int | None = None,
    progress: bool = False,
    manifest_key: bytes | None = None,
) -> dict[str, Any]:
    """Calibrate the pair in ``model_dir`` on ``split`` of ``data`` and store the result in its manifest
    (verified before, re-sealed after, with ``manifest_key`` when given)."""
    pair = ModelPair.load(model_dir, threads=threads, manifest_key=manifest_key)
    samples, _ = load_split(data, class_names=pair.class_names, split=split, limit=limit)
    grays = [read_image(s.path) for s in samples]
    calibration = calibrate(
        pair,
        grays,
        [s.label for s in samples],
        subset=subset,
        min_reference=min_reference,
        topk_percent=topk_percent,
        batch_size=batch_size,
        progress=progress,
    )
    write_calibration(model_dir, calibration, manifest_key=manifest_key)
    return calibration
