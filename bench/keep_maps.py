"""Maps for review (CXR_DRIFT_KEEP_MAPS): what keeping the 16x16 maps adds to ``POST /predict`` and to each
audit record, measured side by side in one run.

For each architecture at its native input size (random-init models exported to a temporary folder, ONNX, CPU),
one 512 px radiograph, median of ``--repeats`` interleaved rounds after a warm-up:

  (a) the drift report as ``/predict`` computes it with KEEP_MAPS=none and maps=none (no maps drawn);
  (b) the same report with the maps drawn at the input size (what KEEP_MAPS=flagged|all makes the engine do),
      then the payload section (``engine.review_maps.review_maps(..., "all")``: box-downsample, quantise,
      base64) and its canonical JSON, as the audit append hashes it.

Bytes: the canonical JSON of ``payload["maps"]`` for one model (2 methods x 2 checkpoints; 4 more maps when
the checkpoints disagree), and per map.

    python bench/keep_maps.py [--archs resnet50v2 inceptionv3] [--repeats 15] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.drift_engine import _radiograph


def bench_arch(name: str, *, repeats: int, warmup: int, threads: int, folder: Path) -> dict[str, float]:
    import torch

    from core.registry import get_arch
    from engine.report import drift_report
    from engine.review_maps import review_maps
    from engine.runtime import ModelPair
    from service.audit.chain import canonical_json
    from training.export import export_pair
    from training.models import build_model

    size = get_arch(name).native_input_size
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
    gray = _radiograph(512)

    def kept() -> str:
        report = drift_report(pair, gray, include_maps=True)
        return canonical_json(review_maps([report], "all"))

    def encode_only(report: object) -> str:
        return canonical_json(review_maps([report], "all"))  # type: ignore[list-item]

    with_maps = drift_report(pair, gray, include_maps=True)
    runs = {
        "a": lambda: drift_report(pair, gray),
        "b": kept,
        "e": lambda: encode_only(with_maps),
    }
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):
        for key, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    a, b, e = (1000.0 * statistics.median(times[k]) for k in ("a", "b", "e"))
    text = kept()
    n_maps = sum(len(c) for m in review_maps([with_maps], "all")["models"].values() for c in m.values())  # type: ignore[index]
    return {"size": size, "a": a, "b": b, "encode": e, "bytes": len(text), "maps": n_maps}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--archs", nargs="+", default=["resnet50v2", "inceptionv3"])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="ORT intra-op and torch threads")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    print(
        "| arch | px | (a) no maps ms | (b) maps kept ms | b - a ms | encode ms | bytes/model | maps | bytes/map |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.archs:
            print(f"benchmarking {name} ...", file=sys.stderr, flush=True)
            r = bench_arch(
                name, repeats=args.repeats, warmup=args.warmup, threads=args.threads, folder=Path(tmp)
            )
            print(
                f"| {name} | {r['size']:.0f} | {r['a']:.1f} | {r['b']:.1f} | {r['b'] - r['a']:.1f} | "
                f"{r['encode']:.2f} | {r['bytes']:.0f} | {r['maps']:.0f} | {r['bytes'] / r['maps']:.0f} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
