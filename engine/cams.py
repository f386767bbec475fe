"""Closed-form LayerCAM and GradCAM++ from one forward pass (features + head weight), no autograd.

The classifier's head is "global average pool -> dropout -> linear" on a post-ReLU target activation
``A`` (K, h, w), so the gradient of logit ``c`` with respect to ``A`` is the same at every position::

    g_k = W[c, k] / (h * w)

(no ReLU mask is needed: nothing but the pool sits between ``A`` and the linear layer). With it, both maps
follow exactly as pytorch-grad-cam computes them (docs/DESIGN.md section 3):

- LayerCAM:  cam = ReLU( sum_k ReLU(g_k) * A_k )
- GradCAM++: a_k = g_k^2 / (2 g_k^2 + S_k g_k^3 + eps)  (0 where g_k == 0),  S_k = sum_ij A_kij,
             w_k = sum_ij ReLU(g_k) a_k = h w ReLU(g_k) a_k,  cam = ReLU( sum_k w_k A_k )

then the library's post-processing: min-max ``(x - min) / (max(x - min) + 1e-7)`` on the native grid,
bilinear resize to the input size (OpenCV ``INTER_LINEAR``, the library's own call), and a second min-max.

``eps`` is not negligible (docs/DESIGN.md trap 2): g^2 is often of the order of eps, so GradCAM++ results report
how much of the denominator eps makes up (``eps_fraction``). NumPy and OpenCV only; no torch.

GradCAM++ regimes and head scale. Ignoring ``S_k g^3``, a channel's weight ``h w g^3 / (2 g^2 + eps)`` grows
like ``g^(1 + 2 r)`` with ``r`` its eps fraction: like LayerCAM (``g``) when eps is negligible, cubically when
eps dominates. When ``S_k g_k`` is large (``>> 2``) the weight saturates at ``h w / S_k``, whatever the
gradient (``saturation``: median of ``S_k g_k``). Scaling the head by ``s`` multiplies every ``g_k`` by ``s``;
the min-max normalized map is unchanged only if every contributing channel sits in the same regime, so
GradCAM++ moves with the head's *scale* alone (LayerCAM, linear in ``ReLU(g)``, never does). Fine-tuning
changes the head's scale: :func:`head_scale_control` computes, in closed form from the transfer features,
the GradCAM++ map the transfer checkpoint would give with its head rescaled to the fine-tuned head's norm,
the control the drift report compares the real drift with.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from core.vocabulary import METHODS

__all__ = [
    "METHODS",
    "CamResult",
    "class_gradients",
    "closed_form_cams",
    "closed_form_cams_all_classes",
    "gradcampp_raw",
    "gradcampp_saturation",
    "head_norm_ratio",
    "head_scale_control",
    "layercam_raw",
    "min_max",
    "postprocess",
]

DEFAULT_EPS = 1e-6
# the library's min-max denominator offset (pytorch_grad_cam.utils.image.scale_cam_image)
_MINMAX_OFFSET = np.float32(1e-7)


@dataclass(frozen=True)
class CamResult:
    """Attribution maps of one method for a batch.

    ``maps``: (B, S, S) float32 in [0, 1], the library's normalized, resized maps.
    ``native``: (B, h, w) float32 in [0, 1], the min-max normalized map on the feature grid (before resize).
    ``raw``: (B, h, w) float64, the ReLU'd map before any normalization.
    ``all_zero``: (B,) bool, True where the map carries no signal (raw map constant, so the normalized map is
    all zeros by definition, never NaN).
    ``eps_fraction``: (B,) float64 for GradCAM++ (median over contributing channels, g_k > 0, of
    eps / (2 g^2 + S g^3 + eps); NaN-free, 0.0 when no channel contributes), None for LayerCAM.
    ``saturation``: (B,) float64 for GradCAM++ (median over contributing channels of ``S_k g_k``, see
    :func:`gradcampp_saturation`; 0.0 when no channel contributes), None for LayerCAM.
    """

    method: str
    maps: np.ndarray
    native: np.ndarray
    raw: np.ndarray
    all_zero: np.ndarray
    eps_fraction: np.ndarray | None = None
    saturation: np.ndarray | None = None


def _check_features(features: np.ndarray) -> np.ndarray:
    arr = np.asarray(features)
    if arr.ndim != 4:
        raise ValueError(f"features must have shape (B, K, h, w), got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError("features contain NaN or infinite values")
    # The closed form assumes a post-ReLU target (no ReLU mask between A and the pool; S_k >= 0 keeps the
    # GradCAM++ denominators positive). Pre-ReLU features would give silently wrong maps, or inf/NaN.
    low = float(arr.min()) if arr.size else 0.0
    if low < 0.0:
        raise ValueError(
            f"features must be post-ReLU (non-negative), got minimum {low:.3g}; "
            "take the target activation after a non-inplace ReLU (docs/DESIGN.md trap 1)"
        )
    return arr


def _check_eps(eps: float) -> float:
    value = float(eps)
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    return value


def _check_size(size: int | tuple[int, int]) -> tuple[int, int]:
    target = (size, size) if isinstance(size, int | np.integer) else tuple(size)
    if len(target) != 2 or not all(isinstance(v, int | np.integer) and v > 0 for v in target):
        raise ValueError(f"input_size must be a positive int or (height, width), got {size!r}")
    return int(target[0]), int(target[1])


def _check_weight(weight: np.ndarray, channels: int) -> np.ndarray:
    w = np.asarray(weight)
    if w.ndim == 4 and w.shape[2:] == (1, 1):  # a 1x1-conv classifier (docs/DESIGN.md trap 5)
        w = w.reshape(w.shape[0], w.shape[1])
    if w.ndim != 2 or w.shape[1] != channels:
        raise ValueError(f"head weight must have shape (C, {channels}) to match the features, got {w.shape}")
    return w


def _check_classes(classes: Sequence[int] | np.ndarray, batch: int, num_classes: int) -> np.ndarray:
    idx = np.asarray(classes)
    if idx.ndim == 0:
        idx = np.full(batch, int(idx))
    if idx.shape != (batch,) or not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"classes must be {batch} integer class indices (one per image), got {idx!r}")
    bad = idx[(idx < 0) | (idx >= num_classes)]
    if bad.size:
        raise ValueError(f"class index {int(bad[0])} out of range; valid indices are 0..{num_classes - 1}")
    return idx.astype(np.int64)


def class_gradients(weight: np.ndarray, classes: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """d logit_c / d A_k for each image: ``g = W[c] / (h * w)``, shape (B, K), float64."""
    h, w = grid
    return np.asarray(weight, dtype=np.float64)[classes] / float(h * w)


def layercam_raw(features: np.ndarray, grads: np.ndarray) -> np.ndarray:
    """``ReLU( sum_k ReLU(g_k) A_k )`` for features (B, K, h, w) and spatially constant grads (B, K)."""
    weights = np.maximum(grads, 0.0)
    cam = np.einsum("bk,bkhw->bhw", weights, features.astype(np.float64, copy=False))
    return np.maximum(cam, 0.0)


def gradcampp_raw(features: np.ndarray, grads: np.ndarray, *, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """GradCAM++ as pytorch-grad-cam implements it, with spatially constant grads (B, K).

    ``a_k = g^2 / (2 g^2 + S_k g^3 + eps)`` (0 where g == 0), ``w_k = h w ReLU(g_k) a_k``,
    ``cam = ReLU( sum_k w_k A_k )``. Only channels with g_k > 0 get a non-zero weight, and for those the
    denominator is positive (S_k >= 0 because A is post-ReLU), so no division by zero can occur.

    Returns the map (B, h, w) and the per-image eps fraction: median over channels with g_k > 0 of
    ``eps / (2 g^2 + S g^3 + eps)`` (0.0 where no channel has g_k > 0).
    """
    cam, eps_fraction, _ = _gradcampp(features, grads, eps=eps)
    return cam, eps_fraction


def _median_over_positive(values: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """Per row, the median of ``values`` where ``positive``; 0.0 for a row without any."""
    out = np.zeros(values.shape[0])
    has = positive.any(axis=1)
    if has.any():
        out[has] = np.nanmedian(np.where(positive, values, np.nan)[has], axis=1)
    return out


def _gradcampp(features: np.ndarray, grads: np.ndarray, *, eps: float) -> tuple[np.ndarray, ...]:
    """:func:`gradcampp_raw` plus :func:`gradcampp_saturation`, summing the features once."""
    feats = features.astype(np.float64, copy=False)
    _, _, h, w = feats.shape
    sums = feats.sum(axis=(2, 3))
    positive = grads > 0
    g = np.where(positive, grads, 0.0)
    g2 = g * g
    denom = 2.0 * g2 + sums * g2 * g + eps
    safe = np.where(positive, denom, 1.0)
    alpha = np.where(positive, g2 / safe, 0.0)
    weights = (h * w) * g * alpha
    cam = np.maximum(np.einsum("bk,bkhw->bhw", weights, feats), 0.0)
    eps_fraction = _median_over_positive(eps / safe, positive)
    saturation = _median_over_positive(sums * g, positive)
    return cam, eps_fraction, saturation


def gradcampp_saturation(features: np.ndarray, grads: np.ndarray) -> np.ndarray:
    """GradCAM++ saturation per image: the median over channels with ``g_k > 0`` of ``S_k g_k``.

    ``S_k = sum_ij A_kij`` (features (B, K, h, w)), ``g_k`` the spatially constant gradient of the target
    class (B, K). The denominator is ``g^2 (2 + S_k g_k) + eps``: below ``S_k g_k ~ 2`` a channel's weight
    follows its gradient; far above, ``a_k ~ 1 / (S_k g_k)`` and the weight tends to ``h w / S_k``, which no
    longer depends on the gradient (nor on the head's scale). 0.0 where no channel has ``g_k > 0``.
    """
    sums = np.asarray(features, dtype=np.float64).sum(axis=(2, 3))
    g = np.asarray(grads, dtype=np.float64)
    return _median_over_positive(sums * g, g > 0)


def head_norm_ratio(transfer_weight: np.ndarray, finetuned_weight: np.ndarray) -> float:
    """``||W_ft||_F / ||W_tr||_F``: the ratio of the Frobenius norms of the whole (C, K) head weights.

    The Frobenius norm of the whole matrix (all classes, all channels), not the target class's row: one
    scale per checkpoint pair, the same for every image and class, so the control isolates a global
    rescaling of the head and cannot absorb a class-specific change. A 1x1-conv weight (C, K, 1, 1) is
    reshaped. 1.0 when the transfer head is all zero (its map is all zero at any scale).
    """
    wt = np.asarray(transfer_weight, dtype=np.float64)
    wf = np.asarray(finetuned_weight, dtype=np.float64)
    if wt.shape != wf.shape:
        raise ValueError(f"head weights must have the same shape, got {wt.shape} and {wf.shape}")
    if not (np.isfinite(wt).all() and np.isfinite(wf).all()):
        raise ValueError("head weights contain NaN or infinite values")
    # sum of squares, not np.linalg.norm: its BLAS dot cost milliseconds per call here (thread start-up)
    norm = math.sqrt(float(np.square(wt).sum()))
    return math.sqrt(float(np.square(wf).sum())) / norm if norm > 0.0 else 1.0


def head_scale_control(
    features: np.ndarray,
    transfer_weight: np.ndarray,
    finetuned_weight: np.ndarray,
    classes: Sequence[int] | np.ndarray,
    *,
    input_size: int | tuple[int, int],
    eps: float = DEFAULT_EPS,
) -> CamResult:
    """The head-scale control: GradCAM++ of the *transfer* features with the *transfer* head rescaled to the
    fine-tuned head's Frobenius norm (:func:`head_norm_ratio`), same classes, eps and post-processing.

    No extra forward: the transfer checkpoint's features are reused, only the head weight is scaled (the
    bias does not enter the gradient). Comparing this map with the transfer map gives the drift a pure head
    rescale would cause; it equals pytorch-grad-cam's GradCAM++ on the transfer model with
    ``head.weight *= ratio``.
    """
    ratio = head_norm_ratio(transfer_weight, finetuned_weight)
    scaled = np.asarray(transfer_weight, dtype=np.float64) * ratio
    return closed_form_cams(features, scaled, classes, method="gradcampp", input_size=input_size, eps=eps)


def min_max(maps: np.ndarray) -> np.ndarray:
    """The library's per-map normalization: ``(x - min) / (max(x - min) + 1e-7)``, float32."""
    x = np.asarray(maps, dtype=np.float32)
    axes = tuple(range(1, x.ndim))
    x = x - x.min(axis=axes, keepdims=True)
    return x / (x.max(axis=axes, keepdims=True) + _MINMAX_OFFSET)


