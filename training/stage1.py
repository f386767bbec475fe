"""Stage 1, transfer learning: the frozen backbone's pooled features, cached once, and a linear head on them.

The head is trained on standardized features and folded back into ``head`` afterwards (see
:func:`fit_head`), so one learning rate works whatever the feature scale of the backbone. The whole run is
described in :mod:`training.pipeline`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from core.vocabulary import SPLITS
from training.checkpoint import TRANSFER_FEATURES, TRANSFER_STATE, load_state, save_state
from training.config import TrainConfig
from training.distributed import DistContext, gather_ordered
from training.evaluation import selection_key, split_metrics
from training.loaders import IndexedDataset, TrainData, shard_loader
from training.models import CxrClassifier
from training.passes import extract_features, progress_bar, recalibrate_batchnorm

log = logging.getLogger(__name__)

__all__ = ["HeadFit", "fit_head", "run_transfer"]


def _head_logits(head: nn.Linear, feats: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        out: np.ndarray = head(torch.from_numpy(feats).float()).double().numpy()
    return out


@dataclass
class HeadFit:
    """The result of :func:`fit_head`: the folded head weights and the training history."""

    weight: torch.Tensor
    bias: torch.Tensor
    best_epoch: int
    history: list[dict[str, Any]]


def _standardizer(train_feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and ONE scale for all channels, ``sigma = sqrt(mean_k var_k)``.

    A single scale keeps the channels' relative magnitudes (per-channel scaling would blow up near-constant
    channels into huge head weights, which fine-tuning then turns into huge logits).
    """
    mu = train_feats.mean(0)
    var = train_feats.var(0, unbiased=False) if train_feats.shape[0] > 1 else torch.zeros_like(mu)
    scale = float(var.mean().sqrt())
    return mu, torch.tensor(scale if scale > 1e-12 else 1.0)


