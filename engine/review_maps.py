"""Maps for review: low-resolution, quantised attribution maps small enough to keep in the audit trail.

With ``CXR_DRIFT_KEEP_MAPS=all`` (or ``flagged``) the service keeps, for every request (or only for requests
with a flagged drift result), each report's attribution maps in the audit record's hashed payload, so a
reviewer can see weeks later what moved, without the image. Pure functions (NumPy + PIL), no web or database.

What is kept of one map (:func:`encode_map`): the report's (S, S) map, already min-max normalised to
[0, 1] by the engine, **box-downsampled** (area mean; exact block means when S is a multiple of the grid)
to a fixed ``REVIEW_GRID x REVIEW_GRID`` = 16 x 16 grid, then quantised to uint8 after its own min-max:
``q = round((x - min) / (max - min) * 255)`` (``q = 0`` when ``max == min``), stored as

    {"shape": [16, 16], "min": <float>, "max": <float>, "uint8": "<base64 of the 256 bytes, row-major>"}

:func:`decode_map` inverts it within ``(max - min) / 510`` per cell. Why 16 x 16 and why it carries no
readable anatomy: the maps are weighted sums of the network's last feature maps (stride 32: a 3 x 3 to 9 x 9
grid at the input sizes served), bilinearly upsampled; a 16 x 16 grid holds about what that feature grid
holds and nothing of the radiograph's edges, ribs or text (each cell averages a 14 x 14 px block of a
224 px input). The image itself, or any thumbnail of it, is never kept.

:func:`review_maps` builds the payload section for one request's reports; :func:`map_png` and
:func:`legend_png` draw a kept map and the colour scale (jet, :func:`engine.overlay.colormap`) as PNG.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from core.vocabulary import KEEP_MAPS
from engine.overlay import colormap
from engine.report import DriftReport

__all__ = [
    "KEEP_MAPS",
    "REVIEW_GRID",
    "box_downsample",
    "decode_map",
    "encode_map",
    "legend_png",
    "map_png",
    "review_maps",
]

REVIEW_GRID = 16
_LEVELS = 255


def _area_mean_rows(values: np.ndarray, target: int) -> np.ndarray:
    """Area means of ``target`` equal bands along axis 0: differences of the exact integral, which is the
    cumulative sum interpolated linearly inside a cell (no BLAS: a small matmul through a threaded BLAS costs
    tens of ms on a loaded machine)."""
    n = values.shape[0]
    integral = np.concatenate([np.zeros((1, values.shape[1])), np.cumsum(values, axis=0)])
    edges = np.linspace(0.0, float(n), target + 1)
    cell = np.minimum(np.floor(edges).astype(np.intp), n - 1)
    frac = (edges - cell)[:, None]
    at_edges = integral[cell] + frac * (integral[cell + 1] - integral[cell])
    return np.diff(at_edges, axis=0) / (n / target)


def box_downsample(cam: np.ndarray, size: int = REVIEW_GRID) -> np.ndarray:
    """``cam`` (H, W) averaged over a ``size x size`` grid of equal areas (float64).

    Each output cell is the area-weighted mean of the input cells it covers (block means when H and W are
    multiples of ``size``). A map already at or below ``size`` in both directions is returned as is.
    """
    values = np.asarray(cam, dtype=np.float64)
    if values.ndim != 2 or min(values.shape) < 1:
        raise ValueError(f"expected a 2-D map, got shape {values.shape}")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if values.shape[0] <= size and values.shape[1] <= size:
        return values.copy()
    h, w = values.shape
    if h % size == 0 and w % size == 0:  # block means
        return values.reshape(size, h // size, size, w // size).mean(axis=(1, 3))
    rows = _area_mean_rows(values, min(size, h))
    return _area_mean_rows(rows.T, min(size, w)).T


def _finite_float(value: float) -> float:
    number = float(value) + 0.0  # -0.0 would come back from the database as 0.0 and change the row hash
    if not math.isfinite(number):
        raise ValueError(f"expected a finite number, got {value!r}")
    return number


def encode_map(cam: np.ndarray, size: int = REVIEW_GRID) -> dict[str, Any]:
    """``cam`` box-downsampled to ``size x size`` and quantised to uint8 (module docstring for the format).

    Non-finite cells (there should be none) are stored as the map's minimum.
    """
    small = box_downsample(cam, size)
    finite = np.isfinite(small)
    if not finite.any():
        small = np.zeros_like(small)
    elif not finite.all():
        small = np.where(finite, small, small[finite].min())
    lo, hi = _finite_float(small.min()), _finite_float(small.max())
    span = hi - lo
    q = np.rint((small - lo) / span * _LEVELS) if span > 0 else np.zeros_like(small)
    data = np.clip(q, 0, _LEVELS).astype(np.uint8)
    return {
        "shape": [int(data.shape[0]), int(data.shape[1])],
        "min": lo,
        "max": hi,
        "uint8": base64.b64encode(data.tobytes(order="C")).decode("ascii"),
    }


def decode_map(encoded: Mapping[str, Any]) -> np.ndarray:
    """The float64 (h, w) map of :func:`encode_map`'s output; ``ValueError`` when it is malformed."""
    try:
        shape = [int(v) for v in encoded["shape"]]
        lo, hi = _finite_float(encoded["min"]), _finite_float(encoded["max"])
        raw = base64.b64decode(str(encoded["uint8"]), validate=True)
    except (KeyError, TypeError, binascii.Error) as exc:
        raise ValueError(f"not an encoded review map: {type(exc).__name__}: {exc}") from exc
    if len(shape) != 2 or min(shape) < 1 or len(raw) != shape[0] * shape[1] or hi < lo:
        raise ValueError(f"encoded review map: shape {shape} with {len(raw)} bytes, min {lo}, max {hi}")
    q = np.frombuffer(raw, dtype=np.uint8).reshape(shape).astype(np.float64)
    return lo + q / _LEVELS * (hi - lo)


