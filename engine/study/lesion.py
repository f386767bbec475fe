"""Evidence on the lesion (synthetic data, whose ``manifest.csv`` has a ``lesion_mask`` column): how much of
each checkpoint's attribution map lies on the ground-truth lesion, and how fine-tuning changed that.

:func:`evidence_on_lesion` is the measure on one map; :func:`lesion_columns` gives the study's per-image
columns (:data:`LESION_COLUMNS`) for one drift report and method. NumPy only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from core.vocabulary import CHECKPOINTS
from engine.metrics import topk_set

if TYPE_CHECKING:
    from engine.report import DriftReport

__all__ = [
    "LESION_COLUMNS",
    "LESION_PAIRS",
    "evidence_on_lesion",
    "lesion_columns",
]

# Evidence on the lesion, per checkpoint, and the change fine-tuning made (synthetic data only).
LESION_COLUMNS: tuple[str, ...] = (
    "lesion_area",
    "transfer_topk_in_lesion",
    "finetuned_topk_in_lesion",
    "topk_in_lesion_change",
    "transfer_mass_in_lesion",
    "finetuned_mass_in_lesion",
    "mass_in_lesion_change",
)
# (transfer column, fine-tuned column) pairs tested for a shift of the evidence onto / off the lesion
LESION_PAIRS: tuple[tuple[str, str], ...] = (
    ("transfer_topk_in_lesion", "finetuned_topk_in_lesion"),
    ("transfer_mass_in_lesion", "finetuned_mass_in_lesion"),
)


def evidence_on_lesion(attribution: Any, lesion_mask: Any, *, topk_percent: float = 20.0) -> dict[str, Any]:
    """How much of an attribution map lies on the ground-truth lesion.

    ``attribution`` (H, W) non-negative; ``lesion_mask`` (H, W) in [0, 1] on the same grid (binary, or the
    soft mask a resize gives: each pixel's lesion fraction). With ``T`` the top ``topk_percent`` % set of
    :func:`engine.metrics.topk_set` (positive pixels reaching the k-th largest value, ties inclusive, as the
    drift metrics), ``A`` the map, ``M`` the mask:

    - ``topk_in_lesion`` = ``mean_{i in T} M_i``: the share of the top region inside the lesion;
    - ``mass_in_lesion`` = ``sum A M / sum A``: the attribution mass inside the lesion (the "energy-based
      pointing game");
    - ``lesion_area`` = ``mean M``: what both are for a map that knows nothing (chance level).

    An all-zero map is the uniform map (as in :mod:`engine.metrics`): both values are
    ``lesion_area`` and ``all_zero`` is ``True``. An empty mask raises ``ValueError`` (undefined: skip the
    image, e.g. ``normal`` ones).
    """
    a = np.asarray(attribution, dtype=np.float64)
    m = np.asarray(lesion_mask, dtype=np.float64)
    if a.ndim != 2 or a.size == 0:
        raise ValueError(f"attribution must be a non-empty 2-D map (H, W), got shape {a.shape}")
    if m.shape != a.shape:
        raise ValueError(
            f"lesion mask must have the attribution's shape {a.shape}, got {m.shape} (resize it first)"
        )
    if not (np.isfinite(a).all() and np.isfinite(m).all()):
        raise ValueError("attribution and lesion mask must be finite")
    if (a < 0).any():
        raise ValueError(f"attribution must be non-negative, got a minimum of {a.min():.3g}")
    if (m < 0).any() or (m > 1).any():
        raise ValueError(f"lesion mask values must lie in [0, 1], got [{m.min():.3g}, {m.max():.3g}]")
    if not m.any():
        raise ValueError("lesion mask is empty: evidence on the lesion is undefined (e.g. a normal image)")
    if not 0 < topk_percent <= 100:
        raise ValueError(f"topk_percent must be in (0, 100], got {topk_percent!r}")
    area = float(m.mean())
    total = float(a.sum())
    if total <= 0.0:
        return {"topk_in_lesion": area, "mass_in_lesion": area, "lesion_area": area, "all_zero": True}
    flat, mask = a.ravel(), m.ravel()
    top = topk_set(a, percent=topk_percent).ravel()  # positive pixels only, inclusive ties
    return {
        "topk_in_lesion": float(mask[top].mean()),
        "mass_in_lesion": float(np.clip((flat * mask).sum() / total, 0.0, 1.0)),
        "lesion_area": area,
        "all_zero": False,
    }


def lesion_columns(report: DriftReport, method: str, mask: np.ndarray | None, topk: float) -> dict[str, Any]:
    """Evidence on the lesion per checkpoint (empty for an image without a lesion)."""
    out: dict[str, Any] = dict.fromkeys(LESION_COLUMNS)
    if mask is None or report.maps is None or not mask.any():
        return out
    values = {
        name: evidence_on_lesion(report.maps[method][name], mask, topk_percent=topk) for name in CHECKPOINTS
    }
    out["lesion_area"] = values["transfer"]["lesion_area"]
    for kind in ("topk_in_lesion", "mass_in_lesion"):
        out[f"transfer_{kind}"] = values["transfer"][kind]
        out[f"finetuned_{kind}"] = values["finetuned"][kind]
        out[f"{kind}_change"] = values["finetuned"][kind] - values["transfer"][kind]
    return out
