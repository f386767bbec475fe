"""``cxr-drift calibrate``: learn drift thresholds on a reference split and store them in the manifest."""

from __future__ import annotations

import argparse
from pathlib import Path

from core.vocabulary import SPLITS
from engine.calibrate import calibrate_folder

__all__ = ["configure_parser", "run"]


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model-dir", required=True, type=Path, help="model-pair folder (manifest.json, ONNX files)"
    )
    p.add_argument("--data", required=True, help="ImageFolder tree or CSV manifest of the reference images")
    p.add_argument("--split", default="val", choices=SPLITS, help="reference split (default val)")
    p.add_argument("--limit", type=int, default=None, help="use at most N images of the split")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--topk", type=float, default=20.0, help="top-k percent of the drift score (default 20)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")


def run(args: argparse.Namespace) -> int:
    thresholds = calibrate_folder(
        args.model_dir,
        args.data,
        split=args.split,
        limit=args.limit,
        topk_percent=args.topk,
        batch_size=args.batch_size,
        threads=args.threads,
    )
    path = Path(args.model_dir) / "manifest.json"
    print(f"wrote drift thresholds ({thresholds['subset']}, n={thresholds['n']}) to {path}")
    for method, entry in thresholds["methods"].items():
        print(f"  {method}: moderate >= {entry['moderate']:.3f}, high >= {entry['high']:.3f}")
    return 0