def fit_head(
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray] | None,
    *,
    num_classes: int,
    class_names: list[str],
    epochs: int,
    lr: float,
    weight_decay: float,
    batch_size: int,
    drop_rate: float,
    label_smoothing: float = 0.0,
    seed: int = 0,
    state: dict[str, Any] | None = None,
    on_epoch: Any = None,
    progress: bool = False,
) -> HeadFit:
    """Train a linear head on cached pooled features (stage 1) and fold the standardization into it.

    Trains ``z = ((dropout(f) - mu) / sigma) @ W'.T + b'`` with AdamW and a cosine schedule, then returns
    ``W = W' / sigma``, ``b = b' - W' @ (mu / sigma)`` so that ``f @ W.T + b`` gives the same logits (exact at
    inference, where dropout is the identity). ``state`` resumes from what ``on_epoch(state)`` was given.
    """
    feats = torch.from_numpy(train[0]).float()
    labels = torch.from_numpy(train[1]).long()
    mu, sd = _standardizer(feats)
    k = feats.shape[1]
    gen = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, num_classes)
    with torch.no_grad():  # small init from the seeded generator, independent of the global RNG
        lin.weight.normal_(0, 0.01, generator=gen)
        lin.bias.zero_()
    optimizer = torch.optim.AdamW(lin.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = max(1, math.ceil(len(feats) / batch_size))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs * steps_per_epoch))
    criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)

    def folded() -> tuple[torch.Tensor, torch.Tensor]:
        w = lin.weight.detach() / sd
        b = lin.bias.detach() - lin.weight.detach() @ (mu / sd)
        return w.clone(), b.clone()

    history: list[dict[str, Any]] = []
    start = 0
    best: dict[str, Any] = {"epoch": -1, "key": [-math.inf, -math.inf]}
    best_w, best_b = folded()
    if state:
        lin.load_state_dict(state["head"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start = int(state["epoch"])
        history = list(state["history"])
        best = dict(state["best"])
        best_w, best_b = state["best_weight"], state["best_bias"]
        log.info("stage 1 resumed at head epoch %d/%d", start, epochs)

    probe = nn.Linear(k, num_classes)
    for epoch in progress_bar(
        range(start, epochs), enabled=progress, desc="transfer head", initial=start, total=epochs
    ):
        lin.train()
        # one generator per epoch for the order and the dropout masks: resuming replays the same epoch
        epoch_gen = torch.Generator().manual_seed(seed * 1000 + epoch)
        perm = torch.randperm(len(feats), generator=epoch_gen)
        total = 0.0
        for i in range(0, len(feats), batch_size):
            batch = perm[i : i + batch_size]
            inputs = feats[batch]
            if drop_rate > 0:  # on the raw features, as the model's head does: stage 2 sees the same noise
                keep = torch.bernoulli(torch.full_like(inputs, 1 - drop_rate), generator=epoch_gen)
                inputs = inputs * keep / (1 - drop_rate)
            inputs = (inputs - mu) / sd
            loss = criterion(lin(inputs), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(batch)
        w, b = folded()
        record: dict[str, Any] = {"epoch": epoch, "train_loss": total / max(1, len(feats))}
        if val is not None and val[1].size:
            with torch.no_grad():
                probe.weight.copy_(w)
                probe.bias.copy_(b)
            m = split_metrics(_head_logits(probe, val[0]), val[1], class_names)
            assert m is not None
            record.update(val_loss=m["loss"], val_macro_f1=m["macro_f1"], val_accuracy=m["accuracy"])
            key = list(selection_key(m))
        else:
            key = [float(epoch), 0.0]  # no validation split: the last epoch wins
        history.append(record)
        if key > best["key"]:
            best = {"epoch": epoch, "key": key}
            best_w, best_b = w, b
        if on_epoch is not None:
            on_epoch(
                {
                    "epoch": epoch + 1,
                    "head": lin.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "history": list(history),
                    "best": dict(best),
                    "best_weight": best_w,
                    "best_bias": best_b,
                }
            )
    if epochs == 0:
        return HeadFit(weight=best_w, bias=best_b, best_epoch=-1, history=history)
    return HeadFit(weight=best_w, bias=best_b, best_epoch=int(best["epoch"]), history=history)


def run_transfer(
    model: CxrClassifier,
    datasets: dict[str, IndexedDataset | None],
    *,
    config: TrainConfig,
    data: TrainData,
    device: torch.device,
    ctx: DistContext,
    train_dir: Path,
    state: dict[str, Any] | None,
) -> dict[str, Any]:
    """Stage 1: cache the frozen backbone's pooled features (sharded, gathered), fit the head on them."""
    model.to(device)
    if config.pretrained.strip().lower() == "none":
        # also on resume: the statistics belong to the transfer checkpoint and are recomputed identically
        train_set = datasets["train"]
        assert train_set is not None
        loader = shard_loader(train_set, batch_size=config.batch_size, workers=config.workers, ctx=ctx)
        recalibrate_batchnorm(
            model.backbone,
            loader,
            device=device,
            ctx=ctx,
            max_batches=max(1, 256 // (config.batch_size * ctx.world_size)),
            progress=config.progress,
        )
        log.info("recalibrated the BatchNorm statistics of the randomly initialized backbone")
    model.freeze_backbone(True)
    model.eval()
    features_path = train_dir / TRANSFER_FEATURES
    cached = load_state(features_path) if config.resume else None
    feats: dict[str, tuple[np.ndarray, np.ndarray] | None] = {}
    per_rank: dict[str, list[int]] = {}
    if cached is not None:
        feats = {
            s: (cached[s]["features"].numpy(), cached[s]["labels"].numpy()) if s in cached else None
            for s in SPLITS
        }
        log.info("stage 1: reusing cached features from %s", features_path)
    else:
        for split in SPLITS:
            ds = datasets[split]
            if ds is None or len(ds) == 0:
                feats[split] = None
                continue
            loader = shard_loader(ds, batch_size=config.batch_size, workers=config.workers, ctx=ctx)
            f, y, idx = extract_features(model, loader, device=device, progress=config.progress)
            per_rank[split] = [int(n) for n in ctx.all_gather(len(idx))]
            f, y = gather_ordered(ctx, f, y, indices=idx)
            feats[split] = (f, y)
        if ctx.is_main:
            save_state(
                features_path,
                {
                    s: {"features": torch.from_numpy(v[0]), "labels": torch.from_numpy(v[1])}
                    for s, v in feats.items()
                    if v is not None
                },
            )
    model.cpu()

    def save_head_state(s: dict[str, Any]) -> None:
        if ctx.is_main:
            save_state(train_dir / TRANSFER_STATE, {**s, "done": False})

    train_feats = feats["train"]
    assert train_feats is not None
    fit = fit_head(
        train_feats,
        feats["val"],
        num_classes=len(data.class_names),
        class_names=data.class_names,
        epochs=config.epochs_transfer,
        lr=config.lr_transfer,
        weight_decay=config.weight_decay,
        batch_size=config.batch_size,
        drop_rate=float(model.dropout.p),
        label_smoothing=config.label_smoothing,
        seed=config.seed,
        state=state if state and not state.get("done") else None,
        on_epoch=save_head_state,
        progress=config.progress,
    )
    with torch.no_grad():
        model.head.weight.copy_(fit.weight)
        model.head.bias.copy_(fit.bias)
    ctx.broadcast_module(model.head)  # identical on every rank by construction; make it so bit for bit
    result: dict[str, Any] = {"best_epoch": fit.best_epoch, "history": fit.history}
    for split in ("val", "test"):
        pair = feats[split]
        result[split] = (
            split_metrics(_head_logits(model.head, pair[0]), pair[1], data.class_names) if pair else None
        )
    if per_rank:
        result["feature_samples_per_rank"] = per_rank
    val_m = result["val"] or {}
    log.info(
        "transfer head: best epoch %d of %d, val macro-F1 %s, val loss %s",
        fit.best_epoch + 1, config.epochs_transfer, val_m.get("macro_f1"), val_m.get("loss"),
    )  # fmt: skip
    model.freeze_backbone(False)
    return result
