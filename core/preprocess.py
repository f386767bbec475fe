"""Turn a decoded grayscale radiograph into the network input: one function, shared by training and service.

``preprocess(gray)``: bilinear resize of the whole image (no crop, aspect ratio not kept) to S x S with PIL
in float ('F') mode, grayscale replicated to 3 channels, then per-channel ``(x - mean[c]) / std[c]``.

This module does not import torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

__all__ = ["preprocess", "preprocess_batch", "resize_gray"]


def resize_gray(gray: np.ndarray, *, size: int) -> np.ndarray:
    """Bilinear resize of a 2-D image to ``size`` x ``size`` (PIL float mode, antialiased when shrinking)."""
    _check_gray(gray)
    _check_size(size)
    image = Image.fromarray(np.ascontiguousarray(gray, dtype=np.float32))
    if image.size != (size, size):
        image = image.resize((size, size), resample=Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.float32).copy()


def preprocess(
    gray: np.ndarray,
    *,
    input_size: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> np.ndarray:
    """Network input for one grayscale image: float32 (3, S, S) with S = ``input_size``.

    ``out[c] = (resize(gray) - mean[c]) / std[c]`` for c in 0..2, where ``gray`` is (H, W) in [0, 1]
    (as :func:`core.imageio.read_image` returns) and ``resize`` is PIL's bilinear resize to S x S.
    """
    mean_arr, std_arr = _check_norm(mean, std)
    resized = resize_gray(gray, size=input_size)
    out = (resized[None, :, :] - mean_arr[:, None, None]) / std_arr[:, None, None]
    return out.astype(np.float32, copy=False)


def preprocess_batch(
    images: Sequence[np.ndarray],
    *,
    input_size: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> np.ndarray:
    """:func:`preprocess` applied to each image, stacked to float32 (N, 3, S, S)."""
    if len(images) == 0:
        raise ValueError("preprocess_batch needs at least one image, got an empty sequence")
    return np.stack([preprocess(g, input_size=input_size, mean=mean, std=std) for g in images])


def _check_gray(gray: np.ndarray) -> None:
    if not isinstance(gray, np.ndarray):
        raise ValueError(f"expected a NumPy array of shape (H, W), got {type(gray).__name__}")
    if gray.ndim != 2:
        raise ValueError(f"expected a grayscale image of shape (H, W), got shape {gray.shape}")
    if gray.size == 0:
        raise ValueError(f"expected a non-empty image, got shape {gray.shape}")
    if not np.issubdtype(gray.dtype, np.number) or np.issubdtype(gray.dtype, np.complexfloating):
        raise ValueError(f"expected a real-valued image, got dtype {gray.dtype}")
    if not np.all(np.isfinite(gray)):
        raise ValueError("expected finite pixel values, got NaN or infinity")


def _check_size(size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or size <= 0:
        raise ValueError(f"input_size must be a positive integer, got {size!r}")


def _check_norm(mean: Sequence[float], std: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    mean_arr = np.asarray(mean, dtype=np.float32).ravel()
    std_arr = np.asarray(std, dtype=np.float32).ravel()
    if mean_arr.shape != (3,) or std_arr.shape != (3,):
        raise ValueError(
            f"mean and std need 3 values (one per channel), got {mean_arr.size} and {std_arr.size}"
        )
    if not (np.all(np.isfinite(mean_arr)) and np.all(np.isfinite(std_arr)) and np.all(std_arr > 0)):
        raise ValueError(f"std must be finite and > 0 and mean finite, got mean={list(mean)} std={list(std)}")
    return mean_arr, std_arr
