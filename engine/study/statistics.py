"""Statistics of an offline drift study: descriptive statistics with bootstrap intervals, paired tests between
architectures, and the architecture ranking per method with the test of its reversal between methods (the
paper's "ranking reversal", :func:`engine.ranking.reversal_test`). NumPy/SciPy only; no plotting, no web
stack, no torch.

Input of :func:`summarize` is the study's long table: one row (a mapping) per model x method x image with
the keys ``model``, ``method``, ``image``, ``label`` (class name) and one number per metric. Missing
values (``None``, NaN, empty) are left out per metric, so a column that only exists for some images (the
evidence on the lesion, undefined for ``normal`` images) aggregates over the images that have it.

Conventions, so that every result is defined and JSON-safe (``None`` where a number does not exist):

- descriptive statistics: ``n``, ``mean``, ``sd`` (ddof=1; ``None`` for n < 2), ``median``, ``q1``/``q3``
  (NumPy's linear percentiles), ``iqr``, and a BCa bootstrap ``ci_low``/``ci_high`` of the mean (``n_boot``
  resamples with replacement, seeded per group, so a rerun gives the same interval); ``None`` for groups
  under :data:`MIN_N_FOR_CI` values, where bootstrap intervals under-cover;
- paired Wilcoxon signed-rank test (``scipy.stats.wilcoxon``, two-sided, zero differences dropped as in
  scipy's default ``zero_method="wilcox"``): all-zero differences give ``statistic = 0``, ``p = 1`` and a
  note; no pairs give ``None`` and a note; fewer than :data:`MIN_PAIRS_FOR_005` non-zero differences get a
  note (the exact test cannot reach p < 0.05). Multiplicity: within each method, the tests of the
  pre-declared :data:`PRIMARY_METRICS` over every pair of architectures are one Holm family (``p_holm``,
  ``family = "primary"``); every other metric is descriptive (``family = "descriptive"``, unadjusted p only,
  ``p_holm = None``); ``drift_score`` (= 1 - IoU) is never in a family;
- ranking (:func:`ranking_section`): on the **common image set** (images with a ``rank_metric`` value for
  every architecture under every method), architectures by their mean (higher = more stable), ties by name;
  per pair of methods :func:`engine.ranking.reversal_test`: the per-image interaction tests (Wilcoxon, Holm
  over architecture pairs), the joint bootstrap over images, the verdict ``reversal`` (orders differ AND a
  Holm-adjusted interaction p < alpha) next to ``reversal_descriptive`` (orders differ) and Kendall's tau
  (descriptive); repeated under the head-scale control when the table has its column
  (:data:`CONTROL_COLUMNS`).
"""

from __future__ import annotations

import itertools
import math
import zlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import special, stats

from engine.metrics import SCALAR_METRICS
from engine.ranking import DEFAULT_ALPHA, holm_adjust, method_tables, rank_models, reversal_test
from engine.study.lesion import LESION_PAIRS

__all__ = [
    "ALL_CLASSES",
    "CONTROL_COLUMNS",
    "CONTROL_METHOD",
    "DEFAULT_STUDY_METRICS",
    "MIN_N_FOR_CI",
    "MIN_PAIRS_FOR_005",
    "PRIMARY_METRICS",
    "bootstrap_ci",
    "describe",
    "holm_adjust",
    "paired_wilcoxon",
    "ranking_section",
    "summarize",
]

