"""Statistics of an offline drift study (``cxr-drift study``): evidence on the lesion, descriptive statistics
with bootstrap intervals, paired tests between architectures, and the architecture ranking per method with
its Kendall tau (the paper's "ranking reversal"). NumPy/SciPy only; no plotting, no web stack, no torch.

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

__all__ = [
    "DEFAULT_STUDY_METRICS",
    "LESION_COLUMNS",
    "MIN_PAIRS_FOR_005",
    "bootstrap_ci",
    "describe",
    "evidence_on_lesion",
    "holm_adjust",
    "paired_wilcoxon",
    "render_markdown",
    "summarize",
]

# The drift report's scalar metrics (engine.metrics.compare_maps) and the drift score.
DEFAULT_STUDY_METRICS: tuple[str, ...] = (*SCALAR_METRICS, "drift_score")
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
# Smallest number of non-zero paired differences whose exact two-sided Wilcoxon p can be < 0.05 (2/2^6).
MIN_PAIRS_FOR_005 = 6
ALL_CLASSES = "all"


# ------------------------------------------------------------------------------------ evidence on lesion


def evidence_on_lesion(attribution: Any, lesion_mask: Any, *, topk_percent: float = 20.0) -> dict[str, Any]:
    """How much of an attribution map lies on the ground-truth lesion.

    ``attribution`` (H, W) non-negative; ``lesion_mask`` (H, W) in [0, 1] on the same grid (binary, or the
    soft mask a resize gives: each pixel's lesion fraction). With ``T`` the ``topk_percent`` % highest pixels
    (``max(1, round(H W k / 100))`` of them; ties by flat index, as the drift metrics), ``A`` the map, ``M``
    the mask:

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
    k = max(1, min(flat.size, round(flat.size * topk_percent / 100.0)))
    top = np.argsort(-flat, kind="stable")[:k]
    return {
        "topk_in_lesion": float(mask[top].mean()),
        "mass_in_lesion": float(np.clip((flat * mask).sum() / total, 0.0, 1.0)),
        "lesion_area": area,
        "all_zero": False,
    }


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


# ------------------------------------------------------------------------------------ markdown


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return "-"
        if v != 0 and abs(v) < 10 ** (-digits):
            return f"{v:.1e}"
        return f"{v:.{digits}f}"
    return str(v)


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(c) if not isinstance(c, str) else c for c in row) + " |" for row in rows]
    return [*lines, ""]


def _mean_ci(s: Mapping[str, Any]) -> str:
    if not s or not s.get("n"):
        return "-"
    return f"{_fmt(s['mean'])} [{_fmt(s['ci_low'])}, {_fmt(s['ci_high'])}]"


