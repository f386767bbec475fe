"""The architecture stability ranking and its reversal between methods: one definition for the study and
for ``GET /audit/summary``.

Architectures are ranked per method by a per-architecture mean (by default mean top-k IoU, higher = more
stable); ties are broken by name, so a ranking is deterministic.

**Descriptive** comparison (:func:`kendall_tau`): two methods' rankings compared with Kendall's tau-b over
the architectures ranked under both; ``reversed_pairs`` are the pairs ordered one way under one method and
the other way under the other. With three architectures tau can only be +-1 or +-1/3 and its p-value
cannot fall below 0.33: it is descriptive, and so is "the orders differ", which happens by chance alone
whenever two architectures' means are close (18-54% of the time in simulations with no interaction).

**Inferential** comparison (:func:`reversal_test`), from per-image values, one value per (image,
architecture, method):

1. the **common image set**: the images with a finite value for every compared architecture under both
   methods (an image missing for one architecture is left out for all), so every mean is over the same
   images;
2. per pair of architectures (A, B) and common image i, the **interaction**
   ``d_i = (x_a[i, A] - x_a[i, B]) - (x_b[i, A] - x_b[i, B])`` (how much the A - B gap changes from method
   a to method b); a two-sided Wilcoxon signed-rank test of d (``scipy.stats.wilcoxon``, zero differences
   dropped: scipy's ``zero_method="wilcox"``), Holm-adjusted over the architecture pairs;
3. a **joint bootstrap over images**: resample the common images with replacement, keeping all
   architectures x methods of an image together (seeded); ``p_order_differs`` is the share of resamples in
   which at least one pair of architectures is ordered one way under method a and the other way under
   method b, ``p_top_changes`` the share in which the most stable architecture differs;
4. the **verdict** ``reversal``: the orders of the means on the common set differ (``reversal_descriptive``)
   AND at least one Holm-adjusted interaction p-value is below ``alpha``. ``None`` (with a ``note``) for
   fewer than 2 architectures or fewer than :data:`MIN_COMMON_IMAGES` common images.

``control`` repeats the whole test with a second table in place of method b (the study passes GradCAM++
under the head-scale control when its per-image values exist).
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats

__all__ = [
    "DEFAULT_ALPHA",
    "DEFAULT_N_BOOT",
    "MIN_COMMON_IMAGES",
    "MethodTable",
    "common_images",
    "finite_means",
    "holm_adjust",
    "interaction_test",
    "kendall_tau",
    "method_tables",
    "rank_models",
    "reversal_test",
]

# Below this many common images the verdict is None: the exact two-sided Wilcoxon p of n non-zero
# differences is at least 2 / 2^n, which reaches 0.05 only from n = 6 (2/64 = 0.031).
MIN_COMMON_IMAGES = 6
DEFAULT_ALPHA = 0.05
DEFAULT_N_BOOT = 2000

# image id -> architecture -> value (one method)
MethodTable = Mapping[Hashable, Mapping[str, float | None]]


def _is_finite(value: Any) -> bool:
    if value is None or value == "":
        return False
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def finite_means(means: Mapping[str, float | None]) -> dict[str, float]:
    """``means`` without the ``None``/NaN/inf entries, as floats."""
    return {k: float(v) for k, v in means.items() if v is not None and math.isfinite(float(v))}


def rank_models(means: Mapping[str, float | None], *, higher_is_better: bool = True) -> list[str]:
    """Model names from most to least stable by their mean (``None``/NaN left out); ties by name."""
    valid = finite_means(means)
    sign = -1.0 if higher_is_better else 1.0
    return sorted(valid, key=lambda k: (sign * valid[k], k))


def holm_adjust(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm-Bonferroni adjusted p-values (``None`` entries are skipped and stay ``None``): with the m present
    p-values sorted ascending, ``p_(j) -> max_{i <= j} min(1, (m - i + 1) p_(i))``."""
    present = [(i, float(p)) for i, p in enumerate(p_values) if p is not None]
    m = len(present)
    adjusted: list[float | None] = [None] * len(p_values)
    running = 0.0
    for position, (i, p) in enumerate(sorted(present, key=lambda t: (t[1], t[0]))):
        running = max(running, min(1.0, (m - position) * p))
        adjusted[i] = running
    return adjusted


