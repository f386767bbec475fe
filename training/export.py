"""Export a trained model pair to the artifact folder the service loads (docs/CONTRACTS.md).

Each checkpoint becomes a safetensors file and an ONNX file whose outputs are ``logits`` and ``features``
(the CAM target activation), with a dynamic batch axis. Every ONNX file passes ``onnx.checker`` and an
ONNX Runtime vs torch parity check at export time (the pattern of timm's ONNX utilities); the
manifest records the measured differences and the SHA-256 of every file the service reads.
"""

from __future__ import annotations

import copy
import datetime as dt
import logging
import warnings
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from core.errors import ArtifactError
from core.manifest import MANIFEST_SCHEMA_VERSION, check_class_names, sha256_file, write_manifest
from core.registry import get_arch
from core.vocabulary import CHECKPOINTS
from training.models import CxrClassifier, LogitsAndFeatures, build_model

log = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINTS",
    "MANIFEST_SCHEMA_VERSION",
    "ExportError",
    "check_onnx_parity",
    "export_onnx",
    "export_pair",
    "sha256_file",
]

PARITY_ATOL = 1e-4
# ONNX Runtime cannot be asked to agree with torch more closely than torch's own float32 result agrees with
# the float64 truth: for deep nets (Inception-v3) that error alone can exceed 1e-4. The allowed difference is
# max(PARITY_ATOL, PARITY_FLOAT32_FACTOR * |torch float32 - torch float64|).
PARITY_FLOAT32_FACTOR = 4.0
OPSET = 17


class ExportError(ArtifactError):
    """The export could not produce a valid artifact (e.g. ONNX Runtime disagrees with torch)."""


def _package_version() -> str:
    try:
        return metadata.version("cxr-drift")
    except Exception:
        return "0+unknown"


def export_onnx(model: CxrClassifier, path: Path, *, input_size: int) -> None:
    """Write ``model`` as ONNX with input ``input`` and outputs ``logits``, ``features`` (dynamic batch)."""
    wrapper = LogitsAndFeatures(model).eval()
    example = torch.zeros(2, 3, input_size, input_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        # The TorchScript-based exporter is ~6x faster than the dynamo one for these CNNs and gives the
        # same graph; it is deprecated, so its warning is silenced here and the parity check below guards it.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper,
            (example,),
            str(path),
            input_names=["input"],
            output_names=["logits", "features"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}, "features": {0: "batch"}},
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )


def check_onnx_parity(
    model: CxrClassifier,
    path: Path,
    *,
    input_size: int,
    batch: int = 3,
    seed: int = 0,
    sample_inputs: np.ndarray | None = None,
) -> dict[str, float]:
    """Run ``onnx.checker`` and compare ONNX Runtime against torch on random inputs.

    Returns the max absolute differences of logits and features; raises :class:`ExportError` when the
    logits differ by more than ``max(PARITY_ATOL, PARITY_FLOAT32_FACTOR * float32 error of torch itself)``
    or the outputs are not named as the contract says.
    """
    import onnx
    import onnxruntime as ort

    onnx.checker.check_model(str(path), full_check=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    if names != ["logits", "features"]:
        raise ExportError(f"{path.name}: expected ONNX outputs ['logits', 'features'], got {names}")
    if sample_inputs is not None:
        # preprocessed real images: logits in the range the model is used in (on random noise a trained
        # model's logits can reach 1e3-1e4, where float32 alone is ~1e-3 off)
        x = torch.as_tensor(np.ascontiguousarray(sample_inputs, dtype=np.float32))
        expected = (3, input_size, input_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected or x.shape[0] < 1:
            raise ExportError(
                f"sample_inputs must have shape (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}"
            )
    else:
        gen = torch.Generator().manual_seed(seed)
        # batch differs from the export example's, which also exercises the dynamic batch axis
        x = torch.randn(batch, 3, input_size, input_size, generator=gen)
    with torch.no_grad():
        ref_logits, ref_feats = LogitsAndFeatures(model.eval())(x)
        exact_logits, _ = LogitsAndFeatures(copy.deepcopy(model).double())(x.double())
    logits, feats = session.run(None, {"input": x.numpy()})
    diffs = {
        "logits_max_abs_diff": float(np.abs(logits - ref_logits.numpy()).max()),
        "features_max_abs_diff": float(np.abs(feats - ref_feats.numpy()).max()),
        "torch_float32_logits_error": float((ref_logits.double() - exact_logits).abs().max()),
        "logits_max_abs": float(ref_logits.abs().max()),
    }
    allowed = max(PARITY_ATOL, PARITY_FLOAT32_FACTOR * diffs["torch_float32_logits_error"])
    if not diffs["logits_max_abs_diff"] <= allowed:
        raise ExportError(
            f"{path.name}: ONNX Runtime logits differ from torch by {diffs['logits_max_abs_diff']:.3g} "
            f"(allowed {allowed:.3g})"
        )
    return diffs


def _check_pair(transfer: CxrClassifier, finetuned: CxrClassifier, class_names: list[str]) -> None:
    if transfer.arch != finetuned.arch:
        raise ExportError(f"a model pair needs one architecture, got {transfer.arch} and {finetuned.arch}")
    if transfer.num_classes != finetuned.num_classes:
        raise ExportError(
            f"checkpoints disagree on the number of classes: {transfer.num_classes} vs {finetuned.num_classes}"
        )
    if len(class_names) != transfer.num_classes or len(set(class_names)) != len(class_names):
        raise ExportError(
            f"expected {transfer.num_classes} unique class names, got {len(class_names)}: {class_names}"
        )
    check_class_names(list(class_names))  # names the service shows and exports: never formula-like


def export_pair(
    transfer: CxrClassifier,
    finetuned: CxrClassifier,
    *,
    out_dir: Path,
    class_names: list[str],
    input_size: int,
    metrics: Mapping[str, Any] | None = None,
    dataset: Mapping[str, Any] | None = None,
    training: Mapping[str, Any] | None = None,
    sample_inputs: np.ndarray | None = None,
    manifest_key: bytes | None = None,
) -> Path:
    """Write the model-pair folder: two safetensors, two ONNX files, ``manifest.json``. Returns its path.

    ``metrics`` maps checkpoint name ("transfer"/"finetuned") to that checkpoint's evaluation metrics.
    ``sample_inputs`` (B, 3, S, S): preprocessed real images for the ONNX parity check (random inputs
    otherwise). The manifest is sealed (core.manifest), with an HMAC when ``manifest_key`` is given.
    """
    _check_pair(transfer, finetuned, class_names)
    spec = get_arch(transfer.arch)
    spec.check_input_size(input_size)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    grid = spec.feature_grid(input_size)
    metrics = metrics or {}

    checkpoints: dict[str, Any] = {}
    files: dict[str, str] = {}
    for name, model in zip(CHECKPOINTS, (transfer, finetuned), strict=True):
        model = model.eval().cpu()
        st_path = out_dir / f"{name}.safetensors"
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(st_path), metadata={"architecture": spec.name, "checkpoint": name})
        onnx_path = out_dir / f"{name}.onnx"
        log.info("exporting %s %s checkpoint to ONNX (%d px)", spec.name, name, input_size)
        export_onnx(model, onnx_path, input_size=input_size)
        parity = check_onnx_parity(model, onnx_path, input_size=input_size, sample_inputs=sample_inputs)
        log.info("%s %s ONNX parity: %s", spec.name, name, parity)
        checkpoints[name] = {
            "safetensors": st_path.name,
            "onnx": onnx_path.name,
            "metrics": dict(metrics.get(name, {})),
            "onnx_parity_max_abs_diff": parity["logits_max_abs_diff"],
            "onnx_parity": {
                **parity,
                "inputs": "sample images" if sample_inputs is not None else "random normal",
            },
        }
        files[st_path.name] = sha256_file(st_path)
        files[onnx_path.name] = sha256_file(onnx_path)

    manifest = {
        "schema_version": MANIFEST_SCHEMA_VERSION,
        "cxr_drift_version": _package_version(),
        "created_at": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "architecture": spec.name,
        "timm_name": spec.timm_name,
        "class_names": list(class_names),
        "input_size": input_size,
        "mean": list(spec.mean),
        "std": list(spec.std),
        "preprocessing": {
            "color": "grayscale replicated to 3 channels",
            "resize": "bilinear, whole image",
            "scale": "[0, 1]",
        },
        "target_layer": spec.target_layer,
        "features": {
            "onnx_output": "features",
            "post_relu": spec.features_post_relu,
            "channels": spec.num_features,
            "grid": [grid, grid],
            "taken_after": "non-inplace ReLU after the backbone's forward_features",
        },
        "head": {
            "type": "global_avg_pool -> dropout -> linear",
            "weight": "head.weight",
            "bias": "head.bias",
        },
        "checkpoints": checkpoints,
        "dataset": dict(dataset or {}),
        "training": dict(training or {}),
        "files": files,
        "drift_calibration": None,
    }
    write_manifest(out_dir, manifest, key=manifest_key)
    return out_dir


def load_checkpoint(path: Path, *, arch: str, num_classes: int) -> CxrClassifier:
    """Build ``arch`` and load a safetensors checkpoint into it; a mismatch is a clear error."""
    if not Path(path).is_file():
        raise ArtifactError(f"checkpoint not found: {path}")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise ArtifactError(f"{path} is not a readable safetensors checkpoint: {exc}") from exc
    model = build_model(arch, num_classes)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or wrong:
        raise ArtifactError(
            f"{path} does not fit {arch} with {num_classes} classes: "
            f"{len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} mis-shaped tensors"
            + (f" (e.g. {(missing or unexpected or wrong)[0]})" if (missing or unexpected or wrong) else "")
        )
    model.load_state_dict(state)
    return model.eval()
