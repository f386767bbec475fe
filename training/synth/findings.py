"""The findings: opacities that replace lung air by fluid, so they are bright and lie inside the lungs.

One renderer per finding, in the order of :data:`FINDINGS` (``normal`` has none); each draws its random
numbers from the finding's own generator and returns the opacity (0..1) on the pixel grid. A pixel belongs to
the lesion mask where the opacity exceeds the finding's threshold in :data:`MASK_THRESHOLD`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from core.errors import InputError
from training.synth.anatomy import Anatomy, lung_border
from training.synth.grid import FloatArray, ramp, smooth_noise, uniform

__all__ = ["FINDINGS", "FINDING_RENDERERS", "MASK_THRESHOLD", "finding_index"]

FINDINGS: tuple[str, ...] = (
    "normal",
    "lobar_consolidation",
    "bilateral_lower_zone",
    "diffuse_patchy",
    "upper_zone_nodules",
)


def _side_params(anatomy: Anatomy, right_side: bool) -> tuple[FloatArray, float, float]:
    """The side mask, apex height and dome height of one lung."""
    p = anatomy.params
    side = anatomy.right if right_side else ~anatomy.right
    return side, p["apex_v"], p["dome_r" if right_side else "dome_l"]


def _lobar_consolidation(
    anatomy: Anatomy, rng: np.random.Generator, size: int, strength: float
) -> FloatArray:
    """A dense opacity filling (most of) one lobe, sharply bounded by its fissure; maybe air bronchograms."""
    right_side = bool(rng.random() < 0.5)
    side, apex, dome = _side_params(anatomy, right_side)
    v, w = anatomy.v, anatomy.w
    height = dome - apex
    lobes = ("upper", "middle", "lower") if right_side else ("upper", "lower")
    lobe = lobes[int(rng.integers(len(lobes)))]
    level = apex + height * uniform(rng, (0.45, 0.55))
    if lobe == "upper":
        # Right: horizontal fissure; left: the upper lobe with the lingula reaches lower.
        fissure = level + 0.04 * (w - 0.4) + (0.0 if right_side else 0.12)
        region = ramp(fissure - v, 0.015)
    elif lobe == "middle":
        region = ramp(v - level, 0.015) * ramp(0.48 - w, 0.1)
    else:
        fissure = level + 0.12 + 0.2 * (0.45 - w)
        region = ramp(v - fissure, 0.015)
    fill = ramp(smooth_noise(rng, size, 6) + uniform(rng, (1.0, 2.2)), 0.9)
    texture = 0.88 + 0.12 * smooth_noise(rng, size, 24)
    opacity = side * anatomy.lung_soft * region * fill * texture * (0.9 * strength)
    if rng.random() < 0.6:
        # Air bronchograms: thin air-filled branches running from the hilum through the opacity.
        inside = np.flatnonzero((opacity > 0.5) & (anatomy.hilum_radius > 0.12))
        if inside.size:
            bronchi = np.zeros_like(opacity)
            for pick in rng.choice(inside, size=min(int(rng.integers(2, 6)), inside.size), replace=False):
                aim = anatomy.hilum_angle.flat[pick]
                reach = anatomy.hilum_radius.flat[pick] + uniform(rng, (0.0, 0.1))
                delta = np.abs(anatomy.hilum_angle - aim)
                delta = np.minimum(delta, 2 * np.pi - delta) * anatomy.hilum_radius
                bronchi = np.maximum(
                    bronchi,
                    ramp(0.011 - delta, 0.008)
                    * ramp(anatomy.hilum_radius - 0.08, 0.04)
                    * ramp(reach - anatomy.hilum_radius, 0.05),
                )
            opacity = opacity * (1.0 - 0.35 * bronchi * side)
    return np.clip(opacity, 0.0, 1.0)


def _bilateral_lower_zone(
    anatomy: Anatomy, rng: np.random.Generator, size: int, strength: float
) -> FloatArray:
    """Patchy opacities in the peripheral lower zones of both lungs."""
    span = np.maximum(anatomy.lateral - anatomy.medial, 1e-3)
    peripheral = ramp((anatomy.w - anatomy.medial) / span - uniform(rng, (0.4, 0.55)), 0.3)
    lower = ramp(anatomy.t - uniform(rng, (0.6, 0.72)), 0.2)
    per_side = np.where(
        anatomy.right, np.float32(uniform(rng, (0.75, 1.0))), np.float32(uniform(rng, (0.75, 1.0)))
    )
    patches = ramp(smooth_noise(rng, size, 16) + uniform(rng, (0.6, 1.1)), 1.0)
    opacity = anatomy.lung_soft * peripheral * lower * per_side * patches * (1.1 * strength)
    return np.clip(opacity, 0.0, 0.95)


def _diffuse_patchy(anatomy: Anatomy, rng: np.random.Generator, size: int, strength: float) -> FloatArray:
    """Ground-glass patches scattered through both lungs."""
    patches = ramp(smooth_noise(rng, size, 14) - uniform(rng, (0.0, 0.5)), 1.4)
    modulation = 0.7 + 0.2 * smooth_noise(rng, size, 5) + 0.1 * smooth_noise(rng, size, 40)
    opacity = anatomy.lung_soft * patches * modulation * (uniform(rng, (0.5, 0.7)) * strength)
    return np.clip(opacity, 0.0, 0.9)


def _upper_zone_nodules(anatomy: Anatomy, rng: np.random.Generator, size: int, strength: float) -> FloatArray:
    """2-6 round nodules in the upper zones, about a third of them cavitated (a ring with an air centre)."""
    p = anatomy.params
    opacity = np.zeros_like(anatomy.u)
    min_radius = 2.5 / p["scale_px"]  # at least a few pixels whatever the image size
    for _ in range(int(rng.integers(2, 7))):
        right_side = bool(rng.random() < 0.5)
        _, apex, dome = _side_params(anatomy, right_side)
        t_n = uniform(rng, (0.12, 0.42))
        radius = max(uniform(rng, (0.025, 0.06)), min_radius)
        medial, lateral = lung_border(
            t_n, apex_w=p["apex_w"], lateral_w=p["lateral_w"], medial_w=p["medial_w"]
        )
        low, high = float(medial) + radius + 0.02, float(lateral) - radius - 0.02
        w_n = uniform(rng, (low, max(low, high)))
        u_n = -w_n if right_side else w_n
        v_n = apex + t_n * (dome - apex)
        box = anatomy.pose.box(u_n - radius, u_n + radius, v_n - radius, v_n + radius)
        d2 = ((anatomy.u[box] - u_n) ** 2 + (anatomy.v[box] - v_n) ** 2) * (1.0 / radius**2)
        nodule = np.clip(1.0 - d2, 0.0, 1.0) ** 0.3
        if rng.random() < 0.35:
            nodule = nodule - 0.9 * np.clip(1.0 - d2 / 0.5**2, 0.0, 1.0) ** 0.3
        opacity[box] = np.maximum(opacity[box], nodule * uniform(rng, (0.8, 1.0)) * strength)
    return np.clip(opacity, 0.0, 1.0) * anatomy.lung_soft


Renderer = Callable[[Anatomy, np.random.Generator, int, float], FloatArray]

FINDING_RENDERERS: tuple[Renderer | None, ...] = (
    None,
    _lobar_consolidation,
    _bilateral_lower_zone,
    _diffuse_patchy,
    _upper_zone_nodules,
)
# Opacity above which a pixel belongs to the lesion mask (per finding; ground glass is fainter).
MASK_THRESHOLD = (1.0, 0.3, 0.2, 0.15, 0.0)


def finding_index(label: int | str) -> int:
    """The index into :data:`FINDINGS` of a finding given by index or by name."""
    if isinstance(label, str):
        if label not in FINDINGS:
            raise InputError(f"unknown finding {label!r}; expected one of {', '.join(FINDINGS)} or 0-4")
        return FINDINGS.index(label)
    if (
        isinstance(label, bool)
        or not isinstance(label, int | np.integer)
        or not 0 <= int(label) < len(FINDINGS)
    ):
        raise InputError(
            f"label must be a finding index 0-{len(FINDINGS) - 1} or a finding name, got {label!r}"
        )
    return int(label)
