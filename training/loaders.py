"""The training data: the dataset at ``--data`` indexed and split, its per-split datasets and their loaders.

Datasets yield ``(image, label, index)`` so that shards and gathered predictions can be traced to samples;
:func:`shard_loader` gives this rank every ``world_size``-th sample of a split, in order (feature
extraction, evaluation and BatchNorm statistics; stage 2's training loader is in :mod:`training.stage2`).
"""

from __future__ import annotations

import copy
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from core.dataset import assign_splits, load_index
from core.errors import InputError
from core.registry import ArchSpec
from core.vocabulary import SPLITS
from training.config import TrainConfig
from training.data import ImageDataset
from training.distributed import DistContext, seed_worker

log = logging.getLogger(__name__)

__all__ = [
    "IndexedDataset",
    "TrainData",
    "augmented",
    "limit_per_split",
    "load_data",
    "make_dataset",
    "parity_inputs",
    "shard_loader",
]


@dataclass
class TrainData:
    """The samples of each split, the class names and what identifies the dataset."""

    class_names: list[str]
    splits: dict[str, list[Any]]
    fingerprint: str
    source: str
    counts: dict[str, Any] = field(default_factory=dict)


class IndexedDataset(Dataset[tuple[torch.Tensor, int, int]]):
    """Yield ``(image, label, index)`` so shards and gathered predictions can be traced to samples."""

    def __init__(self, base: Any) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        image, label = self.base[i]
        return image, int(label), i


def limit_per_split(samples: Sequence[Any], limit: int | None, *, seed: int) -> list[Any]:
    """At most ``limit`` samples, drawn round-robin over the classes in a seeded order (keeps every class)."""
    if limit is None or len(samples) <= limit:
        return list(samples)
    rng = random.Random(seed)
    by_class: dict[int, list[Any]] = {}
    for s in samples:
        by_class.setdefault(int(s.label), []).append(s)
    for group in by_class.values():
        rng.shuffle(group)
    picked: list[Any] = []
    queues = [by_class[k] for k in sorted(by_class)]
    while len(picked) < limit:
        for q in queues:
            if q and len(picked) < limit:
                picked.append(q.pop())
    return picked


def load_data(config: TrainConfig) -> TrainData:
    """Index the dataset at ``config.data`` (ImageFolder tree or CSV manifest) and split it.

    Samples without a split of their own are assigned one (``val_fraction``/``test_fraction``, seeded).
    """
    source = Path(config.data).expanduser()
    if not source.exists():
        raise FileNotFoundError(
            f"data not found: {source} (expected an ImageFolder directory or a CSV manifest; "
            "create synthetic data with `cxr-drift synth --out DIR`)"
        )
    index = load_index(source, on_error=config.on_error, validate=True)  # type: ignore[arg-type]
    if not index.has_splits:
        log.info(
            "assigning train/val/test splits (val %.2f, test %.2f)", config.val_fraction, config.test_fraction
        )
        index = assign_splits(index, val=config.val_fraction, test=config.test_fraction, seed=config.seed)
    splits = {
        name: limit_per_split(index.split(name), config.limit, seed=config.seed + i)
        for i, name in enumerate(SPLITS)
    }
    if not splits["train"]:
        raise InputError(f"the train split of {source} is empty; counts per split: {index.counts()}")
    train_classes = {int(s.label) for s in splits["train"]}
    missing = [index.class_names[c] for c in range(len(index.class_names)) if c not in train_classes]
    if missing:
        raise InputError(f"classes with no training image in {source}: {missing}")
    skipped = index.skipped
    if skipped:
        log.warning("skipped %d unreadable images (first: %s)", len(skipped), skipped[0])
    counts = {name: len(v) for name, v in splits.items()}
    log.info(
        "data %s: %d classes %s, samples per split %s",
        source,
        len(index.class_names),
        index.class_names,
        counts,
    )
    return TrainData(
        class_names=list(index.class_names),
        splits=splits,
        fingerprint=str(index.fingerprint()),
        source=str(source),
        counts={"per_split": counts, "index": index.counts(), "skipped": len(skipped)},
    )


def parity_inputs(data: TrainData, *, spec: ArchSpec, input_size: int, count: int = 4) -> np.ndarray | None:
    """A few preprocessed validation (else test, else train) images for the export's ONNX parity check."""
    samples = next((data.splits[s] for s in ("val", "test", "train") if data.splits.get(s)), [])[:count]
    if not samples:
        return None
    dataset = make_dataset(samples, spec=spec, input_size=input_size, augment=False)
    return torch.stack([dataset[i][0] for i in range(len(dataset))]).numpy()


def make_dataset(samples: Sequence[Any], *, spec: ArchSpec, input_size: int, augment: bool) -> IndexedDataset:
    return IndexedDataset(
        ImageDataset(list(samples), input_size=input_size, mean=spec.mean, std=spec.std, augment=augment)
    )


def augmented(dataset: IndexedDataset) -> IndexedDataset:
    """The same samples with augmentation on, sharing the decoded-image cache filled in stage 1."""
    base = copy.copy(dataset.base)
    base.augment = True
    return IndexedDataset(base)


def shard_loader(
    dataset: IndexedDataset, *, batch_size: int, workers: int, ctx: DistContext
) -> DataLoader[Any]:
    """Every ``world_size``-th sample from ``rank`` on, in order (no padding: gathered results are exact)."""
    shard = Subset(dataset, list(range(ctx.rank, len(dataset), ctx.world_size)))
    return DataLoader(
        shard, batch_size=batch_size, shuffle=False, num_workers=workers, worker_init_fn=seed_worker
    )
