"""``cxr-drift train``: two-stage training (transfer, then fine-tuning) of one architecture and its export.

Under ``torchrun`` every rank runs this command; only rank 0 prints.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from core.registry import get_arch, list_archs
from core.vocabulary import CHECKPOINTS
from training.config import DEVICE_CHOICES, ON_ERROR_CHOICES, TrainConfig
from training.pipeline import train_pair

__all__ = ["configure_parser", "run"]


def configure_parser(p: argparse.ArgumentParser) -> None:
    d = TrainConfig(arch="", data="", out="")
    p.add_argument("--arch", required=True, help=f"architecture: {', '.join(list_archs())}")
    p.add_argument("--data", required=True, type=Path, help="ImageFolder directory or CSV manifest")
    p.add_argument("--out", required=True, type=Path, help="output folder (model pair + train/)")
    p.add_argument(
        "--input-size", type=int, default=None, help="input size in px (default: the arch's native)"
    )
    p.add_argument(
        "--pretrained",
        default=d.pretrained,
        help="imagenet (timm hub or its cache), none (random init), or PATH to a backbone state dict",
    )
    p.add_argument(
        "--epochs-transfer", type=int, default=d.epochs_transfer, help="head epochs on cached features"
    )
    p.add_argument("--epochs-finetune", type=int, default=d.epochs_finetune)
    p.add_argument("--lr-transfer", type=float, default=d.lr_transfer)
    p.add_argument(
        "--lr-finetune",
        type=float,
        default=None,
        help="stage-2 LR (default: 3e-4 from pretrained weights, 1e-3 with --pretrained none)",
    )
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument(
        "--head-lr-factor", type=float, default=d.head_lr_factor, help="stage-2 head LR / --lr-finetune"
    )
    p.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", choices=DEVICE_CHOICES, default=d.device)
    p.add_argument("--workers", type=int, default=d.workers, help="DataLoader worker processes")
    p.add_argument("--on-error", choices=ON_ERROR_CHOICES, default=d.on_error, help="unreadable images")
    p.add_argument("--limit", type=int, default=None, help="at most N images per split (quick runs)")
    p.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="light augmentation in stage 2 (default: on from pretrained weights, off with --pretrained none)",
    )
    p.add_argument(
        "--precise-bn-images",
        type=int,
        default=d.precise_bn_images,
        help="recompute BatchNorm statistics on N unaugmented train images after each fine-tune epoch (0: off)",
    )
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--no-export", dest="export", action="store_false", help="skip ONNX export and manifest")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    config = TrainConfig(
        arch=get_arch(args.arch).name,
        data=str(args.data),
        out=str(args.out),
        input_size=args.input_size,
        pretrained=args.pretrained,
        epochs_transfer=args.epochs_transfer,
        epochs_finetune=args.epochs_finetune,
        lr_transfer=args.lr_transfer,
        lr_finetune=args.lr_finetune,
        batch_size=args.batch_size,
        weight_decay=args.weight_decay,
        warmup_epochs=args.warmup_epochs,
        head_lr_factor=args.head_lr_factor,
        seed=args.seed,
        device=args.device,
        workers=args.workers,
        on_error=args.on_error,
        limit=args.limit,
        augment=args.augment,
        precise_bn_images=args.precise_bn_images,
        resume=args.resume,
        export=args.export,
        progress=args.progress,
    )
    out = train_pair(config)
    if int(os.environ.get("RANK", "0")) == 0:
        metrics = json.loads((out / "train" / "metrics.json").read_text())
        for stage in CHECKPOINTS:
            test = (metrics.get(stage) or {}).get("test") or {}
            if test:
                print(
                    f"{config.arch} {stage}: test accuracy {test['accuracy']:.3f}, "
                    f"macro-F1 {test['macro_f1']:.3f}, AUC {test['auc_ovr']['macro']}"
                )
        print(f"wrote {out}")
    return 0
