"""The files a training run writes and resumes from, and the state that goes into them.

Under ``DIR/train``: ``config.json``, ``metrics.json`` and the resume state per stage
(:data:`TRANSFER_STATE`, :data:`TRANSFER_FEATURES`, :data:`FINETUNE_STATE`; tensors and primitive
containers only, loaded with ``weights_only=True``); the checkpoints themselves are safetensors files in
``DIR``. Every file is written to a temporary name and then renamed, so an interrupted run never leaves a
half-written one.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from core.errors import InputError, UsageError
from training.config import TrainConfig, config_differences

__all__ = [
    "FINETUNE_STATE",
    "TRANSFER_FEATURES",
    "TRANSFER_STATE",
    "check_resume",
    "cpu_state",
    "load_json",
    "load_state",
    "rng_state",
    "save_safetensors",
    "save_state",
    "set_rng_state",
    "state_hash",
    "write_json",
]

TRANSFER_STATE = "transfer_state.pt"
TRANSFER_FEATURES = "transfer_features.pt"
FINETUNE_STATE = "finetune_state.pt"


def save_state(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def load_state(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, EOFError, RuntimeError, ValueError, pickle.UnpicklingError) as exc:  # a damaged file
        raise InputError(f"cannot read resume state {path}: {exc}; delete it to restart that stage") from exc
    return state


def save_safetensors(state: dict[str, torch.Tensor], path: Path, *, arch: str, checkpoint: str) -> None:
    tmp = path.with_suffix(".tmp")
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in state.items()},
        str(tmp),
        metadata={"architecture": arch, "checkpoint": checkpoint},
    )
    tmp.replace(path)


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
    tmp.replace(path)


def load_json(path: Path) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
        return data
    except (OSError, json.JSONDecodeError):
        return {}


def state_hash(model: nn.Module) -> str:
    """SHA-256 of a module's parameters and buffers (names and bytes), to compare weights across ranks."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def rng_state() -> dict[str, Any]:
    np_state: tuple[Any, ...] = tuple(np.random.get_state())
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [
            str(np_state[0]),
            torch.from_numpy(np.asarray(np_state[1]).astype(np.int64)),
            *map(float, np_state[2:]),
        ],
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_resume(config: TrainConfig, train_dir: Path) -> None:
    saved_path = train_dir / "config.json"
    states = [train_dir / n for n in (TRANSFER_STATE, FINETUNE_STATE)]
    if not saved_path.is_file() or not any(p.is_file() for p in states):
        raise UsageError(
            f"--resume: nothing to resume in {train_dir.parent} (expected train/config.json and "
            f"train/{TRANSFER_STATE} or train/{FINETUNE_STATE}); run without --resume to start"
        )
    diff = config_differences(TrainConfig.load(saved_path), config)
    if diff:
        listed = "; ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items())
        raise UsageError(f"--resume with a different config than the interrupted run ({listed})")
