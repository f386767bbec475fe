"""Throughput of the synthetic chest X-ray generator, and its contact sheet.

    python bench/synth.py                     # images/s at a few sizes, one core
    python bench/synth.py --sheet docs/synthetic_contact_sheet.png

Prints, per size: generation only (``generate_image``) and generation + writing the three PNGs, both as
images/s of wall time and of this process's CPU time (on a shared machine the CPU figure is the fairer one).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

# One core: BLAS/OpenMP threads would only oversubscribe (the generator uses none on purpose).
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(var, "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image  # noqa: E402

from training.synth import contact_sheet, generate_dataset, generate_image  # noqa: E402


def _rate(count: int, fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return count / (time.perf_counter() - wall), count / max(time.process_time() - cpu, 1e-9)


def bench(sizes: list[int], count: int) -> None:
    print(f"{'size':>6} {'generate img/s (wall, cpu)':>28} {'+ write PNGs img/s (wall, cpu)':>32}")
    for size in sizes:
        generate_image(0, seed=0, label=1, size=size)  # warm the grid caches
        gen = _rate(
            count, lambda s=size: [generate_image(i, seed=1, label=i % 5, size=s) for i in range(count)]
        )
        with tempfile.TemporaryDirectory() as tmp:
            full = _rate(
                count,
                lambda s=size, t=tmp: generate_dataset(
                    Path(t) / "ds", n=count, size=s, seed=1, split=(1.0, 0.0, 0.0), progress=False
                ),
            )
        print(f"{size:>6} {gen[0]:>13.1f} {gen[1]:>13.1f} {full[0]:>15.1f} {full[1]:>15.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="128,224,256,512")
    parser.add_argument("--count", type=int, default=100, help="images per size")
    parser.add_argument("--sheet", type=Path, default=None, help="write the contact sheet here instead")
    args = parser.parse_args()
    if args.sheet is not None:
        sheet = contact_sheet(seed=0, size=160, per_class=4)
        sheet.quantize(colors=128, dither=Image.Dither.NONE).save(args.sheet, optimize=True)
        print(f"wrote {args.sheet} ({args.sheet.stat().st_size / 1024:.0f} KiB)")
        return
    bench([int(s) for s in args.sizes.split(",")], args.count)


if __name__ == "__main__":
    main()
