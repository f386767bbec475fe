"""Load a model-pair artifact folder (docs/CONTRACTS.md) and run both checkpoints.

``ModelPair.load(folder)`` reads ``manifest.json``, checks its seal (an edited or unsealed manifest is an
:class:`ArtifactError`; with ``manifest_key`` its HMAC too), verifies the SHA-256 of every file it lists (a
missing or altered file is an :class:`ArtifactError` naming it), opens one ONNX Runtime session per checkpoint and
reads each checkpoint's head weight (C, K) with ``safetensors.numpy`` for the closed-form CAMs.
``backend="torch"`` builds the ``CxrClassifier`` instead (torch imported lazily). Either way
``pair.forward(batch)`` returns logits and target-layer features per checkpoint.

``device`` (:data:`DEVICES`): ``"cpu"`` (default); ``"cuda"`` or ``"cuda:N"``: ONNX Runtime's CUDA execution
provider (``onnxruntime-gpu``) or torch on that GPU, and a :class:`ConfigError` saying what is missing when
it is not there (never a silent fall-back to the CPU: a service sized for a GPU would not keep up);
``"auto"``: the GPU when one is usable, else the CPU. ``pair.device`` says what was chosen.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import ArtifactError, ConfigError
from core.identity import ModelIdentity, version_digest
from core.manifest import read_manifest, verify_manifest
from core.vocabulary import BACKENDS, CHECKPOINTS

log = logging.getLogger(__name__)

__all__ = ["DEVICES", "Forward", "ModelPair", "select_providers"]

DEVICES: tuple[str, ...] = ("cpu", "cuda", "auto")  # and "cuda:N" for GPU N
_CPU_EP = "CPUExecutionProvider"
_CUDA_EP = "CUDAExecutionProvider"


@dataclass(frozen=True)
class Forward:
    """One checkpoint's outputs for a batch: ``logits`` (B, C) and ``features`` (B, K, h, w), float32."""

    logits: np.ndarray
    features: np.ndarray


def _check_closed_form_contract(manifest: Mapping[str, Any]) -> None:
    """The closed-form CAMs assume post-ReLU features; refuse a manifest that says otherwise."""
    features = manifest.get("features")
    if isinstance(features, Mapping) and features.get("post_relu") is False:
        raise ArtifactError(
            "manifest.json: features are not post-ReLU (features.post_relu is false); the closed-form CAMs "
            "need the target activation taken after a ReLU (docs/DESIGN.md trap 1)"
        )


