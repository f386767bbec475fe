"""Absolute severity anchors and the reference percentile, against simulation and scipy."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from engine import metrics
from engine.severity import (
    SEVERITY_BANDS,
    MethodCalibration,
    assess,
    benign_perturbations,
    calibration_for,
    chance_drift,
    drift_index,
    reference_percentile,
    severity_of_index,
)


@pytest.mark.parametrize("k", [5.0, 20.0, 50.0])
def test_chance_is_the_drift_of_independent_maps(k: float) -> None:
    rng = np.random.default_rng(int(k))
    scores = [
        1.0 - metrics.topk_iou(rng.random((64, 64)), rng.random((64, 64)), percent=k) for _ in range(300)
    ]
    assert np.mean(scores) == pytest.approx(chance_drift(k), abs=0.01)
    assert chance_drift(20.0) == pytest.approx(1 - 20 / 180)


def test_drift_index_is_anchored_and_monotone() -> None:
    chance = chance_drift(20.0)
    assert drift_index(0.1, noise_floor=0.2, chance=chance) == 0.0
    assert drift_index(0.2, noise_floor=0.2, chance=chance) == 0.0
    assert drift_index(chance, noise_floor=0.2, chance=chance) == 1.0
    assert drift_index(0.99, noise_floor=0.2, chance=chance) == 1.0
    middle = 0.2 + (chance - 0.2) / 2
    assert drift_index(middle, noise_floor=0.2, chance=chance) == pytest.approx(0.5)
    values = [drift_index(s, noise_floor=0.2, chance=chance) for s in np.linspace(0, 1, 50)]
    assert values == sorted(values)
    assert drift_index(0.95, noise_floor=0.95, chance=chance) == 0.0  # floor above chance: nothing to tell
    with pytest.raises(ValueError):
        drift_index(float("nan"), noise_floor=0.0, chance=chance)


def test_severity_bands() -> None:
    assert severity_of_index(0.0) == "low"
    assert severity_of_index(SEVERITY_BANDS["moderate"] - 1e-9) == "low"
    assert severity_of_index(SEVERITY_BANDS["moderate"]) == "moderate"
    assert severity_of_index(SEVERITY_BANDS["high"]) == "high" == severity_of_index(1.0)


def test_reference_percentile_matches_scipy() -> None:
    rng = np.random.default_rng(0)
    reference = sorted(np.round(rng.random(137), 2).tolist())  # ties included
    for score in [-1.0, 0.0, 0.13, 0.5, 0.501, 0.99, 2.0, *reference[:5]]:
        expected = stats.percentileofscore(reference, score, kind="weak")
        assert reference_percentile(score, reference) == pytest.approx(expected)
    assert reference_percentile(0.5, []) is None


def test_benign_perturbations_are_small_and_seeded() -> None:
    yy, xx = np.mgrid[0:100, 0:80] / 100.0
    gray = (0.5 + 0.3 * np.sin(6 * yy) * np.cos(5 * xx)).astype(np.float32)
    variants = benign_perturbations(gray, seed=3)
    assert len(variants) == 3
    for variant in variants:
        assert variant.shape == gray.shape and variant.dtype == np.float32
        assert variant.min() >= 0.0 and variant.max() <= 1.0
        assert 0.0 < float(np.abs(variant - gray).mean()) < 0.05
    again = benign_perturbations(gray, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(variants, again, strict=True))


def _calibration(**methods: dict[str, object]) -> dict[str, object]:
    return {"version": 2, "score": "1 - top-20% IoU", "subset": "both_correct", "n": 120, "methods": methods}


def test_calibration_is_read_only_when_it_fits() -> None:
    block = {
        "noise_floor": 0.2,
        "reference": [0.1, 0.2, 0.3, 0.4],
        "classes": {"normal": {"reference": [0.5]}},
    }
    summary, cal = calibration_for(
        _calibration(layercam=block, gradcampp=block),
        methods=("layercam", "gradcampp"),
        topk_percent=20.0,
        score="1 - top-20% IoU",
    )
    assert summary["calibrated"] and cal["layercam"].noise_floor == 0.2
    assert cal["gradcampp"].classes["normal"] == (0.5,)
    for bad in (
        None,
        {**_calibration(layercam=block, gradcampp=block), "version": 1},
        {**_calibration(layercam=block, gradcampp=block), "score": "1 - top-10% IoU"},
        _calibration(layercam=block),  # a method missing
        {"methods": {"layercam": {"moderate": 0.2, "high": 0.4}}},  # the percentile thresholds of before
        _calibration(layercam={**block, "noise_floor": "0.2"}, gradcampp=block),  # damaged by hand
        _calibration(layercam={"reference": [0.1]}, gradcampp=block),  # no noise floor
        _calibration(layercam={**block, "reference": [0.1, None]}, gradcampp=block),
        _calibration(layercam={**block, "classes": {"normal": {"reference": "x"}}}, gradcampp=block),
    ):
        summary, cal = calibration_for(
            bad, methods=("layercam", "gradcampp"), topk_percent=20.0, score="1 - top-20% IoU"
        )
        assert not summary["calibrated"] and "calibrate" in summary["note"]
        assert cal["layercam"].noise_floor == 0.0 and cal["layercam"].reference == ()


def test_assess_uses_the_class_reference_when_there_is_one() -> None:
    chance = chance_drift(20.0)
    cal = MethodCalibration(
        calibrated=True,
        noise_floor=0.2,
        chance=chance,
        reference=(0.1, 0.2, 0.3, 0.4),
        classes={"normal": (0.6, 0.7)},
    )
    pooled = assess(0.3, cal, class_name="effusion")
    assert pooled["reference"] == "pooled" and pooled["reference_percentile"] == 75.0
    own = assess(0.65, cal, class_name="normal")
    assert own["reference"] == "class:normal" and own["reference_percentile"] == 50.0
    assert own["drift_index"] == pytest.approx((0.65 - 0.2) / (chance - 0.2))
    assert own["severity"] == severity_of_index(own["drift_index"])
    bare = assess(0.65, MethodCalibration(calibrated=False, noise_floor=0.0, chance=chance))
    assert bare["reference_percentile"] is None and bare["reference"] is None
