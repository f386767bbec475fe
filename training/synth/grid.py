"""The pixel grid in normalized coordinates and the soft steps, uniform draws and smooth noise drawn on it."""

from __future__ import annotations

from functools import lru_cache

import numpy as np

__all__ = ["FloatArray", "pixel_grid", "ramp", "smooth_noise", "uniform"]

FloatArray = np.ndarray


def ramp(distance: FloatArray, width: float) -> FloatArray:
    """Soft step: 0 below ``-width/2``, 1 above ``width/2``, linear between (cheaper than a sigmoid)."""
    out = distance * np.float32(1.0 / width)
    out += np.float32(0.5)
    return np.clip(out, 0.0, 1.0, out=out)


def uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(rng.uniform(bounds[0], bounds[1]))


@lru_cache(maxsize=8)
def pixel_grid(size: int) -> tuple[FloatArray, FloatArray]:
    """Pixel centres in normalized coordinates, x to the right and y down, both in [-1, 1]."""
    axis = ((np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0).astype(np.float32)
    x = np.broadcast_to(axis[None, :], (size, size))
    y = np.broadcast_to(axis[:, None], (size, size))
    return x, y


@lru_cache(maxsize=16)
def _interp_weights(size: int, coarse: int) -> tuple[np.ndarray, np.ndarray, FloatArray]:
    """Indices and weights of linear interpolation from ``coarse`` samples to ``size`` pixel centres."""
    pos = (np.arange(size) + 0.5) / size * (coarse - 1)
    lo = np.clip(np.floor(pos).astype(np.intp), 0, coarse - 2)
    frac = (pos - lo).astype(np.float32)
    return lo, lo + 1, frac


def smooth_noise(rng: np.random.Generator, size: int, coarse: int) -> FloatArray:
    """Band-limited noise, roughly unit variance, with about ``coarse`` features across the image.

    Separable linear upsampling of a coarse Gaussian grid (gathers, no BLAS: BLAS threads only slow down
    matrices this small).
    """
    lo, hi, frac = _interp_weights(size, coarse)
    small = rng.standard_normal((coarse, coarse), dtype=np.float32)
    rows = small[lo] + (small[hi] - small[lo]) * frac[:, None]
    field: FloatArray = rows[:, lo] + (rows[:, hi] - rows[:, lo]) * frac[None, :]
    return field * np.float32(1.6)
