"""``cxr-drift study``: the paper's analysis, offline, over model pairs and one data split.

The work is :func:`engine.study.run_study` (see :mod:`engine.study` for what is compared and how). Outputs
in ``--out``: ``per_image.csv`` (one row per model x method x image, with an ``included`` column),
``summary.json`` / ``summary.md`` (statistics, rankings, image counts) and, unless ``--no-plots``, the
figures ``iou_<method>.png``, ``ranking.png``, ``lesion_evidence.png`` (synthetic data) and ``example.png``;
``--figure PATH`` also writes all of them as one small figure. ``--compare-artifacts DIR`` (or
``--compare-model-dir``) runs a second set of pairs (e.g. the previous versions) on the same images and
writes ``versions.json``: per architecture in both sets and method, the candidate against the baseline.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from core.vocabulary import SPLITS
from engine.study import SUBSETS, TARGETS, run_study

__all__ = ["configure_parser", "run"]


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--artifacts",
        type=Path,
        default=None,
        help="folder of model-pair folders (each with manifest.json), or one model-pair folder",
    )
    p.add_argument(
        "--model-dir",
        type=Path,
        action="append",
        default=[],
        help="a model-pair folder (repeatable; with or instead of --artifacts)",
    )
    p.add_argument(
        "--data", required=True, help="ImageFolder tree, CSV manifest, or synthetic dataset folder"
    )
    p.add_argument("--split", default="test", choices=SPLITS, help="split (default test)")
    p.add_argument(
        "--subset",
        default="both_correct",
        choices=SUBSETS,
        help="images the statistics use: both_correct (both checkpoints right; primary), true_positive "
        "(fine-tuned right; the paper; sensitivity) or all",
    )
    p.add_argument(
        "--target",
        default="label",
        choices=TARGETS,
        help="class whose evidence is compared: the true label (default) or the fine-tuned prediction",
    )
    p.add_argument("--topk", type=float, default=20.0, help="top-k percent of IoU, score and lesion hit (20)")
    p.add_argument("--limit", type=int, default=None, help="use at most N images of the split (in order)")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the CIs (2000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (0)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    p.add_argument("--no-plots", action="store_true", help="tables and statistics only")
    p.add_argument("--figure", type=Path, default=None, help="also write one combined figure to this PNG")
    p.add_argument(
        "--note",
        default="",
        help="a line added to the figures' titles and summary.md (e.g. the models' origin)",
    )
    p.add_argument(
        "--compare-artifacts",
        type=Path,
        default=None,
        help="another set of model pairs (e.g. the previous versions): each architecture in both sets is "
        "compared on the same images (versions.json; engine/versions.py)",
    )
    p.add_argument(
        "--compare-model-dir",
        type=Path,
        action="append",
        default=[],
        help="a model-pair folder of that other set (repeatable)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--out", required=True, type=Path, help="output folder (created)")


def run(args: argparse.Namespace) -> int:
    result = run_study(
        args.data,
        args.out,
        artifacts=args.artifacts,
        model_dirs=args.model_dir,
        split=args.split,
        subset=args.subset,
        target=args.target,
        topk=args.topk,
        limit=args.limit,
        n_boot=args.bootstrap,
        seed=args.seed,
        batch_size=args.batch_size,
        threads=args.threads,
        plots=not args.no_plots,
        figure=args.figure,
        note=args.note,
        progress=not args.no_progress,
        compare_artifacts=args.compare_artifacts,
        compare_model_dirs=args.compare_model_dir,
    )
    print(
        f"study of {result.n_pairs} model pair(s) x {result.n_images} image(s) ({args.subset}): "
        f"wrote {', '.join(result.written)} to {result.out}"
    )
    for comparison in result.summary["rankings"]["comparisons"]:
        verdict = {True: "yes", False: "no", None: "undecided"}[comparison["reversal"]]
        print(
            f"  ranking {comparison['method_a']} vs {comparison['method_b']} on {comparison['n_images']} common "
            f"image(s): reversal {verdict} (orders differ on the means: "
            f"{'yes' if comparison['reversal_descriptive'] else 'no'}; Kendall tau = "
            f"{'-' if comparison['tau'] is None else format(comparison['tau'], '.3f')})"
            f"{'; ' + comparison['note'] if comparison['note'] else ''}"
        )
    for arch, compared in result.summary.get("versions", {}).items():
        for method, test in compared["methods"].items():
            print(
                f"  versions {arch} {method}: {compared['candidate']} vs {compared['baseline']} on "
                f"{test['a']['n']} image(s): {test['direction'].replace('_', ' ')} (paired Wilcoxon p = "
                f"{'-' if test['paired']['p_value'] is None else format(test['paired']['p_value'], '.3g')})"
            )
    return 0
