"""``cxr-drift demo``: the one-command tour.

On first run: synthetic chest radiographs -> two-stage training of a demo model pair for every registered
architecture at a reduced input size (random-init backbones: no ImageNet weights can be fetched here) ->
drift thresholds calibrated on the validation split -> an audit database with a fresh API key -> the API on
127.0.0.1:8000. A second run verifies and reuses what is there and serves within seconds.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["DEMO_INPUT_SIZE", "configure_parser", "prepare", "run"]

# Reduced input sizes that keep the demo to minutes on 2 CPU cores; Inception-v3 needs >= 139 px for a
# 3x3 feature grid (its native size is 299). With random-init backbones, train's --pretrained none defaults
# apply (stage 2 from scratch: LR 1e-3, no augmentation, precise BatchNorm statistics).
DEMO_INPUT_SIZE = {"densenet201": 128, "resnet50v2": 128, "inceptionv3": 160}
# 600 images (420 train / 90 val / 90 test): stage 2 from scratch needs the training images more than it
# needs epochs; 160 px sources already exceed every demo input size.
DEMO_N = 600
DEMO_IMAGE_SIZE = 160


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", type=Path, default=Path("demo"), help="working folder (default ./demo)")
    p.add_argument("--n", type=int, default=DEMO_N, help=f"synthetic images to generate (default {DEMO_N})")
    p.add_argument(
        "--image-size",
        type=int,
        default=DEMO_IMAGE_SIZE,
        help=f"synthetic image size in px (default {DEMO_IMAGE_SIZE})",
    )
    p.add_argument("--archs", default="all", help="comma-separated architectures (default: all registered)")
    p.add_argument("--epochs-transfer", type=int, default=None, help="stage-1 epochs (default: train's)")
    p.add_argument("--epochs-finetune", type=int, default=None, help="stage-2 epochs (default: train's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--retrain", action="store_true", help="train again even if valid model pairs exist")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--no-serve", action="store_true", help="prepare everything, print the key, do not serve")


def _archs(choice: str) -> list[str]:
    from core.registry import get_arch, list_archs

    if choice == "all":
        return list_archs()
    return [get_arch(name.strip()).name for name in choice.split(",") if name.strip()]


def _pair_is_usable(folder: Path) -> tuple[bool, str]:
    from core.manifest import read_manifest, verify_files

    if not (folder / "manifest.json").is_file():
        return False, "not trained yet"
    try:
        manifest = read_manifest(folder)
        verify_files(folder, manifest)
    except (ValueError, OSError) as exc:  # ArtifactError is a ValueError
        return False, str(exc)
    if not manifest.get("drift_thresholds"):
        return False, "drift thresholds not calibrated"
    return True, "ok"


def prepare(args: argparse.Namespace) -> tuple[Path, Path, Path]:
    """Make sure data, trained and calibrated pairs exist under ``args.dir``; return (data, artifacts, sample)."""
    from engine.calibrate import calibrate_folder
    from training.config import TrainConfig
    from training.pipeline import train_pair
    from training.synth import generate_dataset

    archs = _archs(args.archs)  # an unknown name fails here, before any work
    root: Path = args.dir
    data = root / "data"
    artifacts = root / "artifacts"
    manifest_csv = data / "manifest.csv"
    if not manifest_csv.is_file():
        print(f"[demo] generating {args.n} synthetic chest radiographs in {data} ...", flush=True)
        generate_dataset(data, n=args.n, size=args.image_size, seed=args.seed, overwrite=True, progress=True)
    else:
        print(f"[demo] reusing synthetic data in {data}", flush=True)

    for arch in archs:
        folder = artifacts / arch
        usable, why = (False, "--retrain") if args.retrain else _pair_is_usable(folder)
        if usable:
            print(f"[demo] {arch}: reusing verified model pair in {folder}", flush=True)
            continue
        print(f"[demo] {arch}: training a demo model pair ({why}) ...", flush=True)
        started = time.perf_counter()
        if folder.exists():
            shutil.rmtree(folder)
        overrides: dict[str, Any] = {}
        if args.epochs_transfer is not None:
            overrides["epochs_transfer"] = args.epochs_transfer
        if args.epochs_finetune is not None:
            overrides["epochs_finetune"] = args.epochs_finetune
        config = TrainConfig(
            arch=arch,
            data=str(data),
            out=str(folder),
            input_size=DEMO_INPUT_SIZE.get(arch),
            pretrained="none",
            seed=args.seed,
            device="cpu",
            **overrides,
        )
        train_pair(config)
        thresholds = calibrate_folder(folder, data, split="val")
        manifest = json.loads((folder / "manifest.json").read_text())
        accs = {
            name: float(manifest["checkpoints"][name]["metrics"].get("accuracy", float("nan")))
            for name in ("transfer", "finetuned")
        }
        print(
            f"[demo] {arch}: done in {time.perf_counter() - started:.0f} s; test accuracy "
            f"transfer {accs['transfer']:.3f}, fine-tuned {accs['finetuned']:.3f}; drift thresholds from "
            f"{thresholds['n']} validation images ({thresholds['subset']})",
            flush=True,
        )

    sample = root / "sample.png"
    if not sample.is_file():
        from core.dataset import load_index

        index = load_index(data)
        test = index.split("test")
        chosen = next((s for s in test if index.class_names[s.label] != "normal"), test[0])
        shutil.copyfile(chosen.path, sample)
    return data, artifacts, sample


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from service.app.keys import create_key
    from service.app.main import create_app
    from service.app.settings import Settings
    from service.audit.db import make_engine, upgrade

    _, artifacts, sample = prepare(args)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    database_url = f"sqlite:///{(args.dir / 'audit.db').resolve()}"
    upgrade(database_url)
    engine = make_engine(database_url)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%f")
    key = create_key(engine, name=f"demo-{stamp}", role="admin")
    engine.dispose()

    base = f"http://{args.host}:{args.port}"
    print(
        "\n[demo] ready. API key (role admin, shown once):\n"
        f"  {key}\n\n"
        "Try it:\n"
        f"  curl -s -H 'X-API-Key: {key}' -F file=@{sample} {base}/predict\n"
        f"  curl -s -H 'X-API-Key: {key}' '{base}/audit/summary?group_by=model&group_by=method'\n"
        f"  curl -s -H 'X-API-Key: {key}' {base}/audit/verify\n"
        f"  open {base}/docs\n",
        flush=True,
    )
    if args.no_serve:
        return 0
    settings = Settings(
        artifacts_dir=artifacts,
        database_url=database_url,
        host=args.host,
        port=args.port,
        migrate_on_start=False,
    )
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info")
    return 0
