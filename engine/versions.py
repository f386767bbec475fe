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

__all__ = ["COMPARE_METRICS", "MIN_PER_SIDE", "compare_versions", "wilson_interval"]

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