def kendall_tau(
    a: Mapping[str, float | None], b: Mapping[str, float | None], *, higher_is_better: bool = True
) -> dict[str, Any]:
    """Compare two methods' per-architecture means over the architectures both have (descriptive).

    Returns ``models`` (sorted), ``n``, ``order_a``/``order_b`` (:func:`rank_models` of each, restricted to
    ``models``), ``tau`` and ``p_value`` (``scipy.stats.kendalltau``'s; ``None`` with a ``note`` for fewer than
    2 architectures or when all means tie under one method), ``reversed_pairs`` (pairs ordered one way under
    ``a`` and the other under ``b``) and ``reversal`` (``reversed_pairs`` is not empty: the descriptive rule,
    see :func:`reversal_test` for the inferential one).
    """
    clean_a, clean_b = finite_means(a), finite_means(b)
    models = sorted(set(clean_a) & set(clean_b))
    va = np.array([clean_a[k] for k in models])
    vb = np.array([clean_b[k] for k in models])
    reversed_pairs = [
        [models[i], models[j]]
        for i, j in itertools.combinations(range(len(models)), 2)
        if (va[i] - va[j]) * (vb[i] - vb[j]) < 0
    ]
    out: dict[str, Any] = {
        "n": len(models),
        "models": models,
        "order_a": rank_models({m: clean_a[m] for m in models}, higher_is_better=higher_is_better),
        "order_b": rank_models({m: clean_b[m] for m in models}, higher_is_better=higher_is_better),
        "tau": None,
        "p_value": None,
        "reversed_pairs": reversed_pairs,
        "reversal": bool(reversed_pairs),
        "note": "",
    }
    if len(models) < 2:
        out["note"] = "needs at least 2 architectures ranked under both methods"
        return out
    if np.ptp(va) == 0 or np.ptp(vb) == 0:
        out["note"] = "all architectures tie under one method: tau is undefined"
        return out
    result = stats.kendalltau(va, vb)
    out["tau"] = float(result.statistic)
    out["p_value"] = float(result.pvalue) if math.isfinite(float(result.pvalue)) else None
    if len(models) < 4:
        out["note"] = f"{len(models)} architectures: the p-value cannot be small; read tau as descriptive"
    return out


# ------------------------------------------------------------------------------------ per-image tables


def method_tables(records: Iterable[Sequence[Any]]) -> dict[str, dict[Hashable, dict[str, float]]]:
    """``{method: {image: {architecture: value}}}`` from ``(image, architecture, method, value)`` records.

    Non-finite values (``None``, NaN, ``""``) are left out. The same (image, architecture, method) twice is
    a ``ValueError``: an image is one observation.
    """
    tables: dict[str, dict[Hashable, dict[str, float]]] = {}
    seen: set[tuple[Hashable, str, str]] = set()
    for image, model, method, value in records:
        key = (image, str(model), str(method))
        if key in seen:
            raise ValueError(
                f"duplicate value for image {image!r}, architecture {model!r}, method {method!r}"
            )
        seen.add(key)
        if _is_finite(value):
            tables.setdefault(str(method), {}).setdefault(image, {})[str(model)] = float(value)
    return tables


def _image_key(image: Hashable) -> tuple[int, Any]:
    if isinstance(image, numbers.Real) and not isinstance(image, bool):
        return (0, float(image))
    return (1, str(image))


def _models_of(table: MethodTable) -> set[str]:
    return {model for values in table.values() for model, v in values.items() if _is_finite(v)}


def common_images(a: MethodTable, b: MethodTable, models: Sequence[str]) -> list[Hashable]:
    """The images (sorted: numbers first, then by text) with a finite value for every one of ``models``
    under both ``a`` and ``b``."""
    out = [
        image
        for image in set(a) & set(b)
        if all(_is_finite(a[image].get(m)) and _is_finite(b[image].get(m)) for m in models)
    ]
    return sorted(out, key=_image_key)


# ------------------------------------------------------------------------------------ the inferential test


def interaction_test(d: Any) -> dict[str, Any]:
    """Two-sided Wilcoxon signed-rank test of the interactions ``d`` (``scipy.stats.wilcoxon(d)``: zero
    differences are dropped, scipy's default ``zero_method="wilcox"``).

    Returns ``n`` (values), ``n_zero`` (dropped), ``n_nonzero``, ``median_d``, ``mean_d``, ``statistic``,
    ``p_value`` and a ``note``. No values: ``None``s; all zero: ``statistic = 0``, ``p = 1``.
    """
    x = np.asarray(d, dtype=np.float64).ravel()
    nonzero = int(np.count_nonzero(x))
    out: dict[str, Any] = {
        "n": int(x.size),
        "n_zero": int(x.size - nonzero),
        "n_nonzero": nonzero,
        "median_d": float(np.median(x)) if x.size else None,
        "mean_d": float(x.mean()) if x.size else None,
        "statistic": None,
        "p_value": None,
        "note": "",
    }
    if x.size == 0:
        out["note"] = "no common images"
        return out
    if nonzero == 0:
        out.update(statistic=0.0, p_value=1.0, note="all interactions are zero")
        return out
    result = stats.wilcoxon(x)
    p = float(result.pvalue)
    out["statistic"] = float(result.statistic)
    out["p_value"] = p if math.isfinite(p) else None
    notes = []
    if out["n_zero"]:
        notes.append(f"{out['n_zero']} zero interaction(s) dropped")
    if nonzero < MIN_COMMON_IMAGES:
        notes.append(f"only {nonzero} non-zero interaction(s): p cannot fall below 0.05")
    out["note"] = "; ".join(notes)
    return out