def _resize_batch(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of (B, h, w) float32 maps to (B, H, W) with OpenCV INTER_LINEAR, as the library.

    One single-channel ``cv2.resize`` per map, exactly the library's call: OpenCV's multi-channel kernels
    round differently (1 ulp), which made a map depend on how many images shared its batch (and flip
    top-k ties), and OpenCV 5 caps a call at 128 channels.
    """
    height, width = size
    out = np.empty((maps.shape[0], height, width), dtype=np.float32)
    for i, m in enumerate(maps):
        out[i] = cv2.resize(
            np.ascontiguousarray(m, dtype=np.float32), (width, height), interpolation=cv2.INTER_LINEAR
        )
    return out


def postprocess(raw: np.ndarray, size: int | tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Library post-processing of raw ReLU'd maps (B, h, w): returns (resized maps (B, S, S), native maps)."""
    target = _check_size(size)
    native = min_max(raw)
    resized = min_max(np.maximum(_resize_batch(native, target), 0.0))
    return resized, native


def closed_form_cams(
    features: np.ndarray,
    weight: np.ndarray,
    classes: Sequence[int] | np.ndarray,
    *,
    method: str,
    input_size: int | tuple[int, int],
    eps: float = DEFAULT_EPS,
) -> CamResult:
    """Closed-form ``method`` maps for features (B, K, h, w), head weight (C, K) and one class per image."""
    if method not in METHODS:
        raise ValueError(f"unknown CAM method {method!r}; valid options: {', '.join(METHODS)}")
    feats = _check_features(features)
    eps = _check_eps(eps)
    _check_size(input_size)
    batch, channels, h, w = feats.shape
    head = _check_weight(weight, channels)
    idx = _check_classes(classes, batch, head.shape[0])
    grads = class_gradients(head, idx, (h, w))
    eps_fraction: np.ndarray | None = None
    saturation: np.ndarray | None = None
    if method == "layercam":
        raw = layercam_raw(feats, grads)
    else:
        raw, eps_fraction, saturation = _gradcampp(feats, grads, eps=eps)
    maps, native = postprocess(raw, input_size)
    spread = raw.max(axis=(1, 2)) - raw.min(axis=(1, 2))
    return CamResult(
        method=method,
        maps=maps,
        native=native,
        raw=raw,
        all_zero=spread <= 0.0,
        eps_fraction=eps_fraction,
        saturation=saturation,
    )


def closed_form_cams_all_classes(
    features: np.ndarray,
    weight: np.ndarray,
    *,
    method: str,
    input_size: int | tuple[int, int],
    eps: float = DEFAULT_EPS,
) -> CamResult:
    """Maps for every class at once: arrays are (B, C, ...) instead of (B, ...)."""
    feats = _check_features(features)
    batch, channels = feats.shape[:2]
    head = _check_weight(weight, channels)
    num_classes = head.shape[0]
    repeated = np.repeat(feats, num_classes, axis=0)
    classes = np.tile(np.arange(num_classes), batch)
    flat = closed_form_cams(repeated, head, classes, method=method, input_size=input_size, eps=eps)

    def fold(a: np.ndarray) -> np.ndarray:
        return a.reshape(batch, num_classes, *a.shape[1:])

    return CamResult(
        method=method,
        maps=fold(flat.maps),
        native=fold(flat.native),
        raw=fold(flat.raw),
        all_zero=fold(flat.all_zero),
        eps_fraction=None if flat.eps_fraction is None else fold(flat.eps_fraction),
        saturation=None if flat.saturation is None else fold(flat.saturation),
    )
