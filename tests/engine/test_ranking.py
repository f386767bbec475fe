"""The ranking reversal test (engine.ranking) against oracles and invariants: scipy's Wilcoxon on the
interactions computed by hand, a hand-computed Holm, a loop re-implementation of the bootstrap on the same
draws, the common image set, and simulations with and without an interaction."""

from __future__ import annotations

import itertools
import json
from typing import Any

import numpy as np
import pytest
from scipy import stats

from engine import ranking
from engine.ranking import (
    MIN_COMMON_IMAGES,
    common_images,
    holm_adjust,
    interaction_test,
    method_tables,
    reversal_test,
)
from engine.study import statistics

MODELS = ("densenet201", "inceptionv3", "resnet50v2")


def simulate(
    seed: int,
    *,
    n: int = 20,
    layercam: tuple[float, ...] = (0.60, 0.61, 0.62),
    gradcampp: tuple[float, ...] | None = None,
    noise: float = 0.1,
) -> list[tuple[str, str, str, float]]:
    """(image, architecture, method, IoU) records: an image effect + an architecture effect + a method effect
    + noise. ``gradcampp=None``: GradCAM++ has the same architecture effects (no interaction), shifted by a
    method effect of -0.1."""
    rng = np.random.default_rng(seed)
    effects = {"layercam": layercam, "gradcampp": gradcampp or tuple(v - 0.1 for v in layercam)}
    records = []
    for i in range(n):
        image_effect = rng.normal(0.0, 0.1)
        for method, centre in effects.items():
            for model, c in zip(MODELS, centre, strict=True):
                records.append((f"img{i:03d}.png", model, method, c + image_effect + rng.normal(0.0, noise)))
    return records


def run(records: list[tuple[Any, str, str, Any]], **options: Any) -> dict[str, Any]:
    tables = method_tables(records)
    return reversal_test(tables["layercam"], tables["gradcampp"], **options)


def hand_holm(p: list[float]) -> list[float]:
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    out = [0.0] * m
    previous = 0.0
    for rank, i in enumerate(order):
        previous = max(previous, min(1.0, (m - rank) * p[i]))
        out[i] = previous
    return out


# ------------------------------------------------------------------------------------ simulations


def test_no_interaction_rarely_gives_a_reversal_but_the_descriptive_rule_often_does() -> None:
    seeds = range(50)
    results = [run(simulate(seed), n_boot=200, seed=seed) for seed in seeds]
    verdicts = [r["reversal"] for r in results]
    descriptive = [r["reversal_descriptive"] for r in results]
    assert all(v is not None for v in verdicts)
    assert sum(verdicts) <= 0.10 * len(seeds)  # false reversals: at most 10% (expected <= alpha)
    assert sum(descriptive) >= 0.30 * len(seeds)  # the old rule calls chance orderings a reversal
    for r in results:  # the verdict never says more than the descriptive rule
        assert not r["reversal"] or r["reversal_descriptive"]


def test_a_strong_interaction_is_a_reversal() -> None:
    records = simulate(3, n=30, layercam=(0.8, 0.7, 0.6), gradcampp=(0.55, 0.65, 0.75), noise=0.05)
    out = run(records, n_boot=1000, seed=0)
    assert out["reversal"] is True and out["reversal_descriptive"] is True
    assert out["bootstrap"]["p_order_differs"] > 0.9 and out["bootstrap"]["p_top_changes"] > 0.9
    assert out["order_a"] == list(MODELS) and out["order_b"] == list(reversed(MODELS))
    assert out["significant_pairs"] and all(t["p_holm"] < 0.05 for t in out["interaction_tests"])
    assert out["tau"] == pytest.approx(-1.0) and out["top_changes"]
    json.dumps(out)


# ------------------------------------------------------------------------------------ oracles


