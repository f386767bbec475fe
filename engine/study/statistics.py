"""Statistics of an offline drift study: descriptive statistics with bootstrap intervals, paired tests between
architectures, and the architecture ranking per method with its Kendall tau (the paper's "ranking
reversal", computed by :mod:`engine.ranking`). NumPy/SciPy only; no plotting, no web stack, no torch.

Input of :func:`summarize` is the study's long table: one row (a mapping) per model x method x image with
the keys ``model``, ``method``, ``image``, ``label`` (class name) and one number per metric. Missing
values (``None``, NaN, empty) are left out per metric, so a column that only exists for some images (the
evidence on the lesion, undefined for ``normal`` images) aggregates over the images that have it.

Conventions, so that every result is defined and JSON-safe (``None`` where a number does not exist):

- descriptive statistics: ``n``, ``mean``, ``sd`` (ddof=1; ``None`` for n < 2), ``median``, ``q1``/``q3``
  (NumPy's linear percentiles), ``iqr``, and a percentile-bootstrap ``ci_low``/``ci_high`` of the mean
  (``n_boot`` resamples with replacement, seeded per group, so a rerun gives the same interval);
- paired Wilcoxon signed-rank test (``scipy.stats.wilcoxon``, two-sided, zero differences dropped as in
  scipy's default ``zero_method="wilcox"``): all-zero differences give ``statistic = 0``, ``p = 1`` and a
  note; no pairs give ``None`` and a note; fewer than :data:`MIN_PAIRS_FOR_005` non-zero differences get a
  note (the exact test cannot reach p < 0.05). P-values are Holm-adjusted within each method;
- ranking: architectures by the mean of ``rank_metric`` (default top-k IoU; higher = more stable), ties by
  name; Kendall's tau-b between two methods' means over the architectures both rank
  (``scipy.stats.kendalltau``); tau < 1 means at least one pair of architectures swaps order.
"""

from __future__ import annotations

import itertools
import math
import zlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats

from engine.metrics import SCALAR_METRICS
from engine.ranking import finite_means, kendall_tau, rank_models
from engine.study.lesion import LESION_PAIRS

__all__ = [
    "ALL_CLASSES",
    "DEFAULT_STUDY_METRICS",
    "MIN_PAIRS_FOR_005",
    "bootstrap_ci",
    "describe",
    "holm_adjust",
    "paired_wilcoxon",
    "summarize",
]

# The drift report's scalar metrics (engine.metrics.compare_maps) and the drift score.
DEFAULT_STUDY_METRICS: tuple[str, ...] = (*SCALAR_METRICS, "drift_score")
# Smallest number of non-zero paired differences whose exact two-sided Wilcoxon p can be < 0.05 (2/2^6).
MIN_PAIRS_FOR_005 = 6
# The "class" of the groups that pool every class.
ALL_CLASSES = "all"


# ------------------------------------------------------------------------------------ descriptive stats


def _finite(values: Iterable[Any]) -> np.ndarray:
    out = []
    for v in values:
        if v is None or v == "":
            continue
        f = float(v)
        if math.isfinite(f):
            out.append(f)
    return np.asarray(out, dtype=np.float64)


def _seed_for(seed: int, key: str) -> np.random.SeedSequence:
    """A seed per group that depends on the group, not on the order groups are visited in."""
    return np.random.SeedSequence([int(seed), zlib.crc32(key.encode("utf-8"))])


