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
    """The definition, written out with Python sets: positive pixels reaching the k-th largest value."""
    n = p.size
    k = max(1, round(n * percent / 100))

    def top(a: np.ndarray) -> set[int]:
        values = [float(v) for v in a.ravel()]
        kth = sorted(values, reverse=True)[k - 1]
        return {i for i, v in enumerate(values) if v > 0 and v >= kth}

    tp, tq = top(p), top(q)
    return 1.0 if not tp | tq else len(tp & tq) / len(tp | tq)


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


def test_zero_plateaus_never_overlap() -> None:
    """Zeros are not evidence: an all-zero map shares nothing with a map whose mass sits where a flat-index
    tie-break would pick first, and ties at the threshold are all in."""
    zero = np.zeros((10, 10))
    first = np.zeros((10, 10))
    first.flat[:20] = 1.0
    assert m.topk_iou(zero, first, percent=20) == 0.0
    assert m.topk_iou(zero, zero, percent=20) == 1.0  # neither map has evidence: the same statement
    tied = np.zeros((10, 10))
    tied.flat[:30] = 1.0  # 30 pixels tie at the top-20 threshold: all 30 are in the set
    assert m.topk_iou(tied, first, percent=20) == pytest.approx(20 / 30)


def _sparse(rng: np.random.Generator, support: np.ndarray) -> np.ndarray:
    out = np.zeros(support.shape)
    out[support] = rng.random(int(support.sum())) + 0.01
    return out


def test_sparse_maps_with_disjoint_supports_score_zero() -> None:
    """The measured failure: two 64x64 maps, 5% non-zero each, disjoint supports, used to score 0.61-0.65."""
    rng = np.random.default_rng(3)
    flat = rng.permutation(64 * 64)
    a, b = np.zeros(64 * 64, bool), np.zeros(64 * 64, bool)
    a[flat[:205]], b[flat[205:410]] = True, True
    p, q = _sparse(rng, a.reshape(64, 64)), _sparse(rng, b.reshape(64, 64))
    for percent in m.DEFAULT_K_GRID:
        assert m.topk_iou(p, q, percent=percent) == 0.0
    assert m.map_flags(p, topk_percent=20) == ["sparse"]
    assert m.map_flags(p, topk_percent=5) == []  # 205 positive pixels >= round(4096 * 5%) = 205


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(maps_8_16, st.sampled_from([5.0, 20.0, 50.0]), st.floats(1e-3, 1e3))
def test_topk_iou_properties(pair: tuple[np.ndarray, np.ndarray], percent: float, scale: float) -> None:
    p, q = (np.round(np.maximum(a - 0.5, 0.0) * 4) / 4 for a in pair)  # zero plateaus and ties
    assert m.topk_iou(p, p, percent=percent) == 1.0
    assert m.topk_iou(p, q, percent=percent) == m.topk_iou(q * scale, p, percent=percent)
    disjoint = np.where(p > 0, 0.0, q)
    if p.any() or disjoint.any():
        assert m.topk_iou(p, disjoint, percent=percent) == 0.0


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
    # lung zones count lung pixels only: two lungs with a mediastinum between them
    lungs = np.zeros((30, 20), dtype=bool)
    lungs[3:27, 2:8] = lungs[3:27, 12:18] = True
    mediastinum = np.zeros((30, 20))
    mediastinum[3:27, 9:11] = 5.0  # between the lungs, inside their bounding box: not on a lung
    mediastinum[3:11, 3:5] = 1.0  # upper part of the image-left lung
    np.testing.assert_allclose(
        m.zone_masses(mediastinum, lung_mask=lungs), np.array([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
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


def test_concentration_change_is_measured_on_the_raw_maps() -> None:
    """A near-uniform raw map becomes a concentrated one after min-max (its floor is subtracted): on the
    displayed maps the two look equally concentrated, while the raw attribution concentrated a lot."""
    yy, xx = np.mgrid[0:16, 0:16]
    bump = np.exp(-((yy - 8.0) ** 2 + (xx - 8.0) ** 2) / 8.0)
    p_raw = 5.0 + bump  # evidence nearly everywhere, a small bump on top
    q_raw = bump  # the same bump, nothing else
    shown_p, shown_q = ((r - r.min()) / (r.max() - r.min()) for r in (p_raw, q_raw))
    native = np.ones((4, 4))
    shown = m.compare_maps(shown_p, shown_q, p_native=native, q_native=native)
    raw = m.compare_maps(shown_p, shown_q, p_native=native, q_native=native, p_raw=p_raw, q_raw=q_raw)

    def entropy(r: np.ndarray) -> float:
        return float(stats.entropy(r.ravel() / r.sum()) / math.log(r.size))

    assert raw["entropy_change"] == pytest.approx(entropy(q_raw) - entropy(p_raw), abs=1e-12)
    assert shown["entropy_change"] == pytest.approx(0.0, abs=1e-12)
    assert raw["entropy_change"] < -0.2 and raw["gini_change"] > 0.5
    assert raw["iou"] == shown["iou"], "only the concentration metrics read the raw maps"
    with pytest.raises(ValueError, match="go together"):
        m.compare_maps(shown_p, shown_q, p_native=native, q_native=native, p_raw=p_raw)