def test_interaction_tests_match_scipy_on_hand_computed_d_and_a_hand_holm() -> None:
    records = simulate(5, n=25, layercam=(0.7, 0.65, 0.6), gradcampp=(0.6, 0.62, 0.58), noise=0.08)
    value = {(i, m, meth): v for i, m, meth, v in records}
    images = sorted({r[0] for r in records})
    out = run(records, n_boot=100)
    expected_p = []
    for test, (a, b) in zip(out["interaction_tests"], itertools.combinations(MODELS, 2), strict=True):
        d = np.array(
            [
                (value[(i, a, "layercam")] - value[(i, b, "layercam")])
                - (value[(i, a, "gradcampp")] - value[(i, b, "gradcampp")])
                for i in images
            ]
        )
        ref = stats.wilcoxon(d)
        assert (test["model_a"], test["model_b"]) == (a, b)
        assert test["n"] == 25 and test["n_zero"] == 0
        assert test["statistic"] == pytest.approx(ref.statistic)
        assert test["p_value"] == pytest.approx(ref.pvalue)
        assert test["median_d"] == pytest.approx(np.median(d)) and test["mean_d"] == pytest.approx(d.mean())
        expected_p.append(float(ref.pvalue))
    assert [t["p_holm"] for t in out["interaction_tests"]] == pytest.approx(hand_holm(expected_p))


def test_holm_matches_a_hand_computation_and_is_the_studys() -> None:
    p = [0.01, 0.04, 0.03, 0.2, 0.001]
    assert holm_adjust(p) == pytest.approx(hand_holm(p))
    # the textbook example: 0.01, 0.04, 0.03 -> 0.03, 0.06, 0.06
    assert holm_adjust([0.01, None, 0.04, 0.03]) == pytest.approx([0.03, None, 0.06, 0.06])
    assert statistics.holm_adjust is ranking.holm_adjust


def test_zero_interactions_are_dropped_and_said_so() -> None:
    d = np.array([0.0, 0.0, 0.1, -0.05, 0.2, 0.3, 0.15, 0.25, 0.12])
    out = interaction_test(d)
    ref = stats.wilcoxon(d)  # zero_method="wilcox": zeros dropped
    assert out["p_value"] == pytest.approx(ref.pvalue) and out["statistic"] == pytest.approx(ref.statistic)
    assert (out["n"], out["n_zero"], out["n_nonzero"]) == (9, 2, 7)
    assert "2 zero interaction(s) dropped" in out["note"]
    zeros = interaction_test(np.zeros(8))
    assert zeros["p_value"] == 1.0 and zeros["statistic"] == 0.0 and "zero" in zeros["note"]
    assert interaction_test([])["p_value"] is None


def test_bootstrap_matches_a_loop_over_the_same_draws() -> None:
    records = simulate(8, n=12, layercam=(0.62, 0.6, 0.61), noise=0.05)
    out = run(records, n_boot=300, seed=11)
    tables = method_tables(records)
    images = sorted(str(i) for i in tables["layercam"])
    xa = np.array([[tables["layercam"][i][m] for m in MODELS] for i in images])
    xb = np.array([[tables["gradcampp"][i][m] for m in MODELS] for i in images])
    draws = np.random.default_rng(11).integers(0, len(images), size=(300, len(images)))
    differs = top = 0
    for idx in draws:
        ma, mb = xa[idx].mean(axis=0), xb[idx].mean(axis=0)
        pairs = itertools.combinations(range(3), 2)
        differs += any((ma[i] - ma[j]) * (mb[i] - mb[j]) < 0 for i, j in pairs)
        top += int(np.argmax(ma) != np.argmax(mb))
    assert out["bootstrap"]["p_order_differs"] == pytest.approx(differs / 300)
    assert out["bootstrap"]["p_top_changes"] == pytest.approx(top / 300)
    assert run(records, n_boot=300, seed=11) == out  # seeded
    assert out["bootstrap"]["p_top_changes"] <= out["bootstrap"]["p_order_differs"]


def test_the_bootstrap_resamples_images_jointly() -> None:
    # the same values under both methods: resampling an image keeps both methods' values together, so the
    # orders can never differ (independent resampling per method would make them differ often)
    records = [r for r in simulate(2, n=15, noise=0.2) if r[2] == "layercam"]
    records += [(i, m, "gradcampp", v) for i, m, _, v in records]
    out = run(records, n_boot=500)
    assert out["bootstrap"]["p_order_differs"] == 0.0 and out["bootstrap"]["p_top_changes"] == 0.0
    assert out["reversal"] is False and out["reversal_descriptive"] is False
    assert all(t["p_value"] == 1.0 for t in out["interaction_tests"])


