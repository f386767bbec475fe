"""Passes of a model over a data loader: pooled features, logits and split metrics, BatchNorm statistics.

Each pass runs over this rank's shard (see :func:`training.loaders.shard_loader`) under bf16 autocast on
CUDA, with a progress bar only where asked; :func:`evaluate_split` gathers the shards' predictions.
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from training.distributed import DistContext, gather_ordered
from training.evaluation import split_metrics
from training.loaders import IndexedDataset, shard_loader
from training.models import CxrClassifier

log = logging.getLogger(__name__)

__all__ = [
    "autocast",
    "evaluate",
    "evaluate_split",
    "extract_features",
    "progress_bar",
    "recalibrate_batchnorm",
]


def progress_bar(iterable: Any, *, enabled: bool, **kwargs: Any) -> Any:
    return tqdm(iterable, disable=not enabled, leave=False, dynamic_ncols=True, **kwargs)


def autocast(device: torch.device) -> AbstractContextManager[Any]:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


@torch.inference_mode()
def extract_features(
    model: CxrClassifier, loader: DataLoader[Any], *, device: torch.device, progress: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pooled target-layer features ``pool(ReLU(backbone(x)))`` (n, K) float32, labels and indices."""
    model.eval()
    feats, labels, indices = [], [], []
    for images, y, idx in progress_bar(loader, enabled=progress, desc="features"):
        with autocast(device):
            f = model.pool(model.forward_features(images.to(device, non_blocking=True))).flatten(1)
        feats.append(f.float().cpu().numpy())
        labels.append(y.numpy())
        indices.append(idx.numpy())
    k = model.num_features
    return (
        np.concatenate(feats) if feats else np.zeros((0, k), np.float32),
        np.concatenate(labels) if labels else np.zeros(0, np.int64),
        np.concatenate(indices) if indices else np.zeros(0, np.int64),
    )


@torch.no_grad()
def recalibrate_batchnorm(
    backbone: nn.Module,
    loader: DataLoader[Any],
    *,
    device: torch.device,
    ctx: DistContext,
    max_batches: int | None = None,
    progress: bool = False,
) -> int:
    """Replace BatchNorm running statistics by their average over ``loader`` (train-mode forward, no grad).

    Used before freezing a *randomly initialized* backbone: its running stats (mean 0, var 1) describe no
    data, so eval-mode features (stage 1) would differ wildly from train-mode ones (stage 2). ImageNet
    weights keep their own statistics. ``max_batches`` caps the cost (a few hundred images estimate the
    statistics well). Returns the number of BatchNorm layers updated.
    """
    norms = [m for m in backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch weighs the same
    was_training = backbone.training
    backbone.train()
    for batch, (images, _, _) in enumerate(
        progress_bar(loader, enabled=progress, desc="BatchNorm statistics")
    ):
        if max_batches is not None and batch >= max_batches:
            break
        with autocast(device):
            backbone.forward_features(images.to(device, non_blocking=True))  # type: ignore[operator]
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    backbone.train(was_training)
    ctx.average_buffers(backbone)
    log.debug("recalibrated %d BatchNorm layers", len(norms))
    return len(norms)


@torch.inference_mode()
def evaluate(
    model: nn.Module, loader: DataLoader[Any], *, device: torch.device, progress: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Logits (n, C) float64, labels and sample indices of this rank's shard, in eval mode."""
    model.eval()
    logits, labels, indices = [], [], []
    for images, y, idx in progress_bar(loader, enabled=progress, desc="eval"):
        with autocast(device):
            out = model(images.to(device, non_blocking=True))
        logits.append(out.float().cpu().double().numpy())
        labels.append(y.numpy())
        indices.append(idx.numpy())
    if not logits:
        return np.zeros((0, 0)), np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(logits), np.concatenate(labels), np.concatenate(indices)


def evaluate_split(
    model: nn.Module,
    dataset: IndexedDataset | None,
    *,
    class_names: list[str],
    batch_size: int,
    workers: int,
    device: torch.device,
    ctx: DistContext,
    progress: bool = False,
) -> dict[str, Any] | None:
    """Metrics of ``model`` on a whole split: each rank evaluates its shard, the predictions are gathered."""
    if dataset is None or len(dataset) == 0:
        return None
    loader = shard_loader(dataset, batch_size=batch_size, workers=workers, ctx=ctx)
    logits, labels, idx = evaluate(model, loader, device=device, progress=progress)
    if logits.size == 0:
        logits = np.zeros((0, len(class_names)))
    logits, labels = gather_ordered(ctx, logits, labels, indices=idx)
    return split_metrics(logits, labels, class_names)
