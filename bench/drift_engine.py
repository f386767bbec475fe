"""Drift engine benchmark: what the closed-form drift report costs next to two bare forwards and next to the
naive pytorch-grad-cam report, measured side by side in one run.

For each architecture at its native input size (random-init models, exported with
``training.export.export_pair`` to a temporary folder), on the CPU:

  (a) two bare ONNX Runtime forwards (transfer + fine-tuned) of one preprocessed image;
  (b) the fast drift report: preprocess, the same two forwards, closed-form LayerCAM + GradCAM++ for both
      checkpoints, every metric;
  (c) the naive report: pytorch-grad-cam LayerCAM + GradCAM++ on both torch checkpoints (4 calls, each a
      forward + backward), then the same metrics.

Median of ``--repeats`` interleaved rounds after ``--warmup`` (the naive report every other round). Goal: b/a <= 1.3 and c/b >= 5 for every architecture.

    python bench/drift_engine.py [--archs densenet201 resnet50v2] [--repeats 10] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _radiograph(size: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:size, :size] / size
    lungs = np.exp(-(((cols - 0.3) / 0.15) ** 2 + ((rows - 0.5) / 0.3) ** 2))
    lungs += np.exp(-(((cols - 0.7) / 0.15) ** 2 + ((rows - 0.5) / 0.3) ** 2))
    image = 0.7 - 0.4 * lungs + 0.05 * rng.standard_normal((size, size))
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def bench_arch(name: str, *, repeats: int, warmup: int, threads: int, folder: Path) -> dict[str, float]:
    import torch

    from core.preprocess import preprocess
    from core.registry import get_arch
    from engine.report import drift_report
    from engine.runtime import ModelPair
    from training.export import export_pair
    from training.models import build_model

    spec = get_arch(name)
    size = spec.native_input_size
    torch.manual_seed(0)
    transfer = build_model(name, 5).eval()
    finetuned = build_model(name, 5).eval()
    with torch.no_grad():
        finetuned.load_state_dict(transfer.state_dict())
        for p in finetuned.parameters():
            p.add_(0.05 * p.abs().mean() * torch.randn_like(p))
    classes = ["normal", "lobar_consolidation", "peripheral_opacities", "diffuse_opacity", "upper_nodules"]
    out = export_pair(transfer, finetuned, out_dir=folder / name, class_names=classes, input_size=size)
    pair = ModelPair.load(out, threads=threads)
    torch_pair = ModelPair.load(out, backend="torch", threads=threads)
    gray = _radiograph(512)
    batch = preprocess(gray, input_size=size, mean=pair.mean, std=pair.std)[None]

    # interleaved, so that load changes on a shared machine hit (a), (b) and (c) alike
    runs = {
        "a": lambda: pair.forward(batch),
        "b": lambda: drift_report(pair, gray),
        "c": lambda: drift_report(torch_pair, gray, attribution="reference"),
    }
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for i in range(repeats):
        for key, fn in runs.items():
            if key == "c" and i % 2:  # the naive report is slow: every other round
                continue
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    a, b, c = (1000.0 * statistics.median(times[k]) for k in ("a", "b", "c"))
    stages = drift_report(pair, gray).timings_ms
    return {"size": size, "a": a, "b": b, "c": c, **{f"stage_{k}": v for k, v in stages.items()}}


def main(argv: list[str] | None = None) -> int:
    from core.registry import list_archs

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--archs", nargs="+", default=list_archs())
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="ORT intra-op and torch threads")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.archs:
            print(f"benchmarking {name} ...", file=sys.stderr, flush=True)
            rows.append(
                (
                    name,
                    bench_arch(
                        name, repeats=args.repeats, warmup=args.warmup, threads=args.threads, folder=Path(tmp)
                    ),
                )
            )

    header = f"{'arch':<12} {'px':>4} {'(a) 2 fwd ms':>13} {'(b) fast ms':>12} {'(c) naive ms':>13} {'b/a':>6} {'c/b':>6}"
    print(header)
    print("-" * len(header))
    ok = True
    for name, r in rows:
        ba, cb = r["b"] / r["a"], r["c"] / r["b"]
        ok &= ba <= 1.3 and cb >= 5.0
        print(
            f"{name:<12} {int(r['size']):>4} {r['a']:>13.1f} {r['b']:>12.1f} {r['c']:>13.1f} {ba:>6.2f} {cb:>6.1f}"
        )
    print()
    print("fast report stages (ms, one run): ")
    for name, r in rows:
        stages = ", ".join(
            f"{k.removeprefix('stage_')} {v:.1f}" for k, v in r.items() if k.startswith("stage_")
        )
        print(f"  {name}: {stages}")
    print(f"\ngoal b/a <= 1.3 and c/b >= 5 for every architecture: {'met' if ok else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
