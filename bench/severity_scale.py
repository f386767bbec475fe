"""Severity before and after: percentile thresholds of a pair's own reference scores (p90 -> moderate,
p99 -> high, the first release) against the absolute scale of ``engine.severity`` (noise floor to chance).

A test pair (``tests.pairs.make_pair``: random-init backbone, every weight perturbed, head x3) is calibrated
on ``--reference`` synthetic-like images and scored on ``--new`` others. Percentile thresholds call about
90% of *any* pair's new traffic "low" by construction, however far its evidence moved; the absolute scale
says how far it moved.

    python bench/severity_scale.py [--arch inceptionv3] [--reference 90] [--new 60] [--pair fine-tune|unrelated]

``--pair unrelated`` makes the "fine-tuned" checkpoint an independent random init: evidence that moved as far
as it can, which percentile thresholds still call mostly "low".
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.calibrate import calibrate, write_calibration
from engine.report import drift_reports
from engine.runtime import ModelPair
from tests.pairs import SMALL_SIZE, export_models, export_small_pair, make_pair


def images(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:160, :160]
    out = []
    for _ in range(n):
        cy, cx = rng.uniform(30, 130, size=2)
        blob = np.exp(-((rows - cy) ** 2 + (cols - cx) ** 2) / rng.uniform(150, 600))
        out.append(np.clip(0.3 + 0.5 * blob + 0.05 * rng.random((160, 160)), 0, 1).astype(np.float32))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="inceptionv3")
    parser.add_argument("--reference", type=int, default=90)
    parser.add_argument("--new", type=int, default=60)
    parser.add_argument("--pair", choices=("fine-tune", "unrelated"), default="fine-tune")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.pair == "fine-tune":
            folder = export_small_pair(args.arch, Path(tmp) / args.arch, input_size=SMALL_SIZE[args.arch])
        else:
            first, second = make_pair(args.arch, seed=0)[0], make_pair(args.arch, seed=7)[0]
            folder = export_models(first, second, Path(tmp) / args.arch, input_size=SMALL_SIZE[args.arch])
        pair = ModelPair.load(folder, threads=2)
        reference = images(args.reference, seed=1)
        calibration = calibrate(pair, reference, subset="all", min_reference=args.reference, batch_size=16)
        write_calibration(folder, calibration)
        pair = ModelPair.load(folder, threads=2)
        new = drift_reports(pair, images(args.new, seed=2))
    print(
        f"{args.arch} test pair at {SMALL_SIZE[args.arch]} px; {args.reference} reference, {args.new} new images"
    )
    for method, block in calibration["methods"].items():
        ref = np.array(block["reference"])
        moderate, high = np.percentile(ref, 90), np.percentile(ref, 99)
        scores = np.array([r.methods[method]["drift_score"] for r in new])
        before = collections.Counter(
            "high" if s >= high else "moderate" if s >= moderate else "low" for s in scores
        )
        after = collections.Counter(r.methods[method]["severity"] for r in new)
        print(
            f"  {method}: median drift score {np.median(scores):.2f}, noise floor {block['noise_floor']:.2f}, "
            f"chance {calibration['chance']:.2f}\n"
            f"    before (p90/p99 of its own reference): low {before['low']}, moderate {before['moderate']}, "
            f"high {before['high']}\n"
            f"    after (absolute drift index):           low {after['low']}, moderate {after['moderate']}, "
            f"high {after['high']}"
        )


if __name__ == "__main__":
    main()