def _any_flagged(reports: Sequence[DriftReport]) -> bool:
    return any(bool(result.get("flagged")) for report in reports for result in report.methods.values())


def review_maps(reports: Sequence[DriftReport], keep: str, size: int = REVIEW_GRID) -> dict[str, Any] | None:
    """The audit payload's ``maps`` section for one request's reports, or None when ``keep`` is "none".

    ``{"keep": keep, "grid": size, "kept": bool, "models": {model: {method: {checkpoint: encoded}}}}``;
    ``kept`` is False (and ``models`` empty) when ``keep`` is "flagged" and no drift result of the request is
    flagged. Checkpoints are those of ``report.maps``: ``transfer``, ``finetuned`` and, where the two
    checkpoints predict different classes, ``transfer_own``/``finetuned_own``. A report without maps (the
    caller did not ask the engine for them) is a ``ValueError``: keeping maps must not silently keep none.
    """
    if keep not in KEEP_MAPS:
        raise ValueError(f"keep must be one of {', '.join(KEEP_MAPS)}, got {keep!r}")
    if keep == "none":
        return None
    kept = keep == "all" or _any_flagged(reports)
    models: dict[str, Any] = {}
    if kept:
        for report in reports:
            if report.maps is None:
                raise ValueError(f"{report.model}: the report has no maps to keep (computed without maps)")
            models[report.model] = {
                method: {checkpoint: encode_map(cam, size) for checkpoint, cam in by_checkpoint.items()}
                for method, by_checkpoint in report.maps.items()
            }
    return {"keep": keep, "grid": size, "kept": kept, "models": models}


def _png(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8), mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def map_png(values: np.ndarray, *, scale: int = 8) -> bytes:
    """A kept map (values in [0, 1], clipped) in the jet colour scale, each cell a ``scale`` px square."""
    grid = np.asarray(values, dtype=np.float64)
    if grid.ndim != 2 or not np.isfinite(grid).all():
        raise ValueError(f"expected a finite 2-D map, got shape {grid.shape}")
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    big = np.repeat(np.repeat(grid, scale, axis=0), scale, axis=1)
    return _png(colormap(big))


def legend_png(width: int = 256, height: int = 12) -> bytes:
    """The colour scale of :func:`map_png`, 0 on the left to 1 on the right."""
    ramp = np.tile(np.linspace(0.0, 1.0, width), (height, 1))
    return _png(colormap(ramp))
