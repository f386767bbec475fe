"""``cxr-drift calibrate``: learn drift thresholds on a reference split and store them in the manifest."""

from __future__ import annotations

import argparse
from pathlib import Path

from core.manifest import manifest_key_from_env
from core.vocabulary import SPLITS
from engine.calibrate import MIN_REFERENCE, SUBSETS, calibrate_folder

__all__ = ["configure_parser", "run"]


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model-dir", required=True, type=Path, help="model-pair folder (manifest.json, ONNX files)"
    )
    p.add_argument("--data", required=True, help="ImageFolder tree or CSV manifest of the reference images")
    p.add_argument("--split", default="val", choices=SPLITS, help="reference split (default val)")
    p.add_argument("--limit", type=int, default=None, help="use at most N images of the split")
    p.add_argument(
        "--subset",
        default="both_correct",
        choices=SUBSETS,
        help="reference images: both checkpoints right (default, primary), fine-tuned right, or all",
    )
    p.add_argument(
        "--min-reference",
        type=int,
        default=MIN_REFERENCE,
        help=f"fewest reference images accepted (default {MIN_REFERENCE}: a p99 needs about that many)",
    )
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--topk", type=float, default=20.0, help="top-k percent of the drift score (default 20)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")


def run(args: argparse.Namespace) -> int:
    calibration = calibrate_folder(
        args.model_dir,
        args.data,
        split=args.split,
        limit=args.limit,
        subset=args.subset,
        min_reference=args.min_reference,
        topk_percent=args.topk,
        batch_size=args.batch_size,
        threads=args.threads,
        progress=args.progress,
        manifest_key=manifest_key_from_env(),
    )
    path = Path(args.model_dir) / "manifest.json"
    print(
        f"wrote the drift calibration ({calibration['subset']}, n={calibration['n']} of "
        f"{calibration['n_total']}) to {path}; chance score {calibration['chance']:.3f}"
    )
    for method, entry in calibration["methods"].items():
        classes = ", ".join(entry["classes"]) or "none (pooled reference only)"
        print(
            f"  {method}: noise floor {entry['noise_floor']:.3f}, reference p50 "
            f"{entry['reference_percentiles']['50']:.3f} / p99 {entry['reference_percentiles']['99']:.3f}; "
            f"per-class references: {classes}"
        )
    return 0
