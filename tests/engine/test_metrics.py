"""Drift metrics against independent implementations (SciPy, scikit-image), hand-worked cases and invariants."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import stats
from scipy.spatial.distance import jensenshannon
from skimage.metrics import structural_similarity

from engine import metrics as m

RNG = np.random.default_rng(0)


def _grid_positions(shape: tuple[int, int]) -> np.ndarray:
    h, w = shape
    idx = np.arange(h * w)
    return np.stack([(idx // w + 0.5) / h, (idx % w + 0.5) / w], axis=1)


def _blob(shape: tuple[int, int], centre: tuple[float, float], sigma: float = 3.0) -> np.ndarray:
    rows, cols = np.mgrid[: shape[0], : shape[1]] + 0.5
    return np.exp(-((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2) / (2 * sigma**2))


maps_8_16 = st.tuples(st.integers(8, 16), st.integers(8, 16)).flatmap(
    lambda shape: st.tuples(
        *(arrays(np.float64, shape, elements=st.floats(0, 1, allow_nan=False, width=32)) for _ in range(2))
    )
)


# ---------------------------------------------------------------- against independent implementations


@pytest.mark.parametrize("quantize", [False, True], ids=["continuous", "with_ties"])
def test_correlations_match_scipy(quantize: bool) -> None:
    p, q = RNG.random((20, 24)), RNG.random((20, 24))
    q = 0.6 * p + 0.4 * q
    if quantize:
        p, q = np.round(p * 5) / 5, np.round(q * 4) / 4
    assert m.pearson(p, q) == pytest.approx(stats.pearsonr(p.ravel(), q.ravel())[0], abs=1e-12)
    assert m.spearman(p, q) == pytest.approx(stats.spearmanr(p.ravel(), q.ravel())[0], abs=1e-12)
    out = m.compare_maps(p, q, p_native=p[:5, :5], q_native=q[:5, :5])
    assert out["spearman"] == pytest.approx(stats.spearmanr(p.ravel(), q.ravel())[0], abs=1e-12)


def test_ssim_matches_scikit_image() -> None:
    p = _blob((40, 40), (15, 18), 6)
    q = _blob((40, 40), (20, 22), 8) * 0.8
    assert m.ssim(p, q) == pytest.approx(structural_similarity(p, q, data_range=1.0), abs=1e-12)
    assert m.ssim(p, p) == pytest.approx(1.0)
    # small maps get a smaller (odd) window
    small = RNG.random((5, 6))
    assert m.ssim(small, small**2) == pytest.approx(
        structural_similarity(small, small**2, data_range=1.0, win_size=5), abs=1e-12
    )


@pytest.mark.parametrize("shape", [(1, 2), (3, 3), (4, 5), (7, 7), (8, 8)])
def test_emd_matches_scipy_wasserstein(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(shape[0] * 10 + shape[1])
    p, q = rng.random(shape), rng.random(shape) ** 3
    q.flat[0] = 0.0  # a zero cell is fine
    pos = _grid_positions(shape)
    expected = stats.wasserstein_distance_nd(pos, pos, p.ravel(), q.ravel()) / math.sqrt(2)
    assert m.emd(p, q) == pytest.approx(expected, abs=1e-9)
    assert m.emd(q, p) == pytest.approx(expected, abs=1e-9)


def test_emd_hand_worked_and_bounds() -> None:
    # all mass moves from the left cell to the right cell of a 1x2 grid: distance 0.5 in unit coordinates
    assert m.emd([[1.0, 0.0]], [[0.0, 1.0]]) == pytest.approx(0.5 / math.sqrt(2))
    # corner to opposite corner of a large grid approaches the diagonal, i.e. 1
    a, b = np.zeros((50, 50)), np.zeros((50, 50))
    a[0, 0], b[-1, -1] = 1.0, 3.0  # the scale of a map does not matter
    assert m.emd(a, b) == pytest.approx(49 / 50, abs=1e-12)
    assert m.emd(a, a * 7) == 0.0


def test_js_divergence_matches_scipy() -> None:
    a, b = RNG.random(6), RNG.random(6)
    assert m.js_divergence(a, b) == pytest.approx(jensenshannon(a, b, base=2) ** 2, abs=1e-12)
    assert m.js_divergence([1, 0], [0, 1]) == pytest.approx(1.0)


def test_gini_matches_mean_absolute_difference_form() -> None:
    x = RNG.random((6, 7))
    flat = x.ravel()
    expected = np.abs(flat[:, None] - flat[None, :]).sum() / (2 * flat.size**2 * flat.mean())
    assert m.gini(x) == pytest.approx(expected, abs=1e-12)


def _brute_topk_iou(p: np.ndarray, q: np.ndarray, percent: float) -> float:
    n = p.size
    k = max(1, round(n * percent / 100))

    def top(a: np.ndarray) -> set[int]:
        return {i for _, i in sorted((-float(v), i) for i, v in enumerate(a.ravel()))[:k]}

    tp, tq = top(p), top(q)
    return len(tp & tq) / len(tp | tq)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(maps_8_16, st.sampled_from([5.0, 12.5, 20.0, 50.0, 100.0]))
def test_topk_iou_equals_brute_force_with_ties(pair: tuple[np.ndarray, np.ndarray], percent: float) -> None:
    p, q = (np.round(a * 3) / 3 for a in pair)  # plenty of ties
    assert m.topk_iou(p, q, percent=percent) == pytest.approx(_brute_topk_iou(p, q, percent))


# ---------------------------------------------------------------- hand-worked cases


def test_topk_iou_hand_worked() -> None:
    p = np.arange(100, dtype=float).reshape(10, 10)
    assert m.topk_iou(p, p[::-1, ::-1].copy(), percent=20) == 0.0
    assert m.topk_iou(p, p, percent=20) == 1.0
    q = p.copy()
    q.flat[99], q.flat[0] = q.flat[0], q.flat[99]  # swap the best and the worst pixel: 19 of 20 shared
    assert m.topk_iou(p, q, percent=20) == pytest.approx(19 / 21)
    grid = m.topk_iou_grid(p, q, percents=(1, 20))
    assert grid == {1.0: 0.0, 20.0: pytest.approx(19 / 21)}


def test_ties_are_broken_by_flat_index() -> None:
    zero = np.zeros((10, 10))
    first = np.zeros((10, 10))
    first.flat[:20] = 1.0  # exactly the pixels an all-zero map selects first
    assert m.topk_iou(zero, first, percent=20) == 1.0


def test_dice_and_soft_iou_hand_worked() -> None:
    assert m.dice_from_iou(1 / 3) == pytest.approx(0.5)
    assert m.soft_iou([[1.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [0.0, 0.0]]) == pytest.approx(1 / 3)
    assert m.soft_iou(np.zeros((3, 3)), np.zeros((3, 3))) == 1.0


def test_translated_blob_gives_expected_shifts() -> None:
    shape = (64, 64)
    p = _blob(shape, (20.0, 24.0))
    q = _blob(shape, (29.0, 36.0))  # moved by (9, 12): 15 px
    expected = 15.0 / math.hypot(64, 64)
    assert m.centroid_shift(p, q) == pytest.approx(expected, abs=1e-6)
    assert m.peak_shift(p, q) == pytest.approx(expected, abs=1e-6)
    assert m.centroid(p) == pytest.approx((20.0, 24.0), abs=1e-6)


def test_peak_ignores_zero_valued_ties() -> None:
    """Fewer non-zero pixels than the top 1%: the zero ties (lowest flat index first) are not the peak."""
    sparse_map = np.zeros((30, 30))  # top 1% = 9 pixels, only 2 carry mass
    sparse_map[20, 24], sparse_map[22, 24] = 1.0, 0.5
    assert m.peak_location(sparse_map) == (21.5, 24.5)
    assert m.peak_shift(sparse_map, sparse_map[::-1, ::-1].copy()) == pytest.approx(
        math.hypot(13, 19) / math.hypot(30, 30)
    )


def test_zone_shift_hand_worked_and_lung_mask() -> None:
    upper_left = np.zeros((30, 20))
    upper_left[:10, :10] = 1.0
    lower_right = np.zeros((30, 20))
    lower_right[20:, 10:] = 1.0
    assert m.zone_shift(upper_left, lower_right) == pytest.approx(1.0)
    assert m.zone_shift(upper_left, upper_left * 0.3) == 0.0
    masses = m.zone_masses(lower_right)
    assert masses.shape == (3, 2) and masses[2, 1] == 1.0
    # with a lung mask the zones split its bounding box: rows 0..14 -> thirds of 5 rows each
    mask = np.zeros((30, 20), dtype=bool)
    mask[0:15, 0:20] = True
    top_band = np.zeros((30, 20))
    top_band[0:5, :] = 1.0
    top_band[25:, :] = 9.0  # outside the box: ignored
    np.testing.assert_allclose(
        m.zone_masses(top_band, lung_mask=mask), np.array([[0.5, 0.5], [0.0, 0.0], [0.0, 0.0]])
    )


def test_entropy_and_gini_extremes() -> None:
    uniform, delta = np.ones((8, 8)), np.zeros((8, 8))
    delta[3, 4] = 1.0
    assert m.normalized_entropy(uniform) == pytest.approx(1.0)
    assert m.normalized_entropy(delta) == 0.0
    assert m.gini(uniform) == pytest.approx(0.0)
    assert m.gini(delta) == pytest.approx(1 - 1 / 64)


# ---------------------------------------------------------------- invariants


def _compare(p: np.ndarray, q: np.ndarray) -> dict[str, Any]:
    return m.compare_maps(p, q, p_native=p[::2, ::2], q_native=q[::2, ::2])


def test_identical_maps_score_no_drift() -> None:
    p = _blob((32, 32), (10, 20)) + 0.1 * RNG.random((32, 32))
    out = _compare(p, p)
    for key in ("iou", "dice", "soft_iou", "pearson", "spearman", "ssim"):
        assert out[key] == pytest.approx(1.0), key
    for key in ("centroid_shift", "peak_shift", "zone_shift", "emd", "entropy_change", "gini_change"):
        assert out[key] == pytest.approx(0.0, abs=1e-12), key
    assert set(out["iou_k"]) == {"5", "10", "15", "20", "25", "30", "35", "40", "45", "50"}


_BOUNDED_01 = ("iou", "dice", "soft_iou", "centroid_shift", "peak_shift", "zone_shift", "emd")
_SYMMETRIC = (*_BOUNDED_01, "pearson", "spearman", "ssim")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(maps_8_16)
def test_bounds_symmetry_and_no_nan(pair: tuple[np.ndarray, np.ndarray]) -> None:
    p, q = pair
    forward, backward = _compare(p, q), _compare(q, p)
    for key in _BOUNDED_01:
        assert 0.0 <= forward[key] <= 1.0, key
    for key in ("pearson", "spearman", "ssim", "entropy_change", "gini_change"):
        assert -1.0 <= forward[key] <= 1.0, key
    for key in _SYMMETRIC:
        assert forward[key] == pytest.approx(backward[key], abs=1e-9), key
    assert forward["entropy_change"] == pytest.approx(-backward["entropy_change"])
    assert forward["gini_change"] == pytest.approx(-backward["gini_change"])
    assert all(0.0 <= v <= 1.0 for v in forward["iou_k"].values())
    assert forward["dice"] >= forward["iou"]


@pytest.mark.parametrize(
    ("p", "q"),
    [
        (np.zeros((12, 12)), np.zeros((12, 12))),
        (np.zeros((12, 12)), _blob((12, 12), (4, 4))),
        (np.full((12, 12), 0.5), np.full((12, 12), 0.5)),
        (np.full((12, 12), 0.5), _blob((12, 12), (4, 4))),
    ],
    ids=["both_zero", "one_zero", "both_constant", "one_constant"],
)
def test_degenerate_maps_give_defined_values(p: np.ndarray, q: np.ndarray) -> None:
    out = _compare(p, q)
    flat = [v for k, v in out.items() if k != "iou_k"] + list(out["iou_k"].values())
    assert all(isinstance(v, float) and math.isfinite(v) for v in flat)
    both_constant = np.ptp(p) == 0 and np.ptp(q) == 0 and p[0, 0] == q[0, 0]
    assert out["pearson"] == out["spearman"] == (1.0 if both_constant else 0.0)


def test_map_flags() -> None:
    assert m.map_flags(np.zeros((3, 3))) == ["all_zero"]
    assert m.map_flags(np.ones((3, 3))) == ["constant"]
    assert m.map_flags(np.eye(3)) == []


# ---------------------------------------------------------------- errors say what was expected and what arrived


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: m.topk_iou(np.ones((3, 3, 3)), np.ones((3, 3, 3))),
            r"2-D map \(H, W\), got shape \(3, 3, 3\)",
        ),
        (lambda: m.pearson(np.ones((4, 4)), np.ones((4, 5))), r"same shape: p is \(4, 4\), q is \(4, 5\)"),
        (lambda: m.ssim(np.full((4, 4), np.nan), np.ones((4, 4))), r"NaN or infinite"),
        (lambda: m.soft_iou(-np.ones((4, 4)), np.ones((4, 4))), r"non-negative.*minimum -1"),
        (lambda: m.topk_iou(np.ones((4, 4)), np.ones((4, 4)), percent=0), r"percent must be in \(0, 100\]"),
        (
            lambda: m.zone_shift(np.ones((6, 6)), np.ones((6, 6)), lung_mask=np.ones((5, 5))),
            r"lung_mask must have the map's shape \(6, 6\), got \(5, 5\)",
        ),
        (
            lambda: m.compare_maps(
                np.ones((8, 8)), np.ones((8, 8)), p_native=np.ones((3, 3)), q_native=np.ones((4, 4))
            ),
            r"p_native is \(3, 3\), q_native is \(4, 4\)",
        ),
        (lambda: m.ssim(np.ones((2, 8)), np.ones((2, 8))), r"at least 3x3"),
    ],
)
def test_malformed_input_raises_clear_value_error(call: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()
