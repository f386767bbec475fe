"""How often is a "ranking reversal" declared when there is none? The descriptive rule (before: the
architectures' mean-IoU orders differ between LayerCAM and GradCAM++, each mean over that architecture's own
images) against the inferential verdict (after: ``engine.ranking.reversal_test``: orders differ on the
common image set AND a Holm-adjusted per-image interaction Wilcoxon p < 0.05).

Simulated data with NO interaction: IoU = 0.6 + architecture effect + method effect (-0.1 for GradCAM++)
+ image effect (sd 0.1, shared by every architecture and method of an image) + noise (sd ``--noise``).
The architecture effects are 0, s, 2s for s in ``--spreads`` and are the same under both methods, so every
declared reversal is a false one. ``--missing``: each architecture independently loses that share of the
images (as a true-positive subset does); "before" then averages each architecture over its own images, as
the old code did. A last block checks power: a crossing interaction (effects 0, s, 2s under LayerCAM and
2s, s, 0 under GradCAM++).

    python bench/reversal_false_positive.py [--seeds 200] [--sizes 10 20 50] [--spreads 0 0.01 0.03]
    python bench/reversal_false_positive.py --ci-coverage   # BCa vs percentile CI coverage at small n

The verdict does not depend on the bootstrap, so ``--n-boot`` is small by default (it only sets the
reported P(order differs)).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.ranking import kendall_tau, method_tables, reversal_test

MODELS = ("densenet201", "inceptionv3", "resnet50v2")


def simulate(
    rng: np.random.Generator,
    *,
    n: int,
    layercam: tuple[float, ...],
    gradcampp: tuple[float, ...],
    noise: float,
    missing: float,
) -> list[tuple[int, str, str, float | None]]:
    records: list[tuple[int, str, str, float | None]] = []
    for i in range(n):
        image = rng.normal(0.0, 0.1)
        kept = {model: rng.random() >= missing for model in MODELS}
        for method, effects, shift in (("layercam", layercam, 0.0), ("gradcampp", gradcampp, -0.1)):
            for model, effect in zip(MODELS, effects, strict=True):
                value = 0.6 + effect + shift + image + rng.normal(0.0, noise)
                records.append((i, model, method, value if kept[model] else None))
    return records


def own_subset_means(
    records: list[tuple[int, str, str, float | None]], method: str
) -> dict[str, float | None]:
    """The old rule's input: each architecture's mean over the images it has."""
    out: dict[str, float | None] = {}
    for model in MODELS:
        values = [v for _, m, meth, v in records if m == model and meth == method and v is not None]
        out[model] = float(np.mean(values)) if values else None
    return out


def rates(
    args: argparse.Namespace, *, n: int, spread: float, missing: float, interaction: bool
) -> dict[str, float]:
    effects = tuple(k * spread for k in range(len(MODELS)))
    other = tuple(reversed(effects)) if interaction else effects
    before = after = undecided = 0
    p_differs = []
    for seed in range(args.seeds):
        rng = np.random.default_rng([seed, n, round(spread * 1e6), round(missing * 100), int(interaction)])
        records = simulate(rng, n=n, layercam=effects, gradcampp=other, noise=args.noise, missing=missing)
        before += kendall_tau(own_subset_means(records, "layercam"), own_subset_means(records, "gradcampp"))[
            "reversal"
        ]
        tables = method_tables(records)
        test = reversal_test(
            tables.get("layercam", {}), tables.get("gradcampp", {}), n_boot=args.n_boot, seed=seed
        )
        if test["reversal"] is None:
            undecided += 1
        else:
            after += test["reversal"]
        if test["bootstrap"]["p_order_differs"] is not None:
            p_differs.append(test["bootstrap"]["p_order_differs"])
    return {
        "before": before / args.seeds,
        "after": after / args.seeds,
        "no_verdict": undecided / args.seeds,
        "p_order_differs": float(np.mean(p_differs)) if p_differs else float("nan"),
    }


def ci_coverage(args: argparse.Namespace) -> None:
    from scipy import stats

    from engine.study.statistics import bootstrap_ci

    print(f"95% CI coverage of the mean, {args.seeds} samples per cell, {args.ci_boot} resamples")
    print("| n | data | BCa | percentile |")
    print("|---|---|---|---|")
    for n in (5, 10, 15, 20, 30):
        for name, draw, mean in (
            ("beta(4,2)", lambda r, n: r.beta(4, 2, n), 4 / 6),
            ("exponential", lambda r, n: r.exponential(1.0, n), 1.0),
        ):
            rng = np.random.default_rng(n)
            bca = pct = 0
            for seed in range(args.seeds):
                x = draw(rng, n)
                low, high = bootstrap_ci(x, n_boot=args.ci_boot, seed=seed, min_n=2)
                bca += low is not None and high is not None and low <= mean <= high
                ref = stats.bootstrap(
                    (x,),
                    np.mean,
                    n_resamples=args.ci_boot,
                    method="percentile",
                    rng=np.random.default_rng(seed),
                ).confidence_interval
                pct += ref.low <= mean <= ref.high
            print(f"| {n} | {name} | {bca / args.seeds:.3f} | {pct / args.seeds:.3f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=200, help="simulated data sets per cell")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 20, 50], help="images per data set")
    parser.add_argument("--spreads", type=float, nargs="+", default=[0.0, 0.01, 0.03])
    parser.add_argument("--missing", type=float, nargs="+", default=[0.0, 0.2])
    parser.add_argument("--noise", type=float, default=0.1)
    parser.add_argument("--n-boot", type=int, default=200)
    parser.add_argument("--ci-coverage", action="store_true", help="only the CI coverage table")
    parser.add_argument("--ci-boot", type=int, default=1000)
    args = parser.parse_args()
    if args.ci_coverage:
        ci_coverage(args)
        return 0
    start = time.perf_counter()
    print(f"No interaction: share of {args.seeds} simulated studies declared a reversal (3 architectures)")
    print(
        "| images | spread | missing | before (descriptive) | after (verdict) | no verdict | mean P(order differs) |"
    )
    print("|---|---|---|---|---|---|---|")
    for missing in args.missing:
        for n in args.sizes:
            for spread in args.spreads:
                r = rates(args, n=n, spread=spread, missing=missing, interaction=False)
                print(
                    f"| {n} | {spread:g} | {missing:g} | {r['before']:.3f} | {r['after']:.3f} | "
                    f"{r['no_verdict']:.3f} | {r['p_order_differs']:.3f} |"
                )
    print()
    print("Crossing interaction (power): share declared a reversal")
    print("| images | spread | before | after |")
    print("|---|---|---|---|")
    for n in args.sizes:
        for spread in (0.05, 0.1):
            r = rates(args, n=n, spread=spread, missing=0.0, interaction=True)
            print(f"| {n} | {spread:g} | {r['before']:.3f} | {r['after']:.3f} |")
    print(f"\n{time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
