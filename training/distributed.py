"""Where this process sits in a training run: rank and world size, the process group, the device, the seeds.

Under ``torchrun`` (``WORLD_SIZE`` > 1) every rank gets a disjoint shard of each split, features and
predictions are gathered (:func:`gather_ordered`), and BatchNorm running statistics are averaged across
ranks (:meth:`DistContext.average_buffers`); without it a :class:`DistContext` is a single rank and every
collective is the identity.
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from core.errors import InputError

log = logging.getLogger(__name__)

__all__ = [
    "DistContext",
    "gather_ordered",
    "resolve_device",
    "seed_everything",
    "seed_worker",
    "setup_distributed",
]


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` without distribution."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_module(self, module: nn.Module) -> None:
        """Copy rank 0's parameters and buffers to every rank."""
        if self.enabled:
            for t in [*module.parameters(), *module.buffers()]:
                dist.broadcast(t.data, src=0)

    def average_buffers(self, module: nn.Module) -> None:
        """Average floating-point buffers (BatchNorm running stats) across ranks; take rank 0's others."""
        if not self.enabled:
            return
        for buf in module.buffers():
            if buf.is_floating_point():
                dist.all_reduce(buf.data, op=dist.ReduceOp.SUM)
                buf.data.div_(self.world_size)
            else:
                dist.broadcast(buf.data, src=0)


def resolve_device(choice: str, ctx: DistContext) -> torch.device:
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda":
        if not torch.cuda.is_available():
            raise InputError(
                "--device cuda was asked for but CUDA is not available; valid options: auto, cpu"
            )
        return torch.device("cuda", ctx.local_rank)
    return torch.device("cpu")


def setup_distributed(device_choice: str) -> DistContext:
    """Join the process group under ``torchrun`` (``WORLD_SIZE`` > 1): gloo on CPU, nccl on CUDA."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext()
    ctx = DistContext(
        rank=int(os.environ["RANK"]), world_size=world_size, local_rank=int(os.environ.get("LOCAL_RANK", "0"))
    )
    device = resolve_device(device_choice, ctx)
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    log.info("rank %d/%d joined (%s)", ctx.rank, ctx.world_size, dist.get_backend())
    return ctx


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch, and ask torch for deterministic algorithms where it has them."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    if torch.backends.cudnn.is_available():
        torch.backends.cudnn.benchmark = False


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn`` of the data loaders: seed NumPy and Python from the worker's torch seed."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def gather_ordered(ctx: DistContext, *arrays: np.ndarray, indices: np.ndarray) -> list[np.ndarray]:
    """Concatenate every rank's shard and order the rows by sample index."""
    parts = ctx.all_gather((indices, *arrays))
    idx = np.concatenate([p[0] for p in parts])
    order = np.argsort(idx, kind="stable")
    return [np.concatenate([p[i + 1] for p in parts])[order] for i in range(len(arrays))]
