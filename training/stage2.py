"""Stage 2, fine-tuning: every layer trained from the stage-1 weights, precise BatchNorm after each epoch.

AdamW with linear warmup then cosine decay (:func:`warmup_cosine`), bf16 autocast on CUDA, the head at a
smaller learning rate (:func:`_param_groups`); under ``torchrun`` the model is wrapped in DDP and the train
split sharded by a ``DistributedSampler``. The whole run is described in :mod:`training.pipeline`.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from training.checkpoint import cpu_state, rng_state, set_rng_state
from training.config import TrainConfig
from training.distributed import DistContext, seed_worker
from training.evaluation import selection_key
from training.loaders import IndexedDataset, shard_loader
from training.models import CxrClassifier
from training.passes import autocast, evaluate_split, progress_bar, recalibrate_batchnorm

log = logging.getLogger(__name__)

__all__ = ["EpochStats", "run_stage", "train_one_epoch", "warmup_cosine"]


@dataclass
class EpochStats:
    loss: float
    samples: int
    indices: list[int]


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader[Any],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    *,
    device: torch.device,
    criterion: nn.Module,
    progress: bool = False,
    desc: str = "train",
) -> EpochStats:
    """One pass over ``loader`` (this rank's shard); the scheduler steps per batch."""
    model.train()
    total, count = 0.0, 0
    seen: list[int] = []
    bar = progress_bar(loader, enabled=progress, desc=desc)
    for images, labels, idx in bar:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        with autocast(device):
            logits = model(images)
        loss = criterion(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        total += float(loss.detach()) * len(labels)
        count += len(labels)
        seen.extend(int(i) for i in idx)
        if progress:
            bar.set_postfix(loss=f"{total / count:.4f}")
    return EpochStats(loss=total / max(1, count), samples=count, indices=seen)


def _param_groups(
    model: CxrClassifier, *, lr: float, weight_decay: float, head_lr_factor: float
) -> list[dict[str, Any]]:
    """No weight decay on biases and normalization parameters (1-D tensors); the head at ``lr * head_lr_factor``.

    Why a smaller head LR: pooled post-ReLU features share a large positive mean, and Adam moves every head
    weight by about ``lr`` per step in a correlated direction, so the logits swing by ~``lr * K * mean``
    (K = 1920..2048 channels): at the backbone's LR that undoes the stage-1 head within a few steps.
    """
    head = {id(p) for p in model.head.parameters()}
    groups = []
    for in_head, factor in ((False, 1.0), (True, head_lr_factor)):
        params = [p for p in model.parameters() if p.requires_grad and (id(p) in head) == in_head]
        groups.append(
            {"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay, "lr": lr * factor}
        )
        groups.append({"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, "lr": lr * factor})
    return [g for g in groups if g["params"]]


def warmup_cosine(total_steps: int, warmup_steps: int, *, floor: float = 0.02) -> Any:
    """LR factor: linear warmup to 1 over ``warmup_steps``, cosine decay to ``floor`` at ``total_steps``."""

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return factor


def _train_loader(
    train_set: IndexedDataset,
    *,
    config: TrainConfig,
    device: torch.device,
    ctx: DistContext,
    generator: torch.Generator,
) -> tuple[DataLoader[Any], DistributedSampler[Any] | None]:
    """The shuffled training loader of this rank (``DistributedSampler`` under ``torchrun``) and its sampler."""
    per_rank = math.ceil(len(train_set) / ctx.world_size)
    sampler: DistributedSampler[Any] | None = (
        DistributedSampler(
            train_set, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=config.seed
        )
        if ctx.enabled
        else None
    )
    loader = DataLoader(
        train_set,
        batch_size=config.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        num_workers=config.workers,
        worker_init_fn=seed_worker,
        generator=generator,
        drop_last=per_rank % config.batch_size == 1 and per_rank > 1,  # no 1-sample BatchNorm batch
        pin_memory=device.type == "cuda",
    )
    return loader, sampler


def run_stage(
    model: CxrClassifier,
    *,
    train_set: IndexedDataset,
    val_set: IndexedDataset | None,
    config: TrainConfig,
    class_names: list[str],
    device: torch.device,
    ctx: DistContext,
    state: dict[str, Any] | None = None,
    on_epoch: Any = None,
    bn_set: IndexedDataset | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Stage 2: fine-tune every layer; returns the selected weights (CPU state dict) and the stage record.

    ``state`` (from ``finetune_state.pt``) continues an interrupted stage; ``on_epoch(state)`` is called by
    every rank after each epoch with what a later resume needs.

    Precise BatchNorm (``config.precise_bn_images`` > 0): after every epoch the backbone's BatchNorm running
    statistics are recomputed as a plain average over that many images of ``bn_set`` (default
    ``train_set``; pass the unaugmented train split), with the epoch's final weights. The running averages
    that train mode keeps (momentum 0.1, batches of a few images, weights that moved under them) lag behind
    the weights; evaluating, selecting and saving with them scores a network that does not exist.
    """
    model.freeze_backbone(False)
    model.to(device)
    net: nn.Module = model
    if ctx.enabled:
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    progress = config.progress and ctx.is_main
    epochs = config.epochs_finetune
    generator = torch.Generator().manual_seed(config.seed)
    loader, sampler = _train_loader(train_set, config=config, device=device, ctx=ctx, generator=generator)
    bn_loader = shard_loader(
        bn_set if bn_set is not None else train_set,
        batch_size=config.batch_size,
        workers=config.workers,
        ctx=ctx,
    )
    steps_per_epoch = max(1, len(loader))
    assert config.lr_finetune is not None  # resolved by TrainConfig
    optimizer = torch.optim.AdamW(
        _param_groups(
            model,
            lr=config.lr_finetune,
            weight_decay=config.weight_decay,
            head_lr_factor=config.head_lr_factor,
        ),
        lr=config.lr_finetune,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(epochs * steps_per_epoch, round(config.warmup_epochs * steps_per_epoch))
    )
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)

    start = 0
    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"epoch": -1, "key": [-math.inf, -math.inf]}
    best_state = cpu_state(model)
    shards: list[dict[str, Any]] = []
    if state:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        start = int(state["epoch"])
        history = list(state["history"])
        best = dict(state["best"])
        best_state = state["best_model"]
        log.info("stage 2 resumed at epoch %d/%d", start, epochs)

    for epoch in range(start, epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        generator.manual_seed(config.seed * 1000 + epoch)  # the epoch's order does not depend on resuming
        t0 = time.perf_counter()
        stats = train_one_epoch(
            net,
            loader,
            optimizer,
            scheduler,
            device=device,
            criterion=criterion,
            progress=progress,
            desc=f"fine-tune {epoch + 1}/{epochs}",
        )
        ctx.average_buffers(model)
        if config.precise_bn_images > 0:
            recalibrate_batchnorm(
                model.backbone,
                bn_loader,
                device=device,
                ctx=ctx,
                max_batches=max(
                    1, math.ceil(config.precise_bn_images / (config.batch_size * ctx.world_size))
                ),
            )
        gathered = ctx.all_gather({"rank": ctx.rank, "samples": stats.samples, "indices": stats.indices})
        if epoch == start:
            shards = gathered
        val = evaluate_split(
            model,
            val_set,
            class_names=class_names,
            batch_size=config.batch_size,
            workers=config.workers,
            device=device,
            ctx=ctx,
        )
        record: dict[str, Any] = {
            "epoch": epoch,
            "train_loss": float(np.mean(ctx.all_gather(stats.loss))),
            "seconds": time.perf_counter() - t0,
        }
        if val is not None:
            record.update(val_loss=val["loss"], val_macro_f1=val["macro_f1"], val_accuracy=val["accuracy"])
            key = list(selection_key(val))
        else:
            key = [float(epoch), 0.0]
        history.append(record)
        if key > best["key"]:
            best = {"epoch": epoch, "key": key}
            best_state = cpu_state(model)
        log.info("fine-tune epoch %d/%d: %s", epoch + 1, epochs, _fmt(record))
        if on_epoch is not None:
            on_epoch(
                {
                    "epoch": epoch + 1,
                    "model": cpu_state(model),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "rng": rng_state(),
                    "history": list(history),
                    "best": dict(best),
                    "best_model": best_state,
                }
            )
    if epochs == 0:
        best_state = cpu_state(model)
    return best_state, {"best_epoch": int(best["epoch"]), "history": history, "shards": shards}


def _fmt(record: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items())
