"""Heat-map overlay of an attribution map on its radiograph, as PNG bytes (NumPy + PIL only)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

__all__ = ["colormap", "overlay_png"]

# anchor colours of a jet-like map (blue -> cyan -> green -> yellow -> red), positions in [0, 1]
_ANCHORS = np.array([0.0, 0.125, 0.375, 0.625, 0.875, 1.0])
_COLOURS = np.array(
    [[0, 0, 128], [0, 0, 255], [0, 255, 255], [255, 255, 0], [255, 0, 0], [128, 0, 0]], dtype=np.float64
)


def colormap(values: np.ndarray) -> np.ndarray:
    """RGB float (…, 3) in [0, 255] for values in [0, 1] (clipped), piecewise-linear jet."""
    v = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)
    return np.stack([np.interp(v, _ANCHORS, _COLOURS[:, c]) for c in range(3)], axis=-1)


def overlay_png(gray: np.ndarray, cam: np.ndarray, *, alpha: float = 0.45) -> bytes:
    """``(1 - alpha) * gray + alpha * colormap(cam)`` as an RGB PNG at the radiograph's size.

    ``gray`` (H, W) in [0, 1]; ``cam`` (h, w) in [0, 1], bilinearly resized to (H, W) when it differs.
    """
    g = np.asarray(gray, dtype=np.float32)
    c = np.asarray(cam, dtype=np.float32)
    if g.ndim != 2 or c.ndim != 2:
        raise ValueError(f"expected 2-D gray and cam arrays, got shapes {g.shape} and {c.shape}")
    if not (np.isfinite(g).all() and np.isfinite(c).all()):
        raise ValueError("gray and cam must be finite (no NaN or infinite values)")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    if c.shape != g.shape:
        c = np.asarray(Image.fromarray(c).resize((g.shape[1], g.shape[0]), Image.Resampling.BILINEAR))
    base = np.repeat(np.clip(g, 0.0, 1.0)[:, :, None] * 255.0, 3, axis=2)
    rgb = (1.0 - alpha) * base + alpha * colormap(c)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8), mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()
