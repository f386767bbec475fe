"""Small model pairs for tests: random-init "transfer" weights and a perturbed "fine-tuned" copy, exported."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from training.models import CxrClassifier, build_model

CLASS_NAMES = [
    "normal",
    "lobar_consolidation",
    "bilateral_lower_zone",
    "diffuse_patchy",
    "upper_zone_nodules",
]
SMALL_SIZE = {"densenet201": 64, "resnet50v2": 64, "inceptionv3": 96}


def calibrate_batchnorm(model: CxrClassifier, *, size: int, seed: int = 0, batches: int = 2) -> None:
    """Set BatchNorm running statistics from a few random batches, as training would.

    A random-init timm backbone keeps running_var = 1, so activations explode through the depth (1e8 in
    Inception-v3); real checkpoints never look like that.
    """
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.rand(4, 3, size, size, generator=gen) * 4 - 2)
    model.eval()


def make_pair(arch: str, *, seed: int = 0, num_classes: int = 5) -> tuple[CxrClassifier, CxrClassifier]:
    """Two checkpoints of ``arch`` that differ the way a fine-tune does: every weight moved a little."""
    torch.manual_seed(seed)
    transfer = build_model(arch, num_classes).eval()
    calibrate_batchnorm(transfer, size=SMALL_SIZE[arch], seed=seed)
    finetuned = copy.deepcopy(transfer)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in finetuned.parameters():
            p.add_(0.05 * p.abs().mean() * torch.randn(p.shape, generator=gen))
        finetuned.head.weight.mul_(3.0)
    return transfer, finetuned.eval()


def export_small_pair(arch: str, out_dir: Path, *, seed: int = 0) -> Path:
    from training.export import export_pair

    transfer, finetuned = make_pair(arch, seed=seed)
    return export_pair(
        transfer,
        finetuned,
        out_dir=out_dir,
        class_names=CLASS_NAMES,
        input_size=SMALL_SIZE[arch],
        metrics={"transfer": {"accuracy": 0.5}, "finetuned": {"accuracy": 0.6}},
        dataset={"source": "tests", "fingerprint": "0" * 64},
    )
