"""The architecture stability ranking and its reversal between methods: one definition for the study and
for ``GET /audit/summary``.

Architectures are ranked per method by a per-architecture mean (by default mean top-k IoU, higher = more
stable); ties are broken by name, so a ranking is deterministic. Two methods' rankings are compared with
Kendall's tau-b over the architectures ranked under both. A **reversal** is at least one pair of
architectures ordered one way under one method and the other way under the other (tau < 1 when there are
no ties); ``reversed_pairs`` names them. With three architectures tau can only be +-1 or +-1/3 and its
p-value cannot be small: read it as descriptive.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from scipy import stats

__all__ = ["finite_means", "kendall_tau", "rank_models"]


def finite_means(means: Mapping[str, float | None]) -> dict[str, float]:
    """``means`` without the ``None``/NaN/inf entries, as floats."""
    return {k: float(v) for k, v in means.items() if v is not None and math.isfinite(float(v))}


def rank_models(means: Mapping[str, float | None], *, higher_is_better: bool = True) -> list[str]:
    """Model names from most to least stable by their mean (``None``/NaN left out); ties by name."""
    valid = finite_means(means)
    sign = -1.0 if higher_is_better else 1.0
    return sorted(valid, key=lambda k: (sign * valid[k], k))


def kendall_tau(
    a: Mapping[str, float | None], b: Mapping[str, float | None], *, higher_is_better: bool = True
) -> dict[str, Any]:
    """Compare two methods' per-architecture means over the architectures both have.

    Returns ``models`` (sorted), ``n``, ``order_a``/``order_b`` (:func:`rank_models` of each, restricted to
    ``models``), ``tau`` and ``p_value`` (``scipy.stats.kendalltau``'s; ``None`` with a ``note`` for fewer than
    2 architectures or when all means tie under one method), ``reversed_pairs`` (pairs ordered one way under
    ``a`` and the other under ``b``) and ``reversal`` (``reversed_pairs`` is not empty).
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
