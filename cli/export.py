"""``cxr-drift export``: re-export a trained model-pair folder (ONNX + manifest) from its safetensors."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from core.errors import ArtifactError, UsageError
from core.manifest import manifest_key_from_env
from core.registry import get_arch
from core.vocabulary import CHECKPOINTS
from training.export import export_pair, load_checkpoint

__all__ = ["configure_parser", "run"]


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-dir", type=Path, required=True, help="folder with transfer/finetuned.safetensors")
    p.add_argument("--arch", help="architecture (default: from the folder's manifest or train/config.json)")
    p.add_argument("--classes", help="comma-separated class names (default: from the folder's metadata)")
    p.add_argument("--input-size", type=int, help="input size in px (default: from the folder's metadata)")


def _folder_metadata(folder: Path) -> dict[str, Any]:
    for candidate in (folder / "manifest.json", folder / "train" / "config.json"):
        if candidate.is_file():
            try:
                data = json.loads(candidate.read_text())
            except ValueError as exc:
                raise ArtifactError(f"{candidate} is not valid JSON: {exc}") from exc
            if not isinstance(data, dict):
                raise ArtifactError(f"{candidate} must hold a JSON object, got {type(data).__name__}")
            return data
    return {}


def run(args: argparse.Namespace) -> int:
    folder: Path = args.model_dir
    if not folder.is_dir():
        raise UsageError(f"model folder not found: {folder}")
    meta = _folder_metadata(folder)
    arch = args.arch or meta.get("architecture") or meta.get("arch")
    classes = args.classes.split(",") if args.classes else meta.get("class_names")
    size = args.input_size or meta.get("input_size")
    if not arch or not classes or not size:
        raise UsageError(
            f"cannot tell the architecture, classes and input size of {folder}: "
            "pass --arch, --classes and --input-size"
        )
    get_arch(arch)
    if len(classes) < 2 or len(set(classes)) != len(classes):
        raise UsageError(f"a model pair needs at least 2 distinct class names, got {classes}")
    models = [
        load_checkpoint(folder / f"{n}.safetensors", arch=arch, num_classes=len(classes)) for n in CHECKPOINTS
    ]
    old = meta if "checkpoints" in meta else {}
    metrics = {n: old.get("checkpoints", {}).get(n, {}).get("metrics", {}) for n in CHECKPOINTS}
    export_pair(
        models[0],
        models[1],
        out_dir=folder,
        class_names=list(classes),
        input_size=int(size),
        metrics=metrics,
        dataset=old.get("dataset"),
        training=old.get("training"),
        manifest_key=manifest_key_from_env(),
    )
    print(f"exported {arch} model pair to {folder}")
    return 0