def render_markdown(summary: Mapping[str, Any], *, title: str = "Drift study", preamble: str = "") -> str:
    """A human-readable report of :func:`summarize`'s output (Markdown tables)."""
    cfg = summary["config"]
    level = round(100 * cfg["confidence"])
    lines = [f"# {title}", ""]
    if preamble:
        lines += [preamble.rstrip(), ""]
    lines += [
        f"Mean [{level}% {cfg['ci']}, {cfg['n_boot']} resamples, seed {cfg['seed']}]. "
        f"Paired test: {cfg['paired_test']}.",
        "",
    ]
    overall = [g for g in summary["groups"] if g["class"] == ALL_CLASSES]
    headline = [
        m for m in ("iou", "drift_score", "ssim", "pearson", "centroid_shift", "emd") if m in cfg["metrics"]
    ]
    for method in summary["methods"]:
        lines += [f"## {method}", ""]
        rows = []
        for g in (g for g in overall if g["method"] == method):
            iou = g["metrics"].get("iou", {})
            rows.append(
                [g["model"], g["n_images"]]
                + [_mean_ci(g["metrics"][m]) for m in headline]
                + ([f"{_fmt(iou.get('median'))} ({_fmt(iou.get('iqr'))})"] if iou else [])
            )
        header = ["model", "n", *(f"{m} mean [CI]" for m in headline)] + (
            ["iou median (IQR)"] if "iou" in headline else []
        )
        lines += _table(header, rows)
        if summary["classes"] and any(g["class"] != ALL_CLASSES for g in summary["groups"]):
            lines += [f"IoU per class ({method}): mean [CI] (n)", ""]
            per_class = {
                (g["model"], g["class"]): g
                for g in summary["groups"]
                if g["method"] == method and g["class"] != ALL_CLASSES
            }
            class_rows = []
            for model in summary["models"]:
                cells = []
                for cls in summary["classes"]:
                    g = per_class.get((model, cls))
                    s = g["metrics"].get("iou", {}) if g else {}
                    cells.append(f"{_mean_ci(s)} ({s.get('n', 0)})" if s else "-")
                class_rows.append([model, *cells])
            lines += _table(["model", *summary["classes"]], class_rows)

    rankings = summary["rankings"]
    lines += [f"## Stability ranking (mean {rankings['metric']}, higher = more stable)", ""]
    methods = list(rankings["methods"])
    depth = max((len(v) for v in rankings["methods"].values()), default=0)
    rank_rows = []
    for i in range(depth):
        row: list[Any] = [i + 1]
        for method in methods:
            entries = rankings["methods"][method]
            row.append(f"{entries[i]['model']} ({_fmt(entries[i]['mean'])})" if i < len(entries) else "-")
        rank_rows.append(row)
    lines += _table(["rank", *methods], rank_rows)
    for c in rankings["comparisons"]:
        pairs = ", ".join(f"{a} / {b}" for a, b in c["reversed_pairs"]) or "none"
        lines += [
            f"- {c['method_a']} vs {c['method_b']}: Kendall tau = {_fmt(c['tau'])} (p = {_fmt(c['p_value'])}, "
            f"n = {c['n']}); most stable: {c['top_a']} vs {c['top_b']}"
            f"{' (the top changes)' if c['top_changes'] else ''}; reversed pairs: {pairs}."
            + (f" Note: {c['note']}." if c["note"] else ""),
            "- relative change of the mean from "
            f"{c['method_a']} to {c['method_b']}: "
            + ", ".join(
                f"{m} {_fmt(100 * v, 1)}%" if v is not None else f"{m} -"
                for m, v in c["relative_change"].items()
            ),
            "",
        ]

    tests = [t for t in summary["paired_tests"] if t["metric"] in ("iou", "drift_score", "ssim", "pearson")]
    if tests:
        lines += ["## Paired tests between architectures (same images)", ""]
        lines += _table(
            ["method", "metric", "A vs B", "n", "median A-B", "effect", "W", "p", "p (Holm)", "note"],
            [
                [
                    t["method"],
                    t["metric"],
                    f"{t['model_a']} vs {t['model_b']}",
                    t["n_pairs"],
                    t["median_difference"],
                    t["effect_size"],
                    t["statistic"],
                    t["p_value"],
                    t["p_holm"],
                    t["note"] or "",
                ]
                for t in tests
            ],
        )
        lines += ["All metrics' tests are in summary.json.", ""]

    if summary["lesion_tests"]:
        lines += [
            "## Evidence on the lesion: fine-tuned vs transfer (lesion images only)",
            "",
            "Share of the top-k% region inside the lesion (topk) and attribution mass inside it (mass); "
            "chance level = lesion area. Positive change: fine-tuning moved evidence onto the lesion.",
            "",
        ]
        stats_of = {(g["model"], g["method"]): g["metrics"] for g in overall}
        rows = []
        for t in summary["lesion_tests"]:
            s = stats_of.get((t["model"], t["method"]), {})
            kind = "topk" if "topk" in t["finetuned"] else "mass"
            rows.append(
                [
                    t["model"],
                    t["method"],
                    kind,
                    t["n_pairs"],
                    _mean_ci(s.get(t["transfer"], {})),
                    _mean_ci(s.get(t["finetuned"], {})),
                    _mean_ci(s.get("lesion_area", {})),
                    t["mean_difference"],
                    t["p_value"],
                    t["note"] or "",
                ]
            )
        lines += _table(
            [
                "model",
                "method",
                "measure",
                "n",
                "transfer",
                "fine-tuned",
                "chance",
                "mean change",
                "p",
                "note",
            ],
            rows,
        )
    return "\n".join(lines).rstrip() + "\n"
