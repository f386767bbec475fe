"""The model a run starts from: the ``--pretrained`` choice checked, then the classifier built.

``--pretrained imagenet`` needs timm's hub weights; when they are neither in the local cache nor reachable
the run fails in seconds with what to do instead, not after minutes of hub retries.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from core.errors import UsageError
from core.registry import ArchSpec, get_arch
from training.config import PRETRAINED_CHOICES, TrainConfig
from training.models import CxrClassifier, PretrainedWeightsError, build_model

__all__ = ["build_classifier_for", "check_imagenet_reachable"]


def _imagenet_cached(spec: ArchSpec) -> bool:
    try:
        import timm
        from huggingface_hub import try_to_load_from_cache

        hub_id = timm.models.get_pretrained_cfg(spec.timm_name).hf_hub_id  # type: ignore[union-attr]
    except Exception:  # no hub id known: let timm try
        return True
    if not hub_id:
        return True
    return any(
        isinstance(try_to_load_from_cache(hub_id, name), str)
        for name in ("model.safetensors", "pytorch_model.bin")
    )


def check_imagenet_reachable(spec: ArchSpec, *, timeout_s: float = 3.0) -> None:
    """Fail in seconds, not minutes of hub retries, when ImageNet weights are neither cached nor reachable."""
    if _imagenet_cached(spec):
        return
    hint = (
        f"ImageNet weights for {spec.name} (timm '{spec.timm_name}') are not in the local cache and {{why}}. "
        f"Fetch them on a connected machine (timm.create_model('{spec.timm_name}', pretrained=True), "
        "save its state_dict with safetensors) and pass the file with --pretrained PATH, or train from "
        "scratch with --pretrained none"
    )
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise PretrainedWeightsError(hint.format(why="HF_HUB_OFFLINE is set"))
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as exc:
        raise PretrainedWeightsError(hint.format(why=f"{host} is unreachable ({exc})")) from exc


def build_classifier_for(config: TrainConfig, num_classes: int) -> CxrClassifier:
    spec = get_arch(config.arch)
    choice = config.pretrained.strip()
    if choice.lower() not in PRETRAINED_CHOICES and not Path(choice).expanduser().is_file():
        raise FileNotFoundError(
            f"--pretrained {choice!r}: no such file; valid options: imagenet, none, or a path to a "
            "safetensors / torch state-dict file"
        )
    try:
        if choice.lower() == "imagenet":
            check_imagenet_reachable(spec)
        return build_model(spec.name, num_classes, pretrained=choice, drop_rate=config.drop_rate)
    except PretrainedWeightsError as exc:
        raise UsageError(str(exc)) from exc
