"""One synthetic radiograph: the anatomy, a finding placed in the lungs, then the radiograph formed from them.

Attenuation ``A`` is summed along the beam and mapped to brightness as ``I = 1 - exp(-k A)``, then windowed,
gamma-corrected, blurred and given signal-dependent noise; the corner cue, if any, is drawn before the noise.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from core.errors import InputError
from training.synth.anatomy import Anatomy, draw_anatomy
from training.synth.config import MAX_SIZE, MIN_SIZE, SynthConfig
from training.synth.findings import FINDING_RENDERERS, FINDINGS, MASK_THRESHOLD, finding_index
from training.synth.grid import FloatArray, smooth_noise, uniform

__all__ = ["generate_image"]


def _draw_cue(image: FloatArray, rng: np.random.Generator, cue_size: float) -> None:
    """A bright "L" (lead side marker) in the upper right corner, jittered by a few pixels."""
    size = image.shape[0]
    side = max(5, round(cue_size * size))
    bar = max(1, round(side / 4))
    pad = round(0.04 * size)
    jitter = max(1, round(0.015 * size))
    row = pad + int(rng.integers(0, jitter + 1))
    col = size - pad - side - int(rng.integers(0, jitter + 1))
    value = np.float32(0.97)
    image[row : row + side, col : col + bar] = value
    image[row + side - bar : row + side, col : col + round(0.7 * side)] = value


def _place_finding(
    anatomy: Anatomy, finding: int, rng: np.random.Generator, *, size: int, config: SynthConfig, where: str
) -> tuple[FloatArray, np.ndarray]:
    """The finding's opacity and lesion mask (inside the lung mask); redrawn until the mask is not empty.

    ``normal`` gives a zero opacity and an empty mask. ``where`` names the image in the error message.
    """
    lung_mask = anatomy.lung_hard
    renderer = FINDING_RENDERERS[finding]
    opacity = np.zeros_like(anatomy.u)
    lesion_mask = np.zeros((size, size), dtype=bool)
    if renderer is not None:
        for _attempt in range(20):
            strength = uniform(rng, config.lesion_strength)
            opacity = renderer(anatomy, rng, size, strength)
            lesion_mask = (opacity > MASK_THRESHOLD[finding]) & lung_mask
            if lesion_mask.any():
                break
        else:  # pragma: no cover - the renderers place findings inside the lungs by construction
            raise RuntimeError(f"could not place a {FINDINGS[finding]} finding in {where}")
    return opacity, lesion_mask


def _expose(
    parts: list[FloatArray], opacity: FloatArray, rng: np.random.Generator, *, size: int, config: SynthConfig
) -> FloatArray:
    """Radiograph formation: fluid replaces air, attenuation summed along the beam, detector response."""
    tissue, air, bone = parts
    texture = 0.025 * smooth_noise(rng, size, 48) * tissue
    attenuation = tissue * (1.0 - 0.8 * np.minimum(air * (1.0 - opacity), 1.0)) + bone + texture
    exposure = uniform(rng, config.exposure)
    image = 1.0 - np.exp(-exposure * np.maximum(attenuation, 0.0))
    low, high = uniform(rng, config.window_low), uniform(rng, config.window_high)
    image = np.clip((image - low) * (1.0 / (high - low)), 0.0, 1.0) ** uniform(rng, config.gamma)
    sigma = uniform(rng, config.blur_px) * size / 256
    blurred: FloatArray = ndimage.gaussian_filter(image.astype(np.float32), sigma, mode="nearest")
    return blurred


def _add_noise(image: FloatArray, rng: np.random.Generator, *, config: SynthConfig) -> np.ndarray:
    """Signal-dependent detector noise, then quantization to uint8."""
    size = image.shape[0]
    noise_level = uniform(rng, config.noise)
    # Triangular noise (difference of two uniforms, unit variance): Gaussian enough, 10x cheaper to draw.
    noise = rng.random((size, size), dtype=np.float32) - rng.random((size, size), dtype=np.float32)
    image = image + (noise_level * math.sqrt(6.0)) * np.sqrt(image + 0.05) * noise
    return np.clip(image * 255.0 + 0.5, 0.0, 255.0).astype(np.uint8)


def generate_image(
    index: int,
    *,
    seed: int,
    label: int | str,
    size: int = 256,
    cue: bool = False,
    config: SynthConfig | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One synthetic PA chest radiograph and its masks.

    ``label`` is the finding, by index into :data:`FINDINGS` or by name. Returns ``(image, lesion_mask,
    lung_mask)``: ``image`` uint8 (size, size); the masks bool (size, size), the lesion mask inside the lung
    mask, empty for ``normal`` and non-empty otherwise. The anatomy depends only on ``(seed, index)``, the
    finding on ``(seed, index)`` and ``label``, and ``cue`` adds the corner marker and nothing else.
    """
    finding = finding_index(label)
    if isinstance(size, bool) or not isinstance(size, int) or not MIN_SIZE <= size <= MAX_SIZE:
        raise InputError(f"size must be an integer in [{MIN_SIZE}, {MAX_SIZE}] pixels, got {size!r}")
    if seed < 0 or index < 0:
        raise InputError(f"seed and index must be non-negative integers, got seed={seed}, index={index}")
    config = config or SynthConfig()
    # The anatomy and the image formation draw from one generator, the finding and the cue from their own.
    anatomy_rng = np.random.default_rng([seed, index, 0])
    anatomy, parts = draw_anatomy(size, anatomy_rng, config)
    opacity, lesion_mask = _place_finding(
        anatomy,
        finding,
        np.random.default_rng([seed, index, 1]),
        size=size,
        config=config,
        where=f"image {index} (seed {seed})",
    )
    image = _expose(parts, opacity, anatomy_rng, size=size, config=config)
    if cue:
        _draw_cue(image, np.random.default_rng([seed, index, 3]), config.cue_size)
    pixels = _add_noise(image, anatomy_rng, config=config)
    return pixels, lesion_mask, anatomy.lung_hard.copy()