# The drift report's scalar metrics (engine.metrics.compare_maps) and the drift score.
DEFAULT_STUDY_METRICS: tuple[str, ...] = (*SCALAR_METRICS, "drift_score")
# Smallest number of non-zero paired differences whose exact two-sided Wilcoxon p can be < 0.05 (2/2^6).
MIN_PAIRS_FOR_005 = 6
# Pre-declared primary metrics: the between-architecture tests of these (per method, every pair) form the
# Holm family; every other metric is descriptive (unadjusted p). ``drift_score`` = 1 - IoU duplicates IoU
# and never enters a family.
PRIMARY_METRICS: tuple[str, ...] = ("iou", "pearson", "ssim", "centroid_shift")
# Smallest group with a bootstrap CI of the mean: below it, 95% intervals under-cover (BCa 0.86-0.90 and
# percentile 0.83-0.90 at n = 10 in simulation; bench/reversal_false_positive.py --ci-coverage).
MIN_N_FOR_CI = 15
# Per-image values of GradCAM++ under the head-scale control, if the study's table has them: the first of
# these columns present (``{metric}`` is the ranking metric) is used by :func:`summarize`.
CONTROL_COLUMNS: tuple[str, ...] = (
    "head_scale_control_{metric}",
    "gradcampp_head_scale_control_{metric}",
    "{metric}_head_scale_control",
)
CONTROL_METHOD = "gradcampp"
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
    min_n: int = MIN_N_FOR_CI,
) -> tuple[float | None, float | None]:
    """BCa bootstrap confidence interval of the mean of ``values`` (non-finite values dropped), as
    ``scipy.stats.bootstrap(..., method="BCa")`` computes it, with the jackknife acceleration in closed form
    for the mean: ``a = sum((x - mean)^3) / (6 (sum((x - mean)^2))^1.5)``.

    ``n_boot`` resamples of size n with replacement (drawn as scipy draws them, in chunks of at most
    ``chunk`` indices, so memory stays bounded); ``z0 = Phi^-1(share of resampled means below the mean, ties
    counting half)``; the interval is the resampled means' linear quantiles at
    ``Phi(z0 + (z0 + z) / (1 - a (z0 + z)))`` for ``z = Phi^-1((1 -+ confidence) / 2)``.

    Fewer than ``min_n`` values (default :data:`MIN_N_FOR_CI`) give ``(None, None)``: below n = 15 bootstrap
    intervals of a mean under-cover (BCa and percentile alike). All values equal give ``(x, x)``.
    """
    x = _finite(np.ravel(np.asarray(values, dtype=object)))
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if min_n < 2:
        raise ValueError(f"min_n must be >= 2, got {min_n}")
    if x.size < min_n:
        return None, None
    if np.ptp(x) == 0:
        return float(x[0]), float(x[0])
    rng = np.random.default_rng(seed)
    rows = max(1, chunk // x.size)
    means = np.empty(n_boot)
    for start in range(0, n_boot, rows):
        stop = min(n_boot, start + rows)
        means[start:stop] = x[rng.integers(0, x.size, size=(stop - start, x.size))].mean(axis=-1)
    theta = float(x.mean())
    z0 = special.ndtri((np.count_nonzero(means < theta) + np.count_nonzero(means <= theta)) / (2.0 * n_boot))
    centred = x - theta
    accel = float(np.sum(centred**3) / (6.0 * np.sum(centred**2) ** 1.5))
    z = special.ndtri((1.0 - confidence) / 2.0)
    levels = [special.ndtr(z0 + (z0 + zz) / (1.0 - accel * (z0 + zz))) for zz in (z, -z)]
    if not all(math.isfinite(float(level)) for level in levels):
        return None, None
    low, high = np.quantile(means, levels)
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


def _control_column(columns: Iterable[str], rank_metric: str, control_column: str | None) -> str | None:
    present = set(columns)
    if control_column is not None:
        return control_column if control_column in present else None
    for pattern in CONTROL_COLUMNS:
        name = pattern.format(metric=rank_metric)
        if name in present:
            return name
    return None


def ranking_section(
    rows: Sequence[Mapping[str, Any]],
    *,
    rank_metric: str = "iou",
    higher_is_better: bool = True,
    n_boot: int = 2000,
    seed: int = 0,
    alpha: float = DEFAULT_ALPHA,
    control_column: str | None = None,
    control_method: str = CONTROL_METHOD,
) -> dict[str, Any]:
    """The ``rankings`` block of :func:`summarize` from the long table (see the module docstring).

    ``metric``, ``models`` (architectures with values under every method), ``n_images`` (the common image
    set over every method), ``methods`` (per method ``rank``, ``model``, ``mean`` on that set), ``note``,
    and ``comparisons``: per pair of methods ``method_a``, ``method_b``, :func:`engine.ranking.reversal_test`
    (on the pair's common image set, identical to ``n_images``'s with two methods) and ``relative_change``
    (per architecture, (mean_b - mean_a) / mean_a). ``control`` in a comparison: the same test with the
    ``control_method``'s values replaced by the ``control_column``'s (``column`` and ``replaces`` say which;
    ``None`` when the column is not given or not in the table).
    """
    methods = list(dict.fromkeys(str(r["method"]) for r in rows))
    tables = method_tables((r["image"], r["model"], r["method"], _value(r, rank_metric)) for r in rows)
    for method in methods:
        tables.setdefault(method, {})
    columns = set().union(*(r.keys() for r in rows)) if rows else set()
    control_name = control_column if control_column in columns else None
    control = None
    if control_name is not None and control_method in methods:
        control = method_tables(
            (r["image"], r["model"], r["method"], _value(r, control_name))
            for r in rows
            if str(r["method"]) == control_method
        ).get(control_method)

    per_model = [{m for values in tables[method].values() for m in values} for method in methods]
    models = sorted(set.intersection(*per_model)) if per_model else []
    images = set.intersection(*(set(tables[method]) for method in methods)) if methods else set()
    common = [i for i in images if all(m in tables[method][i] for method in methods for m in models)]
    per_method: dict[str, list[dict[str, Any]]] = {}
    for method in methods:
        means = {m: float(np.mean([tables[method][i][m] for i in common])) for m in models} if common else {}
        order = rank_models(means, higher_is_better=higher_is_better)
        per_method[method] = [
            {"rank": i + 1, "model": model, "mean": means[model]} for i, model in enumerate(order)
        ]
    left_out = sorted(set().union(*per_model) - set(models)) if per_model else []
    note = (
        f"architectures without values under every method left out: {', '.join(left_out)}" if left_out else ""
    )

    comparisons = []
    for method_a, method_b in itertools.combinations(methods, 2):
        options: dict[str, Any] = {
            "n_boot": n_boot,
            "seed": seed,
            "alpha": alpha,
            "higher_is_better": higher_is_better,
        }
        test = reversal_test(
            tables[method_a],
            tables[method_b],
            control=control if method_b == control_method else None,
            **options,
        )
        if control is not None and method_a == control_method:
            test["control"] = reversal_test(control, tables[method_b], **options)
        if test["control"] is not None:
            test["control"] = {"column": control_name, "replaces": control_method, **test["control"]}
        fa, fb = test["means_a"], test["means_b"]
        change = {
            model: (fb[model] - fa[model]) / fa[model] if fa[model] else None for model in test["models"]
        }
        comparisons.append({"method_a": method_a, "method_b": method_b, **test, "relative_change": change})
    return {
        "metric": rank_metric,
        "models": models,
        "n_images": len(common),
        "methods": per_method,
        "note": note,
        "comparisons": comparisons,
    }


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
    primary_metrics: Sequence[str] = PRIMARY_METRICS,
    alpha: float = DEFAULT_ALPHA,
    control_column: str | None = None,
    control_method: str = CONTROL_METHOD,
) -> dict[str, Any]:
    """Aggregate the study's long table (see the module docstring) into a JSON-safe summary.

    Keys: ``config``; ``groups`` (one entry per model x method x class, class ``"all"`` first, each with
    :func:`describe` per metric); ``paired_tests`` (per method and metric, every pair of architectures on
    the images both have, :func:`paired_wilcoxon`, ``family`` and ``p_holm``: Holm within the method over the
    ``primary_metrics``' tests, ``None`` for the descriptive metrics); ``rankings``
    (:func:`ranking_section`: the ranking on the common image set and the reversal test per pair of methods);
    ``lesion_tests`` (per model x method: fine-tuned vs transfer evidence on the lesion, for the
    ``lesion_pairs`` columns present).

    ``control_column``: the per-image column of the ``control_method`` under the head-scale control
    (``None``: the first of :data:`CONTROL_COLUMNS` present; no such column: no control test).
    """
    for required in ("model", "method", "image", "label"):
        if rows and required not in rows[0]:
            raise ValueError(f"study rows need a {required!r} column; got {sorted(rows[0])}")
    models = sorted({str(r["model"]) for r in rows})
    methods = list(dict.fromkeys(str(r["method"]) for r in rows))
    classes = sorted({str(r["label"]) for r in rows})
    columns = set().union(*(r.keys() for r in rows)) if rows else set()
    present_metrics = [m for m in metrics if m in columns]
    primary = [m for m in primary_metrics if m in present_metrics and m != "drift_score"]

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
                    {
                        "method": method,
                        "metric": metric,
                        "model_a": model_a,
                        "model_b": model_b,
                        "family": "primary" if metric in primary else "descriptive",
                        **test,
                        "p_holm": None,
                    }
                )
        family = [e for e in paired[start:] if e["family"] == "primary"]
        for entry, p in zip(family, holm_adjust([e["p_value"] for e in family]), strict=True):
            entry["p_holm"] = p

    control_name = _control_column(columns, rank_metric, control_column)
    rankings = ranking_section(
        rows,
        rank_metric=rank_metric,
        higher_is_better=higher_is_better,
        n_boot=n_boot,
        seed=seed,
        alpha=alpha,
        control_column=control_name,
        control_method=control_method,
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
            "ci": "BCa bootstrap of the mean",
            "min_n_for_ci": MIN_N_FOR_CI,
            "paired_test": "two-sided Wilcoxon signed-rank (scipy.stats.wilcoxon, zero differences dropped); "
            f"p (Holm): Holm-adjusted within each method over the primary metrics ({', '.join(primary)}) x "
            "architecture pairs; other metrics descriptive (unadjusted p; drift_score = 1 - IoU duplicates IoU)",
            "primary_metrics": primary,
            "rank_metric": rank_metric,
            "rank_order": "descending (higher = more stable)" if higher_is_better else "ascending",
            "alpha": float(alpha),
            "reversal": "on the common image set (every architecture under both methods): the orders of the "
            "means differ AND at least one per-image interaction "
            "d = (A - B under method a) - (A - B under method b) has a Holm-adjusted two-sided Wilcoxon "
            f"p < {alpha:g} (Holm over architecture pairs); reversal_descriptive = the orders differ; Kendall "
            "tau descriptive",
            "control_column": control_name,
            "control_method": control_method if control_name else None,
        },
        "models": models,
        "methods": methods,
        "classes": classes,
        "groups": groups,
        "paired_tests": paired,
        "rankings": rankings,
        "lesion_tests": lesion_tests,
    }
