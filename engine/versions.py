"""Drift of two versions of one model compared: did a new version (or the time after a replacement) drift more?

Pure NumPy/SciPy. Each side (``a``: the baseline, e.g. the old version or the time before a replacement;
``b``: the candidate) is a set of **independent** requests: per metric a list of values (missing values are
left out) and the per-request flags. :func:`compare_versions` returns per side the descriptive statistics of
each metric with a BCa bootstrap CI of the mean (:func:`engine.study.statistics.describe`) and the flagged
rate with a Wilson interval, and per metric the difference b - a:

- ``mean_difference`` with a percentile bootstrap CI (both sides resampled independently, ``n_boot``
  resamples, seeded: a rerun gives the same interval);
- ``mann_whitney`` (two-sided Mann-Whitney U, ``scipy.stats.mannwhitneyu``; the primary test: drift scores
  are bounded and skewed) with the common-language effect size P(b > a) + P(b = a)/2, and ``welch`` (Welch's
  t-test, for reference);
- the flagged rates' difference with Fisher's exact test.

One Holm family over the primary tests (Mann-Whitney of each metric in ``metrics``, and Fisher on the
flags): ``significant`` is true when any Holm-adjusted p < ``alpha``; ``direction`` says which way the
primary metric moved ("more_drift": b drifts more). Fewer than :data:`MIN_PER_SIDE` values on a side give no
test (``None``) and a note. The same requests answered by both versions (side-by-side serving) would allow a
paired test; this comparison does not assume it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats

from engine.ranking import DEFAULT_ALPHA, holm_adjust
from engine.study.statistics import describe

__all__ = ["COMPARE_METRICS", "MIN_PER_SIDE", "compare_study_versions", "compare_versions", "wilson_interval"]

# drift_score: 1 - top-k IoU (higher = more drift); drift_index: the calibrated index (0 = noise floor)
COMPARE_METRICS: tuple[str, ...] = ("drift_score", "drift_index")
MIN_PER_SIDE = 5


def wilson_interval(successes: int, n: int, *, confidence: float = 0.95) -> tuple[float | None, float | None]:
    """Wilson score interval of a proportion; ``(None, None)`` for n = 0."""
    if n <= 0:
        return None, None
    z = float(stats.norm.ppf(0.5 + confidence / 2))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _finite(values: Sequence[Any]) -> np.ndarray:
    x = np.asarray([float(v) for v in values if v is not None], dtype=np.float64)
    return x[np.isfinite(x)]


def _difference(a: np.ndarray, b: np.ndarray, *, n_boot: int, seed: int, confidence: float) -> dict[str, Any]:
    out: dict[str, Any] = {
        "n_a": int(a.size),
        "n_b": int(b.size),
        "mean_difference": float(b.mean() - a.mean()) if a.size and b.size else None,
        "ci_low": None,
        "ci_high": None,
        "mann_whitney": None,
        "welch": None,
        "note": "",
    }
    if min(a.size, b.size) < MIN_PER_SIDE:
        out["note"] = f"fewer than {MIN_PER_SIDE} values on a side: no test"
        return out
    rng = np.random.default_rng(seed)
    boot = rng.choice(b, (n_boot, b.size)).mean(axis=1) - rng.choice(a, (n_boot, a.size)).mean(axis=1)
    low, high = np.percentile(boot, [50 * (1 - confidence), 50 * (1 + confidence)])
    out["ci_low"], out["ci_high"] = float(low), float(high)
    if np.ptp(np.concatenate([a, b])) == 0:
        out["mann_whitney"] = {"u": float(a.size * b.size / 2), "p_value": 1.0, "p_b_greater": 0.5}
        out["note"] = "all values are equal"
        return out
    mw = stats.mannwhitneyu(b, a, alternative="two-sided")
    out["mann_whitney"] = {
        "u": float(mw.statistic),
        "p_value": float(mw.pvalue),
        "p_b_greater": float(mw.statistic) / (a.size * b.size),
    }
    welch = stats.ttest_ind(b, a, equal_var=False)
    p = float(welch.pvalue)
    out["welch"] = {"t": float(welch.statistic), "p_value": p if math.isfinite(p) else None}
    return out


def _side(
    values: Mapping[str, Sequence[Any]],
    flagged: Sequence[bool],
    metrics: Sequence[str],
    *,
    n_boot: int,
    seed: int,
) -> dict[str, Any]:
    n_flagged = int(sum(bool(f) for f in flagged))
    low, high = wilson_interval(n_flagged, len(flagged))
    return {
        "n": len(flagged),
        "metrics": {
            name: describe(_finite(values.get(name, [])), n_boot=n_boot, seed=seed) for name in metrics
        },
        "flagged": n_flagged,
        "flagged_rate": n_flagged / len(flagged) if flagged else None,
        "flagged_ci_low": low,
        "flagged_ci_high": high,
    }


def compare_versions(
    a_values: Mapping[str, Sequence[Any]],
    a_flagged: Sequence[bool],
    b_values: Mapping[str, Sequence[Any]],
    b_flagged: Sequence[bool],
    *,
    metrics: Sequence[str] = COMPARE_METRICS,
    alpha: float = DEFAULT_ALPHA,
    n_boot: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Compare side ``b`` with side ``a`` (module docstring)."""
    differences = {
        name: _difference(
            _finite(a_values.get(name, [])),
            _finite(b_values.get(name, [])),
            n_boot=n_boot,
            seed=seed,
            confidence=confidence,
        )
        for name in metrics
    }
    fa, fb = int(sum(map(bool, a_flagged))), int(sum(map(bool, b_flagged)))
    flags: dict[str, Any] = {
        "rate_a": fa / len(a_flagged) if a_flagged else None,
        "rate_b": fb / len(b_flagged) if b_flagged else None,
        "difference": None,
        "p_value": None,
    }
    if a_flagged and b_flagged:
        flags["difference"] = flags["rate_b"] - flags["rate_a"]
        table = [[fb, len(b_flagged) - fb], [fa, len(a_flagged) - fa]]
        flags["p_value"] = float(stats.fisher_exact(table).pvalue)
    primary = [
        (f"mann_whitney:{name}", (d["mann_whitney"] or {}).get("p_value")) for name, d in differences.items()
    ] + [("fisher:flagged", flags["p_value"])]
    adjusted = holm_adjust([p for _, p in primary])
    tests = [
        {"test": name, "p_value": p, "p_holm": q, "significant": q is not None and q < alpha}
        for (name, p), q in zip(primary, adjusted, strict=True)
    ]
    significant = any(t["significant"] for t in tests)
    lead = differences[metrics[0]]["mean_difference"] if metrics else None
    if not significant or lead is None:
        direction = "no_significant_change"
    else:
        direction = "more_drift" if lead > 0 else "less_drift"
    return {
        "a": _side(a_values, a_flagged, metrics, n_boot=n_boot, seed=seed),
        "b": _side(b_values, b_flagged, metrics, n_boot=n_boot, seed=seed),
        "difference": differences,
        "flagged": flags,
        "tests": tests,
        "alpha": alpha,
        "significant": significant,
        "direction": direction,
    }