def _discordant(ma: np.ndarray, mb: np.ndarray, pairs: Sequence[tuple[int, int]]) -> np.ndarray:
    """Per row (resample), per pair: ordered one way under a, the other way under b (strictly)."""
    i = np.array([p[0] for p in pairs])
    j = np.array([p[1] for p in pairs])
    return np.asarray(((ma[:, i] - ma[:, j]) * (mb[:, i] - mb[:, j])) < 0)


def _top(means: np.ndarray, higher_is_better: bool) -> np.ndarray:
    """Index of the most stable architecture per row; ties go to the first (models are sorted by name)."""
    return np.asarray(np.argmax(means, axis=1) if higher_is_better else np.argmin(means, axis=1))


def _bootstrap(
    xa: np.ndarray,
    xb: np.ndarray,
    *,
    n_boot: int,
    seed: int | np.random.SeedSequence,
    higher_is_better: bool,
    chunk: int = 1 << 22,
) -> tuple[float, float, list[float]]:
    """P(orders differ), P(top changes) and per pair P(swapped) over ``n_boot`` resamples of the rows
    (images) of ``xa``/``xb`` (images x architectures), one index vector per resample for both."""
    n, k = xa.shape
    pairs = list(itertools.combinations(range(k), 2))
    rng = np.random.default_rng(seed)
    rows = max(1, chunk // (n * k))
    differs = top = 0
    swapped = np.zeros(len(pairs))
    for start in range(0, n_boot, rows):
        size = min(n_boot, start + rows) - start
        idx = rng.integers(0, n, size=(size, n))
        # each resample as how often it draws each row: the resampled means of every column are then one
        # matrix product (the same draws and means as indexing x[idx], up to floating-point summation order)
        counts = np.bincount((idx + n * np.arange(size)[:, None]).ravel(), minlength=size * n)
        weights = counts.reshape(size, n).astype(np.float64)
        ma, mb = (weights @ xa) / n, (weights @ xb) / n
        disc = _discordant(ma, mb, pairs)
        differs += int(disc.any(axis=1).sum())
        swapped += disc.sum(axis=0)
        top += int((_top(ma, higher_is_better) != _top(mb, higher_is_better)).sum())
    return differs / n_boot, top / n_boot, [float(s) / n_boot for s in swapped]


def reversal_test(
    a: MethodTable,
    b: MethodTable,
    *,
    models: Sequence[str] | None = None,
    control: MethodTable | None = None,
    n_boot: int = DEFAULT_N_BOOT,
    seed: int | np.random.SeedSequence = 0,
    alpha: float = DEFAULT_ALPHA,
    higher_is_better: bool = True,
    min_images: int = MIN_COMMON_IMAGES,
) -> dict[str, Any]:
    """Does the architecture ranking reverse from method ``a`` to method ``b``? (See the module docstring.)

    ``a``, ``b``: per-image tables of one method each (:data:`MethodTable`, e.g. from
    :func:`method_tables`). ``models``: the architectures to compare (default: every architecture with a
    value under both methods; the others are named in ``models_left_out``). ``control``: a table to use in
    place of ``b`` for a second, identical test (``control`` in the result; ``None`` when not given).

    Returns (JSON-safe):

    - ``models``, ``n`` (architectures), ``n_images`` (common images), ``n_images_left_out`` (images with
      some value that are not in the common set), ``models_left_out``;
    - on the common set: ``means_a``/``means_b``, ``order_a``/``order_b``, ``top_a``/``top_b``/
      ``top_changes``, ``tau``/``p_value``/``reversed_pairs`` (:func:`kendall_tau`, descriptive) and
      ``reversal_descriptive`` (the orders differ: at least one reversed pair);
    - ``interaction_tests``: per pair ``model_a``/``model_b``, :func:`interaction_test`'s fields, ``p_holm``
      (Holm over the pairs) and ``p_boot_swapped`` (share of resamples with that pair swapped);
    - ``bootstrap``: ``n_boot``, ``seed``, ``p_order_differs``, ``p_top_changes`` (``None`` below 2 images);
    - ``alpha``, ``significant_pairs`` (pairs with ``p_holm < alpha``), ``reversal`` (the verdict: bool, or
      ``None`` with a ``note`` when it cannot be given), ``note``, ``control``.
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    present_a, present_b = _models_of(a), _models_of(b)
    if models is None:
        compared = sorted(present_a & present_b)
    else:
        compared = sorted(m for m in set(models) if m in present_a and m in present_b)
    left_out = sorted((present_a | present_b) - set(compared))
    images = common_images(a, b, compared) if compared else []
    all_images = {i for i, v in a.items() if any(_is_finite(x) for x in v.values())}
    all_images |= {i for i, v in b.items() if any(_is_finite(x) for x in v.values())}
    xa = np.array([[a[i][m] for m in compared] for i in images], dtype=np.float64)
    xb = np.array([[b[i][m] for m in compared] for i in images], dtype=np.float64)
    xa, xb = xa.reshape(len(images), len(compared)), xb.reshape(len(images), len(compared))
    means_a = {m: float(xa[:, c].mean()) for c, m in enumerate(compared)} if images else {}
    means_b = {m: float(xb[:, c].mean()) for c, m in enumerate(compared)} if images else {}
    tau = kendall_tau(means_a, means_b, higher_is_better=higher_is_better)
    order_a, order_b = tau["order_a"], tau["order_b"]
    top_a = order_a[0] if order_a else None
    top_b = order_b[0] if order_b else None

    pairs = list(itertools.combinations(range(len(compared)), 2))
    tests = []
    for i, j in pairs:
        d = (xa[:, i] - xa[:, j]) - (xb[:, i] - xb[:, j])
        tests.append({"model_a": compared[i], "model_b": compared[j], **interaction_test(d)})
    for test, p in zip(tests, holm_adjust([t["p_value"] for t in tests]), strict=True):
        test["p_holm"] = p
        test["p_boot_swapped"] = None

    boot: dict[str, Any] = {"n_boot": int(n_boot), "seed": _seed_repr(seed)}
    boot.update(p_order_differs=None, p_top_changes=None)
    if len(images) >= 2 and len(compared) >= 2:
        p_differs, p_top, p_swapped = _bootstrap(
            xa, xb, n_boot=n_boot, seed=seed, higher_is_better=higher_is_better
        )
        boot.update(p_order_differs=p_differs, p_top_changes=p_top)
        for test, p in zip(tests, p_swapped, strict=True):
            test["p_boot_swapped"] = p

    significant = [
        [t["model_a"], t["model_b"]] for t in tests if t["p_holm"] is not None and t["p_holm"] < alpha
    ]
    descriptive = bool(tau["reversed_pairs"])
    verdict: bool | None
    notes = []
    if len(compared) < 2:
        verdict = None
        notes.append("needs at least 2 architectures with values under both methods")
    elif len(images) < min_images:
        verdict = None
        notes.append(
            f"{len(images)} common image(s) (every architecture under both methods); the verdict needs at "
            f"least {min_images}"
        )
    else:
        verdict = descriptive and bool(significant)
    if left_out:
        notes.append(f"architectures without values under both methods left out: {', '.join(left_out)}")
    if images and tau["note"]:
        notes.append(tau["note"])
    out: dict[str, Any] = {
        "models": compared,
        "n": len(compared),
        "n_images": len(images),
        "n_images_left_out": len(all_images) - len(images),
        "models_left_out": left_out,
        "means_a": means_a,
        "means_b": means_b,
        "order_a": order_a,
        "order_b": order_b,
        "top_a": top_a,
        "top_b": top_b,
        "top_changes": top_a is not None and top_b is not None and top_a != top_b,
        "tau": tau["tau"],
        "p_value": tau["p_value"],
        "reversed_pairs": tau["reversed_pairs"],
        "reversal_descriptive": descriptive,
        "interaction_tests": tests,
        "bootstrap": boot,
        "alpha": float(alpha),
        "significant_pairs": significant,
        "reversal": verdict,
        "note": "; ".join(notes),
        "control": None,
    }
    if control is not None:
        out["control"] = reversal_test(
            a,
            control,
            models=models,
            n_boot=n_boot,
            seed=seed,
            alpha=alpha,
            higher_is_better=higher_is_better,
            min_images=min_images,
        )
    return out


def _seed_repr(seed: int | np.random.SeedSequence) -> Any:
    if isinstance(seed, np.random.SeedSequence):
        entropy = seed.entropy
        return [int(e) for e in entropy] if isinstance(entropy, Sequence) else int(entropy or 0)
    return int(seed)