# ------------------------------------------------------------------------------------ the common image set


def test_an_image_missing_for_one_architecture_is_left_out_for_all() -> None:
    records = simulate(4, n=10)
    records = [
        r for r in records if not (r[0] == "img003.png" and r[1] == "resnet50v2" and r[2] == "gradcampp")
    ]
    with_gaps: list[tuple[str, str, str, float | None]] = [
        (i, m, meth, None if (i, m) == ("img007.png", "densenet201") else v) for i, m, meth, v in records
    ]
    tables = method_tables(with_gaps)
    images = common_images(tables["layercam"], tables["gradcampp"], MODELS)
    assert len(images) == 8 and "img003.png" not in images and "img007.png" not in images
    out = run(with_gaps, n_boot=50)
    assert out["n_images"] == 8 and out["n_images_left_out"] == 2
    for model in MODELS:
        kept = [v for i, m, meth, v in with_gaps if m == model and meth == "layercam" and i in images]
        assert out["means_a"][model] == pytest.approx(np.mean(np.asarray(kept, dtype=float)))
    assert all(t["n"] == 8 for t in out["interaction_tests"])


def test_architectures_without_both_methods_are_left_out_and_named() -> None:
    records = simulate(6, n=10)
    records += [(f"img{i:03d}.png", "vit", "layercam", 0.5) for i in range(10)]
    out = run(records, n_boot=50)
    assert out["models"] == list(MODELS) and out["models_left_out"] == ["vit"] and "vit" in out["note"]
    assert out["n_images"] == 10


def test_too_few_images_or_architectures_give_no_verdict() -> None:
    records = simulate(7, n=MIN_COMMON_IMAGES - 1, layercam=(0.8, 0.7, 0.6), gradcampp=(0.5, 0.6, 0.7))
    few = run(records, n_boot=50)
    assert few["reversal"] is None and f"at least {MIN_COMMON_IMAGES}" in few["note"]
    assert few["reversal_descriptive"] is True  # described, not decided
    one = run([r for r in simulate(7, n=10) if r[1] == "resnet50v2"], n_boot=50)
    assert one["reversal"] is None and "at least 2 architectures" in one["note"]
    assert one["interaction_tests"] == [] and one["bootstrap"]["p_order_differs"] is None
    empty = reversal_test({}, {})
    assert empty["reversal"] is None and empty["n_images"] == 0
    json.dumps(few), json.dumps(one), json.dumps(empty)


def test_method_tables_drop_missing_values_and_refuse_duplicates() -> None:
    tables = method_tables([(1, "a", "m", 0.5), (1, "b", "m", None), (2, "a", "m", float("nan"))])
    assert tables == {"m": {1: {"a": 0.5}}}
    with pytest.raises(ValueError, match="duplicate"):
        method_tables([(1, "a", "m", 0.5), (1, "a", "m", 0.6)])
    with pytest.raises(ValueError, match="n_boot"):
        reversal_test({}, {}, n_boot=0)


def test_control_repeats_the_test_with_the_second_table() -> None:
    records = simulate(9, n=20, layercam=(0.8, 0.7, 0.6), gradcampp=(0.55, 0.65, 0.75), noise=0.05)
    tables = method_tables(records)
    same = reversal_test(tables["layercam"], tables["gradcampp"], control=tables["gradcampp"], n_boot=100)
    control = same.pop("control")
    assert control == {**same, "control": None}
    # a control under which the architectures keep the LayerCAM order: no reversal there
    flat = {i: {m: v - 0.1 for m, v in row.items()} for i, row in tables["layercam"].items()}
    out = reversal_test(tables["layercam"], tables["gradcampp"], control=flat, n_boot=100)
    assert out["reversal"] is True and out["control"]["reversal"] is False
    assert reversal_test(tables["layercam"], tables["gradcampp"], n_boot=10)["control"] is None
