"""The classifier every architecture is wrapped in: backbone -> ReLU (CAM target) -> avg pool -> dropout -> linear."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from core.errors import ConfigError
from core.registry import ArchSpec, get_arch

log = logging.getLogger(__name__)

__all__ = ["CxrClassifier", "LogitsAndFeatures", "PretrainedWeightsError", "build_classifier", "build_model"]


class PretrainedWeightsError(ConfigError):
    """ImageNet weights could not be loaded; the message says how to pass a local file instead."""


class CxrClassifier(nn.Module):
    """A timm backbone with the head the closed-form CAMs assume.

    ``feature_act`` is the CAM target layer: its output is post-ReLU by construction (a fresh tensor from a
    non-inplace ReLU), and only "global average pool -> dropout -> linear" lies between it and the logits,
    so d logit_c / d A_k = head.weight[c, k] / (h * w) exactly.

    ``freeze_backbone(True)`` freezes the backbone's parameters *and* its BatchNorm statistics: ``train()``
    keeps the backbone in eval mode while it is frozen (stage 1, transfer learning).
    """

    def __init__(self, spec: ArchSpec, backbone: nn.Module, num_classes: int, drop_rate: float) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {num_classes}")
        self.arch = spec.name
        self.num_classes = num_classes
        self.num_features = spec.num_features
        self.backbone = backbone
        self.feature_act = nn.ReLU(inplace=False)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(drop_rate)
        self.head = nn.Linear(spec.num_features, num_classes)
        self.backbone_frozen = False

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        feats: torch.Tensor = self.backbone.forward_features(x)  # type: ignore[operator]
        return self.feature_act(feats)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        pooled = self.pool(features).flatten(1)
        out: torch.Tensor = self.head(self.dropout(pooled))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def classifier_weight(self) -> torch.Tensor:
        """The head weight as (classes, K)."""
        return self.head.weight.detach()

    def freeze_backbone(self, frozen: bool = True) -> None:
        self.backbone_frozen = frozen
        for p in self.backbone.parameters():
            p.requires_grad_(not frozen)
        if frozen:
            self.backbone.eval()
        elif self.training:
            self.backbone.train()

    def train(self, mode: bool = True) -> CxrClassifier:
        super().train(mode)
        if self.backbone_frozen:
            self.backbone.eval()
        return self


class LogitsAndFeatures(nn.Module):
    """Export wrapper: one forward returns ``(logits, features)``, the two ONNX outputs."""

    def __init__(self, model: CxrClassifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.model.forward_features(x)
        return self.model.forward_head(feats), feats


def _load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """Load tensors from safetensors or a torch file, never unpickling arbitrary objects."""
    if not path.is_file():
        raise PretrainedWeightsError(f"pretrained weights file not found: {path}")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise PretrainedWeightsError(f"cannot read weights from {path}: {exc}") from exc
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise PretrainedWeightsError(f"{path} does not hold a state dict of tensors")
    return obj


_CLASSIFIER_PREFIXES = ("classifier.", "fc.", "head.fc.", "head.", "last_linear.", "AuxLogits.")


def load_backbone_weights(backbone: nn.Module, state: dict[str, Any], *, source: str) -> None:
    """Load an ImageNet state dict into a headless timm backbone; the old classifier is dropped."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith(_CLASSIFIER_PREFIXES)}
    own = backbone.state_dict()
    mismatched = [k for k, v in state.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
    if mismatched:
        raise PretrainedWeightsError(
            f"weights in {source} do not fit this architecture: shape mismatch for {mismatched[:3]}"
        )
    result = backbone.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing:
        raise PretrainedWeightsError(
            f"weights in {source} do not fit this architecture: {len(missing)} backbone tensors missing "
            f"(first: {missing[:3]})"
        )
    if result.unexpected_keys:
        log.warning("ignored %d unexpected tensors in %s", len(result.unexpected_keys), source)


def build_classifier(
    spec: ArchSpec,
    num_classes: int,
    *,
    pretrained: str | None = None,
    drop_rate: float | None = None,
) -> CxrClassifier:
    """Build ``spec`` with ``num_classes`` outputs.

    ``pretrained``: ``None``/``"none"`` for random init, ``"imagenet"`` for timm's hub weights (needs the hub
    or its local cache), or a path to a safetensors / torch state-dict file of the backbone.
    """
    import timm

    choice = (pretrained or "none").strip()
    use_hub = choice.lower() == "imagenet"
    try:
        backbone = timm.create_model(spec.timm_name, pretrained=use_hub, num_classes=0, global_pool="")
    except Exception as exc:
        if not use_hub:
            raise
        raise PretrainedWeightsError(
            f"could not load ImageNet weights for {spec.name} (timm '{spec.timm_name}'): "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. "
            "Offline? Fetch the weights on a connected machine (e.g. timm.create_model"
            f"('{spec.timm_name}', pretrained=True) and save its state_dict as safetensors) "
            "and pass the file with --pretrained PATH"
        ) from exc
    if choice.lower() not in ("none", "imagenet", ""):
        path = Path(os.path.expanduser(choice))
        load_backbone_weights(backbone, _load_state_dict_file(path), source=str(path))
    rate = spec.default_drop_rate if drop_rate is None else drop_rate
    return CxrClassifier(spec, backbone, num_classes, rate)


def build_model(
    name: str,
    num_classes: int,
    *,
    pretrained: str | None = None,
    drop_rate: float | None = None,
    **kwargs: Any,
) -> CxrClassifier:
    """Build a classifier for a registered architecture by name (see :func:`build_classifier`)."""
    return build_classifier(get_arch(name), num_classes, pretrained=pretrained, drop_rate=drop_rate, **kwargs)
