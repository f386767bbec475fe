"""The parameters of the synthetic radiographs: the ranges of the per-image variation and the image sizes."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from core.errors import InputError

__all__ = ["MAX_SIZE", "MIN_SIZE", "SynthConfig"]

MIN_SIZE = 32
MAX_SIZE = 4096


@dataclass(frozen=True)
class SynthConfig:
    """Ranges of the per-image variation. Ranges are ``(low, high)`` drawn uniformly.

    Lengths are in normalized image units (the image spans ``[-1, 1]`` on both axes) unless marked ``_px``,
    which are pixels at 256 px and scale with the image size.
    """

    rotation_deg: float = 4.0
    shift: float = 0.04
    scale: tuple[float, float] = (0.93, 1.04)
    patient_width: tuple[float, float] = (0.88, 1.06)
    inspiration: tuple[float, float] = (-0.06, 0.06)
    heart_size: tuple[float, float] = (0.9, 1.15)
    exposure: tuple[float, float] = (1.4, 2.1)
    window_low: tuple[float, float] = (0.0, 0.12)
    window_high: tuple[float, float] = (0.9, 1.0)
    gamma: tuple[float, float] = (0.8, 1.25)
    noise: tuple[float, float] = (0.006, 0.03)
    blur_px: tuple[float, float] = (0.35, 1.0)
    lesion_strength: tuple[float, float] = (0.75, 1.0)
    cue_size: float = 0.085

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if isinstance(value, list | tuple):
                low, high = value
                if not (math.isfinite(low) and math.isfinite(high)) or low > high:
                    raise InputError(f"SynthConfig.{name} must be a finite (low, high) range, got {value!r}")
        if not 0.0 < self.cue_size <= 0.3:
            raise InputError(f"SynthConfig.cue_size must be in (0, 0.3], got {self.cue_size}")
