"""The project's fixed vocabulary, defined once: checkpoints, methods, splits, backends, roles."""

from __future__ import annotations

__all__ = ["BACKENDS", "CHECKPOINTS", "KEEP_MAPS", "METHODS", "ROLES", "SEVERITIES", "SPLITS"]

# The two checkpoints of a model pair, in the order the drift is measured (transfer -> fine-tuned).
CHECKPOINTS: tuple[str, ...] = ("transfer", "finetuned")
# Attribution methods, both computed in closed form by engine.cams.
METHODS: tuple[str, ...] = ("layercam", "gradcampp")
# Dataset splits.
SPLITS: tuple[str, ...] = ("train", "val", "test")
# Inference backends of engine.runtime.ModelPair.
BACKENDS: tuple[str, ...] = ("onnx", "torch")
# API key roles, weakest first.
ROLES: tuple[str, ...] = ("predict", "audit", "admin")
# Drift severities, mildest first.
SEVERITIES: tuple[str, ...] = ("low", "moderate", "high")
# Which requests keep low-resolution maps for review in the audit trail (CXR_DRIFT_KEEP_MAPS).
KEEP_MAPS: tuple[str, ...] = ("none", "flagged", "all")