class ModelPair:
    """The transfer and fine-tuned checkpoints of one architecture, ready for inference."""

    def __init__(
        self,
        *,
        folder: Path,
        manifest: dict[str, Any],
        runners: Mapping[str, Any],
        head_weights: Mapping[str, np.ndarray],
        backend: str,
        device: str = "cpu",
        name: str | None = None,
    ) -> None:
        self.folder = folder
        self.device = device
        self.manifest = manifest
        # served under its folder's name (two versions of one architecture live side by side)
        self.name: str = name if name is not None else folder.name
        self.architecture: str = str(manifest["architecture"])
        self.digest: str = version_digest(manifest)
        self.class_names: list[str] = list(manifest["class_names"])
        self.input_size: int = int(manifest["input_size"])
        self.mean: tuple[float, ...] = tuple(float(v) for v in manifest["mean"])
        self.std: tuple[float, ...] = tuple(float(v) for v in manifest["std"])
        self.backend = backend
        self.head_weights = dict(head_weights)
        self._runners = dict(runners)

    @classmethod
    def load(
        cls,
        folder: str | Path,
        *,
        verify: bool = True,
        backend: str = "onnx",
        device: str = "cpu",
        threads: int | None = None,
        manifest_key: bytes | None = None,
        name: str | None = None,
    ) -> ModelPair:
        """Open the model pair in ``folder``; see the module docstring. ``name`` defaults to the folder's
        name (:attr:`identity`)."""
        if backend not in BACKENDS:
            raise ConfigError(f"unknown backend {backend!r}; valid options: {', '.join(BACKENDS)}")
        _check_device(device)
        root = Path(folder)
        served_as = name
        manifest = read_manifest(root)
        if verify:
            verify_manifest(root, manifest, key=manifest_key)
        _check_closed_form_contract(manifest)
        checkpoints = manifest["checkpoints"]
        heads: dict[str, np.ndarray] = {}
        runners: dict[str, Any] = {}
        for name in CHECKPOINTS:
            entry = checkpoints.get(name) if isinstance(checkpoints, Mapping) else None
            if not isinstance(entry, Mapping) or "safetensors" not in entry or "onnx" not in entry:
                raise ArtifactError(
                    f"manifest.json: checkpoint {name!r} needs 'safetensors' and 'onnx' entries"
                )
            if verify:
                # a file the pair loads but the hash list omits would be trusted unverified
                hashed = manifest["files"]
                for key in ("safetensors", "onnx"):
                    if str(entry[key]) not in hashed:
                        raise ArtifactError(
                            f"{entry[key]} (checkpoint {name!r}) is not in the manifest's 'files' hash list, "
                            "so it cannot be verified"
                        )
            weights_path = root / str(entry["safetensors"])
            heads[name] = _head_weight(weights_path, manifest)
            if backend == "onnx":
                runners[name] = _OnnxRunner(root / str(entry["onnx"]), threads=threads, device=device)
            else:
                runners[name] = _TorchRunner(weights_path, manifest, device=device, threads=threads)
        chosen = str(next(iter(runners.values())).device)
        log.info(
            "loaded %s model pair from %s as %s (%s backend, %s)",
            manifest["architecture"],
            root,
            served_as or root.name,
            backend,
            chosen,
        )
        return cls(
            folder=root,
            manifest=manifest,
            runners=runners,
            head_weights=heads,
            backend=backend,
            device=chosen,
            name=served_as,
        )

    @property
    def identity(self) -> ModelIdentity:
        """Name, architecture and version digest (core.identity): what every audit row records."""
        return ModelIdentity(name=self.name, architecture=self.architecture, digest=self.digest)

    def close(self) -> None:
        """Drop the inference sessions (the registry calls this once no request uses the pair)."""
        self._runners.clear()

    @property
    def drift_calibration(self) -> Mapping[str, Any] | None:
        """The manifest's ``drift_calibration`` (engine/calibrate.py), if any."""
        value = self.manifest.get("drift_calibration")
        return value if isinstance(value, Mapping) else None

    def forward(self, batch: np.ndarray, checkpoints: Sequence[str] = CHECKPOINTS) -> dict[str, Forward]:
        """``checkpoints`` (default both) on ``batch`` (B, 3, S, S) float32: ``{"transfer": Forward, ...}``."""
        x = self.checked_batch(batch)
        return {name: self._runners[name](x) for name in checkpoints}

    def checked_batch(self, batch: np.ndarray) -> np.ndarray:
        """``batch`` as contiguous float32 (B, 3, S, S); ``ValueError`` for another shape or non-finite values."""
        x = np.asarray(batch)
        expected = (3, self.input_size, self.input_size)
        if x.ndim != 4 or x.shape[1:] != expected:
            raise ValueError(f"batch must have shape (B, {', '.join(map(str, expected))}), got {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError("batch contains NaN or infinite values")
        return np.ascontiguousarray(x, dtype=np.float32)

    def torch_model(self, checkpoint: str) -> Any:
        """The ``CxrClassifier`` of ``checkpoint`` (torch backend only)."""
        runner = self._runners[checkpoint]
        if not isinstance(runner, _TorchRunner):
            raise ValueError(f"torch_model needs backend='torch', this pair uses {self.backend!r}")
        return runner.model


def _head_weight(path: Path, manifest: Mapping[str, Any]) -> np.ndarray:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    key = str(manifest.get("head", {}).get("weight", "head.weight"))
    if not path.is_file():
        raise ArtifactError(f"{path.name} is missing from {path.parent}")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ArtifactError(f"{path.name} is not a readable safetensors file: {exc}") from exc
    if key not in tensors:
        raise ArtifactError(f"{path.name} has no tensor {key!r} (the head weight)")
    weight = tensors[key]
    if weight.ndim == 4 and weight.shape[2:] == (1, 1):
        weight = weight.reshape(weight.shape[:2])
    classes = len(manifest["class_names"])
    if weight.ndim != 2 or weight.shape[0] != classes:
        raise ArtifactError(f"{path.name}: head weight has shape {weight.shape}, expected ({classes}, K)")
    return np.ascontiguousarray(weight, dtype=np.float32)


def _check_device(device: str) -> None:
    if device in DEVICES or (device.startswith("cuda:") and device[5:].isdigit()):
        return
    raise ConfigError(f"unknown device {device!r}; valid options: {', '.join(DEVICES)} (or cuda:N)")


def select_providers(device: str, available: Sequence[str]) -> list[str]:
    """ONNX Runtime execution providers for ``device`` given the ``available`` ones (most preferred first).

    ``"cpu"``: the CPU provider; ``"cuda"``/``"cuda:N"``: CUDA then CPU (for the few operators CUDA lacks),
    :class:`ConfigError` when this onnxruntime has no CUDA provider; ``"auto"``: CUDA when available.
    """
    _check_device(device)
    has_cuda = _CUDA_EP in available
    if device == "cpu" or (device == "auto" and not has_cuda):
        return [_CPU_EP]
    if not has_cuda:
        raise ConfigError(
            f"device {device!r} needs ONNX Runtime's {_CUDA_EP}, but this onnxruntime offers only "
            f"{', '.join(available) or 'none'}: install onnxruntime-gpu (and the CUDA/cuDNN libraries it "
            "needs), or set the device to cpu or auto",
            code="cuda_unavailable",
        )
    return [_CUDA_EP, _CPU_EP]


class _OnnxRunner:
    def __init__(self, path: Path, *, threads: int | None, device: str = "cpu") -> None:
        import onnxruntime as ort

        providers: list[Any] = list(select_providers(device, ort.get_available_providers()))
        if providers[0] == _CUDA_EP and device.startswith("cuda:"):
            providers[0] = (_CUDA_EP, {"device_id": int(device[5:])})

        if not path.is_file():
            raise ArtifactError(f"{path.name} is missing from {path.parent}")
        options = ort.SessionOptions()
        # Idle intra-op threads must not spin: on a small CPU a spinning worker steals the core that the CAM
        # and metric work (and the other checkpoint's session) needs. Measured on 2 cores, ResNet50V2 at
        # 224 px: one forward 170 ms with spinning, 85-105 ms without (bench/drift_engine.py).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads is not None:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # ORT raises its own exception types for bad models
            raise ArtifactError(f"{path.name} cannot be opened by ONNX Runtime: {exc}") from exc
        used = self.session.get_providers()
        on_gpu = bool(used) and used[0] == _CUDA_EP
        self.device = ("cuda" if device == "auto" else device) if on_gpu else "cpu"
        if self.device == "cpu" and device.startswith("cuda"):
            # the CUDA provider is installed but could not start (no driver, no GPU, missing cuDNN...)
            raise ConfigError(
                f"device {device!r}: ONNX Runtime could not start {_CUDA_EP} for {path.name} (it fell back "
                f"to {', '.join(used)}); check the GPU, driver and CUDA/cuDNN libraries, or use cpu or auto",
                code="cuda_unavailable",
            )
        outputs = {o.name for o in self.session.get_outputs()}
        if not {"logits", "features"} <= outputs:
            raise ArtifactError(
                f"{path.name} must have outputs 'logits' and 'features', has {sorted(outputs)}"
            )
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x: np.ndarray) -> Forward:
        logits, features = self.session.run(["logits", "features"], {self.input_name: x})
        return Forward(logits=np.asarray(logits), features=np.asarray(features))


class _TorchRunner:
    def __init__(self, path: Path, manifest: Mapping[str, Any], *, device: str, threads: int | None) -> None:
        import torch
        from safetensors.torch import load_file

        from training.models import build_model

        if threads is not None:
            torch.set_num_threads(int(threads))
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        elif device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(
                f"device {device!r} needs CUDA, but torch {torch.__version__} sees no usable GPU "
                f"(torch.cuda.is_available() is false); set the device to cpu or auto",
                code="cuda_unavailable",
            )
        self.device = torch.device(device)
        model = build_model(manifest["architecture"], len(manifest["class_names"]))
        try:
            model.load_state_dict(load_file(str(path)))
        except RuntimeError as exc:
            raise ArtifactError(f"{path.name} does not fit {manifest['architecture']}: {exc}") from exc
        self.model = model.eval().to(self.device)

    def __call__(self, x: np.ndarray) -> Forward:
        import torch

        with torch.inference_mode():
            feats = self.model.forward_features(torch.from_numpy(x).to(self.device))
            logits = self.model.forward_head(feats)
        return Forward(logits=logits.float().cpu().numpy(), features=feats.float().cpu().numpy())
