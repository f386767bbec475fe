"""Small model pairs for tests: random-init "transfer" weights and a perturbed "fine-tuned" copy, exported.

Exporting takes a while (most of a minute for two architectures on two cores), so tests that only read
pairs use :func:`cached_pairs`: exported once per version of the code that produces them, then reused.
"""

from __future__ import annotations

import copy
import getpass
import hashlib
import importlib.metadata
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from training.models import CxrClassifier, build_model

CLASS_NAMES = [
    "normal",
    "lobar_consolidation",
    "bilateral_lower_zone",
    "diffuse_patchy",
    "upper_zone_nodules",
]
# The smallest inputs with a 3x3 feature grid for every architecture: at 2x2 (densenet, resnet at 64 px)
# or 1x1 (inceptionv3 at 96 px) maps are nearly or exactly constant and a test of where a map points tests
# nothing spatial.
SMALL_SIZE = {"densenet201": 96, "resnet50v2": 96, "inceptionv3": 139}
GRID3_SIZE = SMALL_SIZE


def calibrate_batchnorm(model: CxrClassifier, *, size: int, seed: int = 0, batches: int = 2) -> None:
    """Set BatchNorm running statistics from a few random batches, as training would.

    A random-init timm backbone keeps running_var = 1, so activations explode through the depth (1e8 in
    Inception-v3); real checkpoints never look like that.
    """
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.rand(4, 3, size, size, generator=gen) * 4 - 2)
    model.eval()


def make_pair(arch: str, *, seed: int = 0, num_classes: int = 5) -> tuple[CxrClassifier, CxrClassifier]:
    """Two checkpoints of ``arch`` that differ the way a fine-tune does: every weight moved a little."""
    torch.manual_seed(seed)
    transfer = build_model(arch, num_classes).eval()
    calibrate_batchnorm(transfer, size=SMALL_SIZE[arch], seed=seed)
    finetuned = copy.deepcopy(transfer)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in finetuned.parameters():
            p.add_(0.05 * p.abs().mean() * torch.randn(p.shape, generator=gen))
        finetuned.head.weight.mul_(3.0)
    return transfer, finetuned.eval()


def head_scaled_pair(arch: str, *, scale: float = 2.0, seed: int = 0) -> tuple[CxrClassifier, CxrClassifier]:
    """The transfer checkpoint of :func:`make_pair` and a "fine-tuned" copy whose only change is the head,
    weight and bias multiplied by ``scale``: the same features and, for ``scale > 0``, the same predictions;
    any drift between them is head scale, never evidence."""
    transfer, _ = make_pair(arch, seed=seed)
    finetuned = copy.deepcopy(transfer)
    with torch.no_grad():
        finetuned.head.weight.mul_(scale)
        finetuned.head.bias.mul_(scale)
    return transfer, finetuned.eval()


def export_models(
    transfer: CxrClassifier, finetuned: CxrClassifier, out_dir: Path, *, input_size: int
) -> Path:
    """Export two test checkpoints as a model pair (test class names, metrics and dataset entries)."""
    from training.export import export_pair

    return export_pair(
        transfer,
        finetuned,
        out_dir=out_dir,
        class_names=CLASS_NAMES,
        input_size=input_size,
        metrics={"transfer": {"accuracy": 0.5}, "finetuned": {"accuracy": 0.6}},
        dataset={"source": "tests", "fingerprint": "0" * 64},
    )


def export_small_pair(arch: str, out_dir: Path, *, seed: int = 0, input_size: int | None = None) -> Path:
    """:func:`make_pair` exported at ``input_size`` (default :data:`SMALL_SIZE`)."""
    transfer, finetuned = make_pair(arch, seed=seed)
    return export_models(transfer, finetuned, out_dir, input_size=input_size or SMALL_SIZE[arch])


def export_head_scaled_pair(
    arch: str, out_dir: Path, *, size: int | None = None, scale: float = 2.0, seed: int = 0
) -> Path:
    """:func:`head_scaled_pair` exported at ``size`` (default :data:`GRID3_SIZE`, a 3x3 feature grid)."""
    transfer, finetuned = head_scaled_pair(arch, scale=scale, seed=seed)
    return export_models(transfer, finetuned, out_dir, input_size=size or GRID3_SIZE[arch])


PAIR_ARCHS = ("densenet201", "resnet50v2")
# The code an exported pair depends on: a change to any of these files (or to torch) rebuilds the cache.
_PAIR_SOURCES = (
    "training/export.py",
    "training/models.py",
    "core/registry.py",
    "core/manifest.py",
    "core/vocabulary.py",
    "tests/pairs.py",
)


def _versions() -> list[str]:
    return [
        f"{name}=={importlib.metadata.version(name)}" for name in ("torch", "timm", "onnx", "onnxruntime")
    ]


def cached_pairs(config: pytest.Config) -> Path:
    """A folder with one exported pair per architecture of :data:`PAIR_ARCHS` (seed = its position), built
    once and reused: in pytest's cache, or in the system temp folder under ``-p no:cacheprovider``.

    Read-only: a test that changes a pair copies it first.
    """
    repo = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256(" ".join(_versions()).encode())
    for rel in _PAIR_SOURCES:
        path = repo / rel
        digest.update(path.read_bytes() if path.is_file() else b"-")
    cache = getattr(config, "cache", None)
    if cache is not None:
        root = Path(cache.mkdir("cxr-drift-pairs"))
    else:
        root = Path(tempfile.gettempdir()) / f"cxr-drift-test-pairs-{getpass.getuser()}"
    final = root / f"pairs-{digest.hexdigest()[:16]}"
    if not (final / "done").is_file():
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix="staging-", dir=root))
        for seed, arch in enumerate(PAIR_ARCHS):
            export_small_pair(arch, staging / arch, seed=seed)
        (staging / "done").write_text(final.name)
        try:
            staging.rename(final)  # atomic: a parallel worker either wins or finds it done
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
    return final
