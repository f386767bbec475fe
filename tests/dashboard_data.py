"""Seeded audit data for the dashboard's tests, browser tests and screenshots.

Requests spread over ``days`` days, every model x method, written through the real hash chain
(:func:`service.audit.chain.append`). The IoUs follow a per (model, method) level with noise, and one model's
evidence moves more in the last third of the period, so the plots have something to show: the LayerCAM and
GradCAM++ rankings of two models differ, and flagged requests rise at the end. Scores are 1 - IoU, severities
by the default bands, flagged = high, as in the engine. With ``keep_maps="flagged"`` (the default) each
request with a flagged result also keeps synthetic low-resolution maps (a blob per checkpoint, moved further
apart the larger the drift score) as the service does with ``CXR_DRIFT_KEEP_MAPS=flagged``.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import sqlalchemy as sa

from engine.report import DriftReport
from engine.review_maps import review_maps
from service.audit import chain
from tests.db_fixtures import MODELS, make_entry

__all__ = ["SEED_START", "seed_audit"]

SEED_START = datetime(2026, 11, 2, tzinfo=UTC)  # a Monday
# mean top-k IoU per (model, method): densenet is the most stable under LayerCAM, resnet under GradCAM++
LEVELS = {
    ("densenet201", "layercam"): 0.72,
    ("resnet50v2", "layercam"): 0.62,
    ("inceptionv3", "layercam"): 0.50,
    ("densenet201", "gradcampp"): 0.55,
    ("resnet50v2", "gradcampp"): 0.68,
    ("inceptionv3", "gradcampp"): 0.45,
}


def _severity(score: float) -> str:
    return "low" if score < 0.4 else ("moderate" if score < 0.7 else "high")


def _blob(size: int, cy: float, cx: float, width: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] / size
    cam = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * width**2))
    return (cam - cam.min()) / (cam.max() - cam.min())


def synthetic_maps(report: DriftReport, rng: np.random.Generator, size: int = 96) -> None:
    """Give ``report`` transfer/fine-tuned maps per method: one blob each, the fine-tuned one shifted by an
    amount that grows with the method's drift score (a stand-in for the engine's maps)."""
    report.maps = {}
    for method, result in report.methods.items():
        cy, cx = rng.uniform(0.3, 0.7, 2)
        angle = rng.uniform(0, 2 * np.pi)
        shift = 0.45 * float(result["drift_score"])
        report.maps[method] = {
            "transfer": _blob(size, cy, cx, 0.12),
            "finetuned": _blob(size, cy + shift * np.sin(angle), cx + shift * np.cos(angle), 0.12),
        }


def seed_audit(
    engine: sa.Engine,
    *,
    days: int = 14,
    per_day: int = 4,
    seed: int = 0,
    start: datetime = SEED_START,
    keep_maps: str = "flagged",
) -> list[dict[str, Any]]:
    """Append ``days * per_day`` records; returns what was written per record (time, and per (model,
    method) the IoU, score and flag) so tests can compute expected counts independently."""
    rng = np.random.default_rng(seed)
    written = []
    for day in range(days):
        late = day >= days * 2 // 3
        for i in range(per_day):
            created = start + timedelta(
                days=day, hours=2 + i * (20 / max(per_day, 1)), minutes=int(rng.integers(0, 50))
            )
            entry = make_entry(rng, created_at=created, models=MODELS)
            rows = {}
            for report in entry.reports:
                for method, result in report.methods.items():
                    level = LEVELS.get((report.model, method), 0.6)
                    if late and report.model == "inceptionv3":
                        level -= 0.25  # this model's evidence moved in the last third
                    iou = float(np.clip(level + rng.normal(0.0, 0.08), 0.0, 1.0))
                    score = 1.0 - iou
                    severity = _severity(score)
                    result["metrics"]["iou"] = iou
                    result["drift_score"] = score
                    result["severity"] = severity
                    result["flagged"] = severity == "high"
                    result["flags"] = ["high_drift"] if severity == "high" else []
                    rows[(report.model, method)] = {
                        "iou": iou,
                        "drift_score": score,
                        "flagged": severity == "high",
                    }
            if keep_maps != "none":
                maps_rng = np.random.default_rng([seed, day, i])  # apart from ``rng``: same values as before
                for report in entry.reports:
                    synthetic_maps(report, maps_rng)
                entry.maps = review_maps(entry.reports, keep_maps)
            appended = chain.append(engine, entry)
            written.append(
                {
                    "id": appended.id,
                    "created_at": created,
                    "rows": rows,
                    "row_hash": appended.row_hash,
                    "maps": bool(entry.maps and entry.maps["kept"]),
                }
            )
    return written
