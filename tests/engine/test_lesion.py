"""Evidence on the lesion uses the drift metrics' top-k set: zero plateaus are never evidence."""

from __future__ import annotations

import numpy as np

from engine.metrics import topk_set
from engine.study.lesion import evidence_on_lesion


def test_zero_pixels_in_the_lesion_are_not_evidence_on_it() -> None:
    attribution = np.zeros((20, 20))
    attribution[15:, 15:] = 1.0  # 25 positive pixels, far from the lesion; the top 20% needs 80
    lesion = np.zeros((20, 20))
    lesion[:4, :] = 1.0  # the top rows: where a flat-index tie-break would pick the zeros first
    out = evidence_on_lesion(attribution, lesion, topk_percent=20)
    assert out["topk_in_lesion"] == 0.0 and out["mass_in_lesion"] == 0.0
    assert topk_set(attribution, percent=20).sum() == 25


def test_top_set_inside_the_lesion_scores_one() -> None:
    attribution = np.zeros((10, 10))
    attribution[2:4, 2:7] = np.linspace(1.0, 2.0, 10).reshape(2, 5)
    lesion = np.zeros((10, 10))
    lesion[2:4, 2:7] = 1.0
    assert evidence_on_lesion(attribution, lesion, topk_percent=5)["topk_in_lesion"] == 1.0
