"""The typed configuration of one two-stage training run, saved as ``train/config.json`` next to its results.

``--resume`` compares the saved config with the new one on the fields that change what is trained
(:data:`RESUME_KEYS`): a run cannot be continued with other data, another architecture, other epochs...
Fields that only change *where* or *how visibly* it runs (device, workers, progress bars, export) may differ.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import ConfigError

__all__ = ["RESUME_KEYS", "TrainConfig", "config_differences"]

PRETRAINED_CHOICES = ("imagenet", "none")
DEVICE_CHOICES = ("auto", "cpu", "cuda")
ON_ERROR_CHOICES = ("skip", "fail")
LR_FINETUNE_PRETRAINED = 3e-4  # stage-2 default from ImageNet (or other) weights
LR_FINETUNE_SCRATCH = 1e-3  # stage-2 default from a random init (--pretrained none)


@dataclass(frozen=True)
class TrainConfig:
    """Everything ``cxr-drift train`` needs. Paths are stored as strings so the JSON round-trips exactly.

    Stage 1 (transfer): frozen backbone, its pooled features cached once, a linear head trained on them for
    ``epochs_transfer`` epochs at ``lr_transfer`` (cheap, so many epochs are affordable). Stage 2 (fine-tune):
    everything trainable, ``epochs_finetune`` epochs at ``lr_finetune`` (AdamW, linear warmup over
    ``warmup_epochs`` then cosine decay; the head at ``lr_finetune * head_lr_factor``), light augmentation
    (``augment``), BatchNorm statistics recomputed on ``precise_bn_images`` unaugmented train images after
    every epoch (0: off). Each stage keeps the epoch with the best validation macro-F1 (ties: lower validation
    loss, then the earlier epoch); without a validation split it keeps the last epoch.

    ``lr_finetune`` and ``augment`` default by ``pretrained`` (``None`` = resolve at construction): from
    pretrained weights 3e-4 with augmentation (fine-tuning proper); from a random init (``"none"``) stage 2
    is training from scratch: 1e-3, no augmentation (a random backbone's features are so sensitive to it that
    a few hundred images and a few epochs never recover; measured on the synthetic set, see the train module).
    """

    arch: str
    data: str
    out: str
    input_size: int | None = None
    pretrained: str = "imagenet"
    epochs_transfer: int = 30
    epochs_finetune: int = 4
    lr_transfer: float = 3e-3
    lr_finetune: float | None = None
    batch_size: int = 16
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.5
    head_lr_factor: float = 0.1
    label_smoothing: float = 0.0
    drop_rate: float | None = None
    seed: int = 0
    device: str = "auto"
    workers: int = 0
    on_error: str = "skip"
    limit: int | None = None
    resume: bool = False
    export: bool = True
    progress: bool = True
    augment: bool | None = None
    precise_bn_images: int = 256
    val_fraction: float = 0.15
    test_fraction: float = 0.15

    def __post_init__(self) -> None:
        scratch = str(self.pretrained).strip().lower() == "none"
        if self.lr_finetune is None:
            object.__setattr__(
                self, "lr_finetune", LR_FINETUNE_SCRATCH if scratch else LR_FINETUNE_PRETRAINED
            )
        if self.augment is None:
            object.__setattr__(self, "augment", not scratch)
        checks: list[tuple[bool, str]] = [
            (self.epochs_transfer >= 0, f"epochs_transfer must be >= 0, got {self.epochs_transfer}"),
            (self.epochs_finetune >= 0, f"epochs_finetune must be >= 0, got {self.epochs_finetune}"),
            (self.lr_transfer > 0, f"lr_transfer must be > 0, got {self.lr_transfer}"),
            (
                self.lr_finetune is not None and self.lr_finetune > 0,
                f"lr_finetune must be > 0, got {self.lr_finetune}",
            ),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (self.head_lr_factor > 0, f"head_lr_factor must be > 0, got {self.head_lr_factor}"),
            (self.warmup_epochs >= 0, f"warmup_epochs must be >= 0, got {self.warmup_epochs}"),
            (0 <= self.label_smoothing < 1, f"label_smoothing must be in [0, 1), got {self.label_smoothing}"),
            (self.precise_bn_images >= 0, f"precise_bn_images must be >= 0, got {self.precise_bn_images}"),
            (self.workers >= 0, f"workers must be >= 0, got {self.workers}"),
            (self.limit is None or self.limit >= 1, f"limit must be >= 1 per split, got {self.limit}"),
            (
                self.input_size is None or self.input_size >= 1,
                f"input_size must be >= 1, got {self.input_size}",
            ),
            (
                self.device in DEVICE_CHOICES,
                f"unknown device {self.device!r}; valid options: {', '.join(DEVICE_CHOICES)}",
            ),
            (
                self.on_error in ON_ERROR_CHOICES,
                f"unknown on_error {self.on_error!r}; valid options: {', '.join(ON_ERROR_CHOICES)}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from a dict; keys that are not fields (e.g. ``class_names`` in config.json) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        missing = [n for n in ("arch", "data", "out") if n not in data]
        if missing:
            raise ConfigError(f"training config lacks required fields {missing}; got keys {sorted(data)}")
        return cls(**{k: v for k, v in data.items() if k in names})

    def save(self, path: Path, **extra: Any) -> Path:
        """Write the config (plus ``extra`` keys such as ``class_names``) as JSON, atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps({**self.to_dict(), **extra}, indent=2) + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: Path) -> TrainConfig:
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path} should hold a JSON object, got {type(data).__name__}")
        return cls.from_dict(data)


# Fields that must be equal for ``--resume`` to continue a run.
RESUME_KEYS: tuple[str, ...] = (
    "arch",
    "data",
    "input_size",
    "pretrained",
    "epochs_transfer",
    "epochs_finetune",
    "lr_transfer",
    "lr_finetune",
    "batch_size",
    "weight_decay",
    "warmup_epochs",
    "head_lr_factor",
    "label_smoothing",
    "drop_rate",
    "seed",
    "on_error",
    "limit",
    "augment",
    "precise_bn_images",
    "val_fraction",
    "test_fraction",
)


def config_differences(saved: TrainConfig, new: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """``{field: (saved value, new value)}`` for the :data:`RESUME_KEYS` on which the two configs differ."""
    return {
        k: (getattr(saved, k), getattr(new, k)) for k in RESUME_KEYS if getattr(saved, k) != getattr(new, k)
    }
