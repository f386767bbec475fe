"""``cxr-drift synth``: write a synthetic chest X-ray dataset (ImageFolder tree + masks + manifest.csv).

Example::

    cxr-drift synth --out data/synth --n 2000 --size 256 --seed 0 --cue-class lobar_consolidation --cue-rate 0.9
"""

from __future__ import annotations

import argparse
import json

from core.errors import InputError, UsageError
from training.synth import DEFAULT_CLASS_NAMES, generate_dataset, parse_class_names, parse_split

__all__ = ["configure_parser", "run"]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", required=True, help="output directory (created; must be empty unless --overwrite)"
    )
    parser.add_argument(
        "--n", type=int, default=1000, help="number of images, balanced over the 5 classes (1000)"
    )
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (256)")
    parser.add_argument(
        "--seed", type=int, default=0, help="random seed; same arguments give identical files (0)"
    )
    parser.add_argument(
        "--class-names",
        default=",".join(DEFAULT_CLASS_NAMES),
        help="exactly 5 unique comma-separated names, in the order of the findings (default: %(default)s)",
    )
    parser.add_argument("--split", default="0.7,0.15,0.15", help="train,val,test fractions (0.7,0.15,0.15)")
    parser.add_argument("--cue-class", default=None, help="class that gets the spurious corner marker")
    parser.add_argument(
        "--cue-rate", type=float, default=0.0, help="probability of the marker on --cue-class images (0)"
    )
    parser.add_argument(
        "--cue-noise-rate",
        type=float,
        default=None,
        help="probability of the marker on the other classes (default 0.1 * (1 - cue rate))",
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="worker processes (1); the output does not depend on it"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a previous dataset in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    try:
        class_names = parse_class_names(args.class_names)
        split = parse_split(args.split)
    except InputError as exc:
        raise UsageError(str(exc)) from None
    if args.cue_class is None and (args.cue_rate or args.cue_noise_rate):
        raise UsageError("--cue-rate/--cue-noise-rate need --cue-class NAME")
    manifest = generate_dataset(
        args.out,
        n=args.n,
        size=args.size,
        seed=args.seed,
        class_names=class_names,
        split=split,
        cue_class=args.cue_class,
        cue_rate=args.cue_rate,
        cue_noise_rate=args.cue_noise_rate,
        workers=args.workers,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    config = json.loads((manifest.parent / "synth_config.json").read_text(encoding="utf-8"))
    counts = {split: sum(c.values()) for split, c in config["split_counts"].items()}
    print(
        f"wrote {args.n} images to {manifest.parent} ({', '.join(f'{k} {v}' for k, v in counts.items())}); "
        f"manifest: {manifest}"
    )
    return 0
