"""Reference-free drift metrics between two attribution maps of the same image (docs/DESIGN.md section 3).

``p`` is the transfer-learning map, ``q`` the fine-tuned one; both are non-negative 2-D maps on the same grid
(the library's normalized maps, values in [0, 1]). Every function checks shapes first, computes in float64 and
returns plain floats. Conventions for degenerate maps (docs/DESIGN.md trap 6), so that nothing is ever NaN:

- a top-k set holds only positive pixels, and ties are inclusive: every pixel whose value reaches the k-th
  largest value is in (so the set may be larger than k, never decided by pixel position); a map with fewer
  positive pixels than k uses those it has (:func:`map_flags` says ``sparse``), so zero-valued plateaus
  never make two maps look alike;
- a map with no mass (all zeros) is treated as the *uniform* distribution wherever a distribution is needed
  (centroid, peak, zones, EMD, entropy, Gini): "no evidence anywhere" is "evidence everywhere equally";
- correlations of a constant map are 1.0 if both maps are constant and equal, else 0.0
  (:func:`map_flags` reports such maps so callers can flag them).

One sort per map serves the whole top-k grid, the robust peak, the Spearman ranks and the Gini coefficient,
which keeps :func:`compare_maps` cheap next to a network forward. That shared sort is why the whole metric
set stays in this one module (over 500 lines): splitting it would split the per-map work the metrics share.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_K_GRID",
    "SCALAR_METRICS",
    "centroid",
    "centroid_shift",
    "compare_maps",
    "dice_from_iou",
    "emd",
    "gini",
    "js_divergence",
    "map_flags",
    "normalized_entropy",
    "peak_location",
    "peak_shift",
    "pearson",
    "soft_iou",
    "spearman",
    "ssim",
    "topk_iou",
    "topk_iou_grid",
    "topk_set",
    "zone_masses",
    "zone_shift",
]

DEFAULT_K_GRID: tuple[float, ...] = (5, 10, 15, 20, 25, 30, 35, 40, 45, 50)
PEAK_PERCENT = 1.0
SSIM_WINDOW = 7


# ---------------------------------------------------------------- input checks


def _as_map(m: Any, name: str) -> np.ndarray:
    arr = np.asarray(m)
    if arr.ndim != 2 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 2-D map (H, W), got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise ValueError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    arr = arr.astype(np.float64, copy=False)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite values; expected finite attribution values")
    return arr


def _as_pair(p: Any, q: Any, names: tuple[str, str] = ("p", "q")) -> tuple[np.ndarray, np.ndarray]:
    a, b = _as_map(p, names[0]), _as_map(q, names[1])
    if a.shape != b.shape:
        raise ValueError(
            f"maps must have the same shape: {names[0]} is {a.shape}, {names[1]} is {b.shape} "
            "(resize both to one grid first)"
        )
    return a, b


def _non_negative(m: np.ndarray, name: str) -> np.ndarray:
    if (m < 0).any():
        raise ValueError(f"{name} must be non-negative (a ReLU'd attribution map), got minimum {m.min():.3g}")
    return m


def _check_percent(percent: float) -> float:
    value = float(percent)
    if not 0.0 < value <= 100.0:
        raise ValueError(f"percent must be in (0, 100], got {percent!r}")
    return value


def _topk_count(n: int, percent: float) -> int:
    """Number of pixels in the top ``percent`` % of ``n``: ``max(1, round(n * percent / 100))``."""
    return max(1, min(n, round(n * _check_percent(percent) / 100.0)))


# ---------------------------------------------------------------- shared per-map work


@dataclass(frozen=True)
class _Sorted:
    """One stable descending sort of a map, reused by several metrics."""

    values: np.ndarray  # flat map, float64
    order: np.ndarray  # flat indices, value descending then index ascending
    shape: tuple[int, int]

    @classmethod
    def of(cls, m: np.ndarray) -> _Sorted:
        flat = m.ravel()
        order = np.argsort(-flat, kind="stable")
        return cls(values=flat, order=order, shape=(m.shape[0], m.shape[1]))

    def average_ranks(self) -> np.ndarray:
        """Tie-averaged ranks (a linear function of scipy's ``rankdata``; Spearman only needs that)."""
        ordered = self.values[self.order]
        starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
        ends = np.r_[starts[1:], ordered.size]
        group_rank = (starts + ends - 1) / 2.0
        group = np.cumsum(np.r_[True, ordered[1:] != ordered[:-1]]) - 1
        ranks = np.empty(ordered.size)
        ranks[self.order] = group_rank[group]
        return ranks


def _topk_mask(s: _Sorted, percent: float) -> np.ndarray:
    """Flat boolean mask of the top ``percent`` % set: positive pixels whose value is at least the k-th
    largest value, ``k = max(1, round(N percent / 100))`` (inclusive ties; fewer than k when the map has fewer
    positive pixels)."""
    k = _topk_count(s.values.size, percent)
    threshold = s.values[s.order[k - 1]]
    return (s.values >= threshold) & (s.values > 0.0)


def topk_set(m: Any, *, percent: float = 20.0) -> np.ndarray:
    """Boolean mask (same shape as ``m``) of its top ``percent`` % set, as :func:`topk_iou` defines it."""
    a = _non_negative(_as_map(m, "map"), "map")
    return _topk_mask(_Sorted.of(a), percent).reshape(a.shape)


def _iou_of_masks(a: np.ndarray, b: np.ndarray) -> float:
    union = int(np.count_nonzero(a | b))
    if union == 0:  # neither map has a positive pixel: both say "no evidence", which is the same
        return 1.0
    return int(np.count_nonzero(a & b)) / union


def _iou_grid(a: _Sorted, b: _Sorted, percents: Sequence[float]) -> dict[float, float]:
    return {float(pc): _iou_of_masks(_topk_mask(a, pc), _topk_mask(b, pc)) for pc in percents}


# ---------------------------------------------------------------- overlap


def topk_iou(p: Any, q: Any, *, percent: float = 20.0) -> float:
    """Top-k% IoU: ``|T_k(P) & T_k(Q)| / |T_k(P) | T_k(Q)|`` with T_k(M) = {i : M_i > 0 and M_i >= t_k(M)},
    t_k the k-th largest value of M, ``k = max(1, round(N percent / 100))``.

    Ties are inclusive and zeros never enter a set, so two maps with disjoint supports score 0 whatever
    their zero plateaus; a map with fewer positive pixels than k contributes the ones it has. Both sets
    empty (two all-zero maps) scores 1. In [0, 1]; invariant to multiplying either map by a positive number.
    """
    a, b = _as_pair(p, q)
    return _iou_grid(_Sorted.of(a), _Sorted.of(b), [percent])[float(percent)]


def topk_iou_grid(p: Any, q: Any, *, percents: Sequence[float] = DEFAULT_K_GRID) -> dict[float, float]:
    """:func:`topk_iou` for every ``percent`` in ``percents`` (one sort per map)."""
    a, b = _as_pair(p, q)
    return _iou_grid(_Sorted.of(a), _Sorted.of(b), percents)


def dice_from_iou(iou: float) -> float:
    """Dice of two sets from their IoU: ``2 IoU / (1 + IoU)``. In [0, 1]."""
    if not 0.0 <= iou <= 1.0:
        raise ValueError(f"IoU must be in [0, 1], got {iou!r}")
    return 2.0 * iou / (1.0 + iou)


def soft_iou(p: Any, q: Any) -> float:
    """Soft IoU: ``sum min(P, Q) / sum max(P, Q)``; 1.0 when both maps are all zeros. In [0, 1]."""
    a, b = _as_pair(p, q)
    _non_negative(a, "p"), _non_negative(b, "q")
    top = float(np.maximum(a, b).sum())
    return 1.0 if top == 0.0 else float(np.minimum(a, b).sum()) / top


# ---------------------------------------------------------------- pattern


def _correlation(x: np.ndarray, y: np.ndarray) -> float:
    dx, dy = x - x.mean(), y - y.mean()
    sx, sy = float(np.sqrt(dx @ dx)), float(np.sqrt(dy @ dy))
    if sx == 0.0 or sy == 0.0:
        return 1.0 if sx == sy == 0.0 and x[0] == y[0] else 0.0
    return float(np.clip((dx @ dy) / (sx * sy), -1.0, 1.0))


def pearson(p: Any, q: Any) -> float:
    """Pearson correlation of the flattened maps: ``cov(P, Q) / (sd(P) sd(Q))``. In [-1, 1].

    A constant map has no defined correlation: 1.0 if both maps are constant and equal, else 0.0.
    """
    a, b = _as_pair(p, q)
    return _correlation(a.ravel(), b.ravel())


def spearman(p: Any, q: Any) -> float:
    """Spearman correlation: Pearson of the tie-averaged ranks. In [-1, 1]; constant maps as :func:`pearson`."""
    a, b = _as_pair(p, q)
    if np.ptp(a) == 0.0 or np.ptp(b) == 0.0:
        return _correlation(a.ravel(), b.ravel())
    return _correlation(_Sorted.of(a).average_ranks(), _Sorted.of(b).average_ranks())


# ---------------------------------------------------------------- structure


def ssim(p: Any, q: Any) -> float:
    """Mean structural similarity, scikit-image ``structural_similarity(p, q, data_range=1)``.

    ``SSIM = (2 mu_p mu_q + C1)(2 cov + C2) / ((mu_p^2 + mu_q^2 + C1)(var_p + var_q + C2))`` over 7x7 uniform
    windows (sample covariance), C1 = (0.01)^2, C2 = (0.03)^2, averaged over the valid (uncropped) region;
    the window shrinks to the largest odd size that fits a smaller map (at least 3x3). In [-1, 1].
    """
    from skimage.metrics import structural_similarity

    a, b = _as_pair(p, q)
    side = min(a.shape)
    win = min(SSIM_WINDOW, side if side % 2 else side - 1)
    if win < 3:
        raise ValueError(f"SSIM needs maps of at least 3x3 pixels, got {a.shape}")
    return float(structural_similarity(a, b, data_range=1.0, win_size=win))


# ---------------------------------------------------------------- localization


def _grid(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (row + 0.5, col + 0.5)."""
    return np.arange(shape[0]) + 0.5, np.arange(shape[1]) + 0.5


def centroid(m: Any) -> tuple[float, float]:
    """Centre of mass ``(sum_ij M_ij (i + 0.5), sum_ij M_ij (j + 0.5)) / sum M`` in pixels (row, col).

    A map with no mass gives the image centre (the centroid of the uniform distribution).
    """
    a = _non_negative(_as_map(m, "map"), "map")
    total = float(a.sum())
    if total == 0.0:
        return a.shape[0] / 2.0, a.shape[1] / 2.0
    rows, cols = _grid((a.shape[0], a.shape[1]))
    return float(a.sum(axis=1) @ rows) / total, float(a.sum(axis=0) @ cols) / total


def _peak_from_sorted(s: _Sorted, percent: float) -> tuple[float, float]:
    if s.values[s.order[0]] == 0.0:
        return s.shape[0] / 2.0, s.shape[1] / 2.0
    top = s.order[: _topk_count(s.values.size, percent)]
    # only pixels that carry mass: zero-valued ties (picked by flat index) would drag the peak to the top-left
    top = top[s.values[top] > 0.0]
    rows, cols = np.divmod(top, s.shape[1])
    return float(rows.mean()) + 0.5, float(cols.mean()) + 0.5


def peak_location(m: Any, *, percent: float = PEAK_PERCENT) -> tuple[float, float]:
    """Robust peak: unweighted mean pixel-centre position of the top ``percent`` % pixels (row, col).

    Only pixels with a positive value count (a map with fewer non-zero pixels than the top ``percent`` %
    uses those). A map with no mass gives the image centre.
    """
    a = _non_negative(_as_map(m, "map"), "map")
    return _peak_from_sorted(_Sorted.of(a), percent)


def _shift(a: tuple[float, float], b: tuple[float, float], shape: tuple[int, ...]) -> float:
    return math.hypot(a[0] - b[0], a[1] - b[1]) / math.hypot(shape[0], shape[1])


def centroid_shift(p: Any, q: Any) -> float:
    """``|centroid(P) - centroid(Q)| / hypot(H, W)`` (distance over the image diagonal). In [0, 1)."""
    a, b = _as_pair(p, q)
    return _shift(centroid(a), centroid(b), a.shape)


def peak_shift(p: Any, q: Any, *, percent: float = PEAK_PERCENT) -> float:
    """``|peak(P) - peak(Q)| / hypot(H, W)`` with the robust peak of :func:`peak_location`. In [0, 1)."""
    a, b = _as_pair(p, q)
    return _shift(peak_location(a, percent=percent), peak_location(b, percent=percent), a.shape)


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def zone_masses(m: Any, *, lung_mask: Any = None) -> np.ndarray:
    """Share of the attribution mass in 6 zones, shape (3, 2): rows upper/middle/lower thirds, columns
    left/right halves (in a PA radiograph, image-left is the patient's right).

    Without ``lung_mask`` these are *image zones*: thirds and halves of the whole image, not anatomy. With
    ``lung_mask`` (same shape, non-zero = lung) they are *lung zones*: thirds and halves of the lungs'
    bounding box, and only mass on lung pixels counts. Row/column boundaries are
    ``round(start + i * extent / n)``. No mass in the zones gives the uniform distribution (1/6 each).
    Sums to 1.
    """
    a = _non_negative(_as_map(m, "map"), "map")
    r0, r1, c0, c1 = 0, a.shape[0], 0, a.shape[1]
    if lung_mask is not None:
        mask = np.asarray(lung_mask)
        if mask.shape != a.shape:
            raise ValueError(f"lung_mask must have the map's shape {a.shape}, got {mask.shape}")
        if not mask.any():
            raise ValueError("lung_mask is empty; expected at least one non-zero (lung) pixel")
        r0, r1, c0, c1 = _bbox(mask != 0)
        a = np.where(mask != 0, a, 0.0)
    if r1 - r0 < 3 or c1 - c0 < 2:
        raise ValueError(f"zones need a region of at least 3x2 pixels, got {(r1 - r0, c1 - c0)}")
    rb = [round(r0 + i * (r1 - r0) / 3) for i in range(4)]
    cb = [round(c0 + i * (c1 - c0) / 2) for i in range(3)]
    masses = np.array([[a[rb[i] : rb[i + 1], cb[j] : cb[j + 1]].sum() for j in range(2)] for i in range(3)])
    total = float(masses.sum())
    return np.full((3, 2), 1.0 / 6.0) if total == 0.0 else masses / total


def js_divergence(a: Any, b: Any) -> float:
    """Jensen-Shannon divergence, base 2: ``JS = (KL(a|m) + KL(b|m)) / 2``, ``m = (a + b) / 2``,
    ``KL(x|m) = sum x log2(x / m)`` with 0 log 0 = 0. Inputs are normalized to sum 1 first. In [0, 1]."""
    x, y = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"distributions must have the same length, got {x.size} and {y.size}")
    if (x < 0).any() or (y < 0).any() or not (x.sum() > 0 and y.sum() > 0):
        raise ValueError("distributions must be non-negative with positive total mass")
    x, y = x / x.sum(), y / y.sum()
    mid = (x + y) / 2.0

    def kl(u: np.ndarray) -> float:
        nz = u > 0
        return float(np.sum(u[nz] * np.log2(u[nz] / mid[nz])))

    return float(np.clip((kl(x) + kl(y)) / 2.0, 0.0, 1.0))


def zone_shift(p: Any, q: Any, *, lung_mask: Any = None) -> float:
    """JS divergence (base 2) between the 6-zone mass distributions of :func:`zone_masses`. In [0, 1]."""
    a, b = _as_pair(p, q)
    return js_divergence(zone_masses(a, lung_mask=lung_mask), zone_masses(b, lung_mask=lung_mask))


# ---------------------------------------------------------------- distribution


def _mass(m: np.ndarray) -> np.ndarray:
    total = float(m.sum())
    return np.full(m.shape, 1.0 / m.size) if total == 0.0 else m / total


def emd(p_native: Any, q_native: Any) -> float:
    """Earth mover's distance: 2-D Wasserstein-1 between the maps as mass distributions, over sqrt(2).

    ``W1 = min_T sum_ij T_ij |x_i - x_j|`` over transport plans T with marginals P/sum(P) and Q/sum(Q); pixel
    (i, j) of an h x w grid sits at ((i + 0.5) / h, (j + 0.5) / w) in the unit square, so W1 is in
    [0, sqrt(2)] and the result ``W1 / sqrt(2)`` in [0, 1]. Meant for the native CAM grid (a few dozen
    cells). Exact: a linear program (HiGHS) on the mass difference only, since for W1 shared mass stays put
    (Kantorovich-Rubinstein: W1 depends on P - Q alone).
    """
    a, b = _as_pair(p_native, q_native, ("p_native", "q_native"))
    _non_negative(a, "p_native"), _non_negative(b, "q_native")
    diff = (_mass(a) - _mass(b)).ravel()
    scale = 1e-12
    src, dst = np.flatnonzero(diff > scale), np.flatnonzero(diff < -scale)
    if src.size == 0 or dst.size == 0:
        return 0.0
    supply, demand = diff[src], -diff[dst]
    demand = demand * (supply.sum() / demand.sum())
    h, w = a.shape
    pos = np.stack([(np.arange(h * w) // w + 0.5) / h, (np.arange(h * w) % w + 0.5) / w], axis=1)
    cost = np.sqrt(((pos[src, None, :] - pos[None, dst, :]) ** 2).sum(axis=2))
    ns, nd = src.size, dst.size
    if ns == 1 or nd == 1:  # a single source or sink: the plan is forced
        return float((cost * (supply[:, None] * demand[None, :]) / supply.sum()).sum()) / math.sqrt(2.0)
    return float(np.clip(_transport_cost(cost, supply, demand) / math.sqrt(2.0), 0.0, 1.0))


_solvers = threading.local()


def _highs() -> Any:
    """One HiGHS instance per thread (the service computes reports in a thread pool), reused across calls."""
    solver = getattr(_solvers, "highs", None)
    if solver is None:
        import highspy

        # highspy.Highs (the Python wrapper) prints a licence banner to stdout when first built; the core
        # class it wraps is the same solver without the banner.
        core = getattr(getattr(highspy, "_core", None), "_Highs", None)
        solver = core() if core is not None else highspy.Highs()
        options: dict[str, bool | float | str] = {
            "output_flag": False,
            "log_to_console": False,
            # presolve costs more than it saves on a few hundred variables; tight tolerances make
            # EMD(p, q) == EMD(q, p) to ~1e-15 (the defaults leave ~1e-7)
            "presolve": "off",
            "primal_feasibility_tolerance": 1e-10,
            "dual_feasibility_tolerance": 1e-10,
        }
        for key, value in options.items():
            solver.setOptionValue(key, value)
        _solvers.highs = solver
    return solver


def _transport_cost(cost: np.ndarray, supply: np.ndarray, demand: np.ndarray) -> float:
    """Optimal value of the transportation problem ``min <cost, T>``, ``T 1 = supply``, ``T^T 1 = demand``,
    ``T >= 0`` (equal totals), solved exactly by HiGHS' simplex through its own Python API (the same solver
    as ``scipy.optimize.linprog(method="highs")``, without that wrapper's ~5 ms of per-call checks)."""
    import highspy

    ns, nd = cost.shape
    # constraints in CSC: variable (s, d) sits in row s and in row ns + d; one demand row is implied by the
    # others (total supply == total demand), so it is dropped
    var = np.arange(ns * nd)
    row_idx = np.stack([var // nd, ns + var % nd], axis=1).ravel()
    keep = row_idx < ns + nd - 1
    rhs = np.r_[supply, demand[:-1]]
    lp = highspy.HighsLp()
    lp.num_col_ = ns * nd
    lp.num_row_ = ns + nd - 1
    lp.col_cost_ = np.ascontiguousarray(cost.ravel(), dtype=np.float64)
    lp.col_lower_ = np.zeros(ns * nd)
    lp.col_upper_ = np.full(ns * nd, highspy.kHighsInf)
    lp.row_lower_ = rhs
    lp.row_upper_ = rhs
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.start_ = np.r_[0, np.cumsum(keep.reshape(-1, 2).sum(axis=1))].astype(np.int32)
    lp.a_matrix_.index_ = row_idx[keep].astype(np.int32)
    lp.a_matrix_.value_ = np.ones(int(keep.sum()))
    solver = _highs()
    solver.clearModel()
    solver.passModel(lp)
    solver.run()
    status = solver.getModelStatus()
    if status != highspy.HighsModelStatus.kOptimal:
        raise RuntimeError(f"EMD transportation problem did not solve: {solver.modelStatusToString(status)}")
    return float(solver.getInfo().objective_function_value)


# ---------------------------------------------------------------- concentration


def normalized_entropy(m: Any) -> float:
    """Shannon entropy of the map as a distribution over its N pixels, over log N:
    ``-sum p log p / log N`` with ``p = M / sum M`` (0 log 0 = 0). In [0, 1]; no mass -> 1 (uniform)."""
    a = _non_negative(_as_map(m, "map"), "map")
    if a.size < 2:
        return 0.0
    prob = _mass(a).ravel()
    nz = prob[prob > 0]
    return float(np.clip(-(nz @ np.log(nz)) / math.log(a.size), 0.0, 1.0))


def _gini_sorted(ascending: np.ndarray) -> float:
    n = ascending.size
    total = float(ascending.sum())
    if total == 0.0:
        return 0.0
    weights = 2.0 * np.arange(1, n + 1) - n - 1
    return float(weights @ ascending) / (n * total)


def gini(m: Any) -> float:
    """Gini coefficient of the pixel values: ``sum_i (2i - N - 1) x_(i) / (N sum x)``, x ascending, i from 1.

    0 for a uniform (or all-zero) map, ``1 - 1/N`` when one pixel holds all the mass.
    """
    a = _non_negative(_as_map(m, "map"), "map")
    return _gini_sorted(np.sort(a.ravel()))


# ---------------------------------------------------------------- everything at once


def map_flags(m: Any, *, topk_percent: float = 20.0) -> list[str]:
    """Degenerate-map flags: ``["all_zero"]`` (no mass), ``["constant"]`` (no structure), ``["sparse"]``
    (fewer positive pixels than the top ``topk_percent`` % set needs, so its top-k IoU is computed on the
    positive pixels it has) or ``[]``."""
    a = _as_map(m, "map")
    if not a.any():
        return ["all_zero"]
    if np.ptp(a) == 0.0:
        return ["constant"]
    positive = int(np.count_nonzero(a > 0.0))
    return ["sparse"] if positive < _topk_count(a.size, topk_percent) else []


# The float entries of compare_maps() (it also returns "iou_k"), in the order of docs/DESIGN.md section 3.
SCALAR_METRICS: tuple[str, ...] = (
    "iou",
    "dice",
    "soft_iou",
    "pearson",
    "spearman",
    "ssim",
    "centroid_shift",
    "peak_shift",
    "zone_shift",
    "emd",
    "entropy_change",
    "gini_change",
)


def compare_maps(
    p: Any,
    q: Any,
    *,
    p_native: Any,
    q_native: Any,
    topk: float = 20.0,
    k_grid: Sequence[float] = DEFAULT_K_GRID,
    lung_mask: Any = None,
    p_raw: Any = None,
    q_raw: Any = None,
) -> dict[str, Any]:
    """Every drift metric between the transfer map ``p`` and the fine-tuned map ``q`` (same grid), with the
    EMD on the native CAM grid (``p_native``, ``q_native``).

    Keys: ``iou`` (top-``topk``% IoU), ``dice``, ``soft_iou``, ``pearson``, ``spearman``, ``ssim``,
    ``centroid_shift``, ``peak_shift``, ``zone_shift``, ``emd``, ``entropy_change`` (H(Q) - H(P), normalized
    entropy), ``gini_change`` (Gini(Q) - Gini(P)), and ``iou_k``: ``{"5": IoU at 5%, ...}`` over ``k_grid``.
    All floats; see each function for its formula and range.

    Concentration (entropy, Gini) is a property of the attribution *distribution*: with ``p_raw``/``q_raw``
    (the ReLU'd maps before any min-max normalisation) it is computed on those, normalised by their sum.
    Min-max normalisation subtracts each map's minimum, which changes a map's concentration and can flip the
    sign of the change; without the raw maps the displayed maps are used.
    """
    a, b = _as_pair(p, q)
    _non_negative(a, "p"), _non_negative(b, "q")
    pn, qn = _as_pair(p_native, q_native, ("p_native", "q_native"))
    if (p_raw is None) != (q_raw is None):
        raise ValueError("p_raw and q_raw go together: pass both raw maps or neither")
    concentration_a, concentration_b = (a, b) if p_raw is None else _as_pair(p_raw, q_raw, ("p_raw", "q_raw"))
    sa, sb = _Sorted.of(a), _Sorted.of(b)
    grid = _iou_grid(sa, sb, sorted({float(topk), *map(float, k_grid)}))
    iou = grid[float(topk)]
    if np.ptp(a) == 0.0 or np.ptp(b) == 0.0:
        rank_corr = _correlation(a.ravel(), b.ravel())
    else:
        rank_corr = _correlation(sa.average_ranks(), sb.average_ranks())
    return {
        "iou": iou,
        "dice": dice_from_iou(iou),
        "soft_iou": soft_iou(a, b),
        "pearson": _correlation(a.ravel(), b.ravel()),
        "spearman": rank_corr,
        "ssim": ssim(a, b),
        "centroid_shift": _shift(centroid(a), centroid(b), a.shape),
        "peak_shift": _shift(
            _peak_from_sorted(sa, PEAK_PERCENT), _peak_from_sorted(sb, PEAK_PERCENT), a.shape
        ),
        "zone_shift": js_divergence(zone_masses(a, lung_mask=lung_mask), zone_masses(b, lung_mask=lung_mask)),
        "emd": emd(pn, qn),
        "entropy_change": normalized_entropy(concentration_b) - normalized_entropy(concentration_a),
        "gini_change": gini(concentration_b) - gini(concentration_a),
        "iou_k": {_key(k): grid[float(k)] for k in k_grid},
    }


def _key(percent: float) -> str:
    return str(int(percent)) if float(percent).is_integer() else str(float(percent))