def compare_study_versions(
    baseline: Mapping[str, str],
    baseline_rows: Sequence[Mapping[str, Any]],
    candidate: Mapping[str, str],
    candidate_rows: Sequence[Mapping[str, Any]],
    *,
    metrics: Sequence[str] = COMPARE_METRICS,
    alpha: float = DEFAULT_ALPHA,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """The offline comparison of the study (``cxr-drift study --compare-artifacts``): two sets of pairs on the
    same images. ``baseline``/``candidate`` map each set's labels to architectures; the rows are the study's
    per-image rows (``model``, ``method``, ``image``, ``included``, metrics, ``flagged``).

    For each architecture in both sets and each method: :func:`compare_versions` on the images included in
    both sets (b = candidate, a = baseline), and, since the images are the same, the paired Wilcoxon test of
    the primary metric (``paired``: :func:`engine.study.statistics.paired_wilcoxon`, candidate - baseline).
    """
    from engine.study.statistics import paired_wilcoxon

    def index(rows: Sequence[Mapping[str, Any]], label: str) -> dict[tuple[str, str], Mapping[str, Any]]:
        return {(str(r["method"]), str(r["image"])): r for r in rows if r["model"] == label and r["included"]}

    by_arch_a = {arch: label for label, arch in baseline.items()}
    by_arch_b = {arch: label for label, arch in candidate.items()}
    out: dict[str, Any] = {}
    for arch in sorted(set(by_arch_a) & set(by_arch_b)):
        a_rows, b_rows = index(baseline_rows, by_arch_a[arch]), index(candidate_rows, by_arch_b[arch])
        common = sorted(set(a_rows) & set(b_rows))
        methods: dict[str, Any] = {}
        for method in sorted({m for m, _ in common}):
            keys = [k for k in common if k[0] == method]
            a_values = {name: [a_rows[k].get(name) for k in keys] for name in metrics}
            b_values = {name: [b_rows[k].get(name) for k in keys] for name in metrics}
            result = compare_versions(
                a_values,
                [bool(a_rows[k].get("flagged")) for k in keys],
                b_values,
                [bool(b_rows[k].get("flagged")) for k in keys],
                metrics=metrics,
                alpha=alpha,
                n_boot=n_boot,
                seed=seed,
            )
            lead = metrics[0]
            result["paired"] = paired_wilcoxon(
                [float("nan") if v is None else float(v) for v in b_values[lead]],
                [float("nan") if v is None else float(v) for v in a_values[lead]],
            )
            result["paired"]["metric"] = lead
            methods[method] = result
        out[arch] = {
            "baseline": by_arch_a[arch],
            "candidate": by_arch_b[arch],
            "n_images": len(common) // max(1, len(methods)),
            "methods": methods,
        }
    return out
