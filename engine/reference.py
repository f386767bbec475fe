"""Reference attributions with pytorch-grad-cam (``LayerCAM``, ``GradCAMPlusPlus``) on a ``CxrClassifier``.

This is the slow, autograd-based path the closed-form maps in :mod:`engine.cams` are checked against
(one forward plus one full backward per call). Torch and pytorch-grad-cam are imported lazily, inside the
functions, so importing this module stays cheap. The model is put in eval mode (dropout off, docs/DESIGN.md
trap 4), the target is ``ClassifierOutputTarget(class)`` on the logits (never softmax, trap 3), and the CAM
object is used as a context manager so its hooks are released.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = ["ReferenceCams", "reference_cams", "resolve_layers"]

_CAM_CLASSES = {"layercam": "LayerCAM", "gradcampp": "GradCAMPlusPlus"}


@dataclass(frozen=True)
class ReferenceCams:
    """``maps`` (B, S, S) float32: the library's output. ``native`` (B, h, w) float32: the library's min-max
    normalized map on the (first) target layer's grid, before resize. ``logits`` (B, C) float32."""

    method: str
    maps: np.ndarray
    native: np.ndarray
    logits: np.ndarray


def resolve_layers(model: Any, names: str | Sequence[str]) -> list[Any]:
    """Modules of ``model`` named by dotted paths (e.g. ``"feature_act"``, ``"backbone.norm5"``)."""
    modules = dict(model.named_modules())
    wanted = [names] if isinstance(names, str) else list(names)
    if not wanted:
        raise ValueError("at least one target layer is needed")
    missing = [n for n in wanted if n not in modules]
    if missing:
        sample = ", ".join(n for n in list(modules)[:8] if n)
        raise ValueError(f"target layer {missing[0]!r} is not a module of the model (e.g. {sample}, ...)")
    return [modules[n] for n in wanted]


def reference_cams(
    model: Any,
    inputs: np.ndarray | torch.Tensor,
    classes: Sequence[int] | np.ndarray | None,
    *,
    method: str,
    target_layers: str | Sequence[str] = "feature_act",
) -> ReferenceCams:
    """pytorch-grad-cam maps of ``method`` for ``inputs`` (B, 3, S, S), one target class per image.

    ``classes=None`` lets the library target each image's predicted class (argmax of the logits).
    """
    import torch
    from pytorch_grad_cam import GradCAMPlusPlus, LayerCAM
    from pytorch_grad_cam.utils.image import scale_cam_image
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    if method not in _CAM_CLASSES:
        raise ValueError(f"unknown CAM method {method!r}; valid options: {', '.join(_CAM_CLASSES)}")
    x = torch.as_tensor(np.asarray(inputs) if not isinstance(inputs, torch.Tensor) else inputs)
    dtype = next(model.parameters()).dtype
    if x.dtype != dtype:  # e.g. float64 NumPy input for a float32 model
        x = x.to(dtype)
    if x.ndim != 4:
        raise ValueError(f"inputs must have shape (B, 3, S, S), got {tuple(x.shape)}")
    num_classes = int(model.head.out_features) if hasattr(model, "head") else None
    idx = None if classes is None else [int(c) for c in np.atleast_1d(np.asarray(classes))]
    if idx is not None and len(idx) != x.shape[0]:
        raise ValueError(f"expected {x.shape[0]} class indices (one per image), got {len(idx)}")
    if idx is not None and num_classes is not None and any(not 0 <= c < num_classes for c in idx):
        raise ValueError(f"class indices {idx} out of range; valid indices are 0..{num_classes - 1}")
    layers = resolve_layers(model, target_layers)
    cam_type = LayerCAM if method == "layercam" else GradCAMPlusPlus
    model.eval()
    targets = None if idx is None else [ClassifierOutputTarget(c) for c in idx]
    result: ReferenceCams | None = None
    with cam_type(model=model, target_layers=layers) as cam:
        maps = cam(input_tensor=x, targets=targets)
        # the native map of the first target layer, recomputed from the activations/gradients the call stored
        if targets is None:
            targets = [ClassifierOutputTarget(int(c)) for c in cam.outputs.argmax(dim=1)]
        acts = cam.activations_and_grads.activations[0].numpy()
        grads = cam.activations_and_grads.gradients[0].numpy()
        raw = np.maximum(cam.get_cam_image(x, layers[0], targets, acts, grads, False), 0)
        native = scale_cam_image(raw)
        logits = cam.outputs.detach().cpu().numpy()
        result = ReferenceCams(method=method, maps=maps, native=native, logits=logits)
    if result is None:  # the library's __exit__ swallows IndexError; do not return a silent nothing
        raise RuntimeError(f"pytorch-grad-cam {cam_type.__name__} failed (an IndexError was suppressed)")
    return result