def bootstrap_ci(
    values: Any,
    *,
    n_boot: int = 2000,
    seed: int | np.random.SeedSequence = 0,
    confidence: float = 0.95,
    chunk: int = 1 << 22,
) -> tuple[float | None, float | None]:
    """Percentile-bootstrap confidence interval of the mean of ``values`` (non-finite values dropped).

    ``n_boot`` resamples of size n with replacement; the interval is the ``(1 - confidence) / 2`` and
    ``(1 + confidence) / 2`` quantiles of the resampled means. One value gives ``(x, x)``, none
    ``(None, None)``. Resamples are drawn in chunks of at most ``chunk`` indices, so memory stays bounded.
    """
    x = _finite(np.ravel(np.asarray(values, dtype=object)))
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if x.size == 0:
        return None, None
    if x.size == 1:
        return float(x[0]), float(x[0])
    rng = np.random.default_rng(seed)
    rows = max(1, chunk // x.size)
    means = np.empty(n_boot)
    for start in range(0, n_boot, rows):
        stop = min(n_boot, start + rows)
        means[start:stop] = x[rng.integers(0, x.size, size=(stop - start, x.size))].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(low), float(high)


def describe(
    values: Any,
    *,
    n_boot: int = 2000,
    seed: int | np.random.SeedSequence = 0,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """``n, mean, sd, median, q1, q3, iqr, ci_low, ci_high`` of the finite values (see the module docstring)."""
    x = _finite(np.ravel(np.asarray(values, dtype=object)))
    if x.size == 0:
        return {"n": 0, **dict.fromkeys(("mean", "sd", "median", "q1", "q3", "iqr", "ci_low", "ci_high"))}
    q1, median, q3 = (float(v) for v in np.percentile(x, [25, 50, 75]))
    low, high = bootstrap_ci(x, n_boot=n_boot, seed=seed, confidence=confidence)
    return {
        "n": int(x.size),
        "mean": float(x.mean()),
        "sd": float(x.std(ddof=1)) if x.size > 1 else None,
        "median": median,
        "q1": q1,
        "q3": q3,
        "iqr": q3 - q1,
        "ci_low": low,
        "ci_high": high,
    }


# ------------------------------------------------------------------------------------ tests and rankings


def paired_wilcoxon(x: Any, y: Any) -> dict[str, Any]:
    """Two-sided Wilcoxon signed-rank test of ``x - y`` over pairs where both values are finite.

    Returns ``n_pairs``, ``n_nonzero``, ``statistic`` and ``p_value`` (``scipy.stats.wilcoxon(x, y)``),
    ``mean_difference`` and ``median_difference`` (of x - y), the matched-pairs rank-biserial correlation
    ``effect_size`` = (R+ - R-) / (R+ + R-) over the non-zero differences (in [-1, 1], positive when x
    tends to exceed y), and a ``note`` ("" when nothing needs saying).
    """
    a = np.asarray(x, dtype=np.float64).ravel()
    b = np.asarray(y, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired samples must have the same length, got {a.size} and {b.size}")
    keep = np.isfinite(a) & np.isfinite(b)
    d = a[keep] - b[keep]
    nonzero = d[d != 0]
    out: dict[str, Any] = {
        "n_pairs": int(d.size),
        "n_nonzero": int(nonzero.size),
        "statistic": None,
        "p_value": None,
        "mean_difference": float(d.mean()) if d.size else None,
        "median_difference": float(np.median(d)) if d.size else None,
        "effect_size": None,
        "note": "",
    }
    if d.size == 0:
        out["note"] = "no paired values"
        return out
    if nonzero.size == 0:
        out.update(statistic=0.0, p_value=1.0, effect_size=0.0, note="all paired differences are zero")
        return out
    ranks = stats.rankdata(np.abs(nonzero))
    r_plus, r_minus = float(ranks[nonzero > 0].sum()), float(ranks[nonzero < 0].sum())
    out["effect_size"] = (r_plus - r_minus) / (r_plus + r_minus)
    result = stats.wilcoxon(a[keep], b[keep])
    out["statistic"] = float(result.statistic)
    out["p_value"] = float(result.pvalue)
    if nonzero.size < MIN_PAIRS_FOR_005:
        out["note"] = f"only {nonzero.size} non-zero difference(s): p cannot fall below 0.05"
    return out


def holm_adjust(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm-Bonferroni adjusted p-values (``None`` entries are skipped and stay ``None``)."""
    present = [(i, float(p)) for i, p in enumerate(p_values) if p is not None]
    m = len(present)
    adjusted: list[float | None] = [None] * len(p_values)
    running = 0.0
    for position, (i, p) in enumerate(sorted(present, key=lambda t: (t[1], t[0]))):
        running = max(running, min(1.0, (m - position) * p))
        adjusted[i] = running
    return adjusted


# ------------------------------------------------------------------------------------ summary


def _group_rows(
    rows: Sequence[Mapping[str, Any]], *keys: str
) -> dict[tuple[Any, ...], list[Mapping[str, Any]]]:
    groups: dict[tuple[Any, ...], list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    return groups


def _value(row: Mapping[str, Any], column: str) -> float:
    v = row.get(column)
    if v is None or v == "":
        return math.nan
    return float(v)


def summarize(
    rows: Sequence[Mapping[str, Any]],
    *,
    metrics: Sequence[str] = DEFAULT_STUDY_METRICS,
    n_boot: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
    by_class: bool = True,
    rank_metric: str = "iou",
    higher_is_better: bool = True,
    lesion_pairs: Sequence[tuple[str, str]] = LESION_PAIRS,
) -> dict[str, Any]:
    """Aggregate the study's long table (see the module docstring) into a JSON-safe summary.

    Keys: ``config``; ``groups`` (one entry per model x method x class, class ``"all"`` first, each with
    :func:`describe` per metric); ``paired_tests`` (per method and metric, every pair of architectures on
    the images both have, :func:`paired_wilcoxon` + Holm-adjusted ``p_holm`` within the method);
    ``rankings`` (per method: architectures by mean ``rank_metric``, and :func:`kendall_tau` between every
    two methods with each architecture's relative change of the mean); ``lesion_tests`` (per model x
    method: fine-tuned vs transfer evidence on the lesion, for the ``lesion_pairs`` columns present).
    """
    for required in ("model", "method", "image", "label"):
        if rows and required not in rows[0]:
            raise ValueError(f"study rows need a {required!r} column; got {sorted(rows[0])}")
    models = sorted({str(r["model"]) for r in rows})
    methods = list(dict.fromkeys(str(r["method"]) for r in rows))
    classes = sorted({str(r["label"]) for r in rows})
    columns = set().union(*(r.keys() for r in rows)) if rows else set()
    present_metrics = [m for m in metrics if m in columns]

    def stats_of(group: Sequence[Mapping[str, Any]], key: str) -> dict[str, Any]:
        return {
            metric: describe(
                [_value(r, metric) for r in group],
                n_boot=n_boot,
                seed=_seed_for(seed, f"{key}|{metric}"),
                confidence=confidence,
            )
            for metric in present_metrics
        }

    groups: list[dict[str, Any]] = []
    by_model_method = _group_rows(rows, "model", "method")
    by_model_method_class = _group_rows(rows, "model", "method", "label")
    for method in methods:
        for model in models:
            group = by_model_method.get((model, method), [])
            if not group:
                continue
            groups.append(
                {
                    "model": model,
                    "method": method,
                    "class": ALL_CLASSES,
                    "n_images": len(group),
                    "metrics": stats_of(group, f"{model}|{method}|{ALL_CLASSES}"),
                }
            )
            for cls in classes if by_class else []:
                sub = by_model_method_class.get((model, method, cls), [])
                if sub:
                    groups.append(
                        {
                            "model": model,
                            "method": method,
                            "class": cls,
                            "n_images": len(sub),
                            "metrics": stats_of(sub, f"{model}|{method}|{cls}"),
                        }
                    )

    paired: list[dict[str, Any]] = []
    for method in methods:
        start = len(paired)
        for model_a, model_b in itertools.combinations(models, 2):
            rows_a = {r["image"]: r for r in by_model_method.get((model_a, method), [])}
            rows_b = {r["image"]: r for r in by_model_method.get((model_b, method), [])}
            common = sorted(set(rows_a) & set(rows_b), key=str)
            for metric in present_metrics:
                test = paired_wilcoxon(
                    [_value(rows_a[i], metric) for i in common], [_value(rows_b[i], metric) for i in common]
                )
                paired.append(
                    {"method": method, "metric": metric, "model_a": model_a, "model_b": model_b, **test}
                )
        for entry, p in zip(paired[start:], holm_adjust([e["p_value"] for e in paired[start:]]), strict=True):
            entry["p_holm"] = p

    means = {
        (g["model"], g["method"]): g["metrics"].get(rank_metric, {}).get("mean")
        for g in groups
        if g["class"] == ALL_CLASSES
    }
    per_method = {}
    for method in methods:
        method_means = {model: means.get((model, method)) for model in models}
        order = rank_models(method_means, higher_is_better=higher_is_better)
        per_method[method] = [
            {"rank": i + 1, "model": model, "mean": method_means[model]} for i, model in enumerate(order)
        ]
    comparisons = []
    for method_a, method_b in itertools.combinations(methods, 2):
        a = {model: means.get((model, method_a)) for model in models}
        b = {model: means.get((model, method_b)) for model in models}
        fa, fb = finite_means(a), finite_means(b)
        change = {
            model: (fb[model] - fa[model]) / fa[model] if fa.get(model) and model in fb else None
            for model in models
        }
        top_a = per_method[method_a][0]["model"] if per_method[method_a] else None
        top_b = per_method[method_b][0]["model"] if per_method[method_b] else None
        comparisons.append(
            {
                "method_a": method_a,
                "method_b": method_b,
                **kendall_tau(a, b),
                "top_a": top_a,
                "top_b": top_b,
                "top_changes": top_a is not None and top_b is not None and top_a != top_b,
                "relative_change": change,
            }
        )

    lesion_tests = []
    for (model, method), group in sorted(by_model_method.items()):
        for before, after in lesion_pairs:
            if before not in columns or after not in columns:
                continue
            test = paired_wilcoxon([_value(r, after) for r in group], [_value(r, before) for r in group])
            if test["n_pairs"] == 0:
                continue
            lesion_tests.append(
                {"model": model, "method": method, "finetuned": after, "transfer": before, **test}
            )

    return {
        "config": {
            "metrics": present_metrics,
            "n_boot": int(n_boot),
            "seed": int(seed),
            "confidence": float(confidence),
            "ci": "percentile bootstrap of the mean",
            "paired_test": "two-sided Wilcoxon signed-rank (scipy.stats.wilcoxon, zero differences dropped); "
            "p_holm: Holm-adjusted within each method",
            "rank_metric": rank_metric,
            "rank_order": "descending (higher = more stable)" if higher_is_better else "ascending",
        },
        "models": models,
        "methods": methods,
        "classes": classes,
        "groups": groups,
        "paired_tests": paired,
        "rankings": {"metric": rank_metric, "methods": per_method, "comparisons": comparisons},
        "lesion_tests": lesion_tests,
    }
