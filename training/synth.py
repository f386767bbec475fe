"""Synthetic PA chest radiographs with ground-truth lesion and lung masks (NumPy/SciPy only, no torch).

Each image is an analytic phantom rendered in radiograph convention (air dark, bone bright): a soft-tissue
thorax whose thickness falls off towards the skin, two air-filled lungs (apex, lateral wall, diaphragm dome,
costophrenic recess), heart and mediastinum, trachea, hilar vessels and lung markings, posterior and anterior
ribs, spine, clavicles, humeral heads and a gastric bubble. Attenuation ``A`` is summed along the beam and
mapped to brightness as ``I = 1 - exp(-k A)``, then windowed, gamma-corrected, blurred and given
signal-dependent noise. Pose (rotation, shift, scale), patient width, inspiration, heart size, exposure,
contrast, gamma, blur and noise vary per image.

Findings replace lung air by fluid, so they are bright and lie inside the lungs. The five findings, in the
order of the class names:

0. ``normal``: none (empty lesion mask);
1. ``lobar_consolidation``: a dense opacity filling one lobe of one lung, with a sharp fissural border and
   sometimes air bronchograms;
2. ``bilateral_lower_zone``: patchy opacities in the peripheral lower zones of both lungs;
3. ``diffuse_patchy``: ground-glass patches scattered through both lungs;
4. ``upper_zone_nodules``: 2-6 round nodules, some cavitated, in the upper zones.

Every image comes with a lung mask (the visible lung fields: lungs minus the heart shadow) and a lesion mask
(inside the lung mask; empty for ``normal``). Images are deterministic: the anatomy is drawn from
``default_rng([seed, index, 0])`` and the finding from ``default_rng([seed, index, 1])``, so the same index
has the same patient whatever its label, and a dataset is byte-identical for the same arguments whether it
is written by one process or many.

Dataset layout (``generate_dataset``)::

    OUT/<split>/<class>/<id>.png        8-bit grayscale
    OUT/masks/<id>_lesion.png           0/255
    OUT/masks/<id>_lungs.png            0/255
    OUT/manifest.csv                    path,label,split,lesion_mask,lung_mask,cue,lesion_fraction
    OUT/synth_config.json               the parameters

Paths in the manifest are relative to ``OUT``; ``cue`` is 0/1; ``lesion_fraction`` is
``|lesion mask| / |lung mask|`` (the share of the visible lung fields covered by the finding).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import multiprocessing
import re
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from core.errors import InputError
from core.vocabulary import SPLITS

__all__ = [
    "DEFAULT_CLASS_NAMES",
    "FINDINGS",
    "GENERATOR_VERSION",
    "MANIFEST_COLUMNS",
    "SPLITS",
    "SynthConfig",
    "contact_sheet",
    "generate_dataset",
    "generate_image",
    "iter_manifest",
    "parse_class_names",
    "parse_split",
]

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 1
FINDINGS: tuple[str, ...] = (
    "normal",
    "lobar_consolidation",
    "bilateral_lower_zone",
    "diffuse_patchy",
    "upper_zone_nodules",
)
DEFAULT_CLASS_NAMES: tuple[str, ...] = FINDINGS
MANIFEST_COLUMNS: tuple[str, ...] = (
    "path",
    "label",
    "split",
    "lesion_mask",
    "lung_mask",
    "cue",
    "lesion_fraction",
)
MIN_SIZE = 32
MAX_SIZE = 4096
_CLASS_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_RESERVED_NAMES = frozenset({"masks"})

FloatArray = np.ndarray


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


# ----------------------------------------------------------------------------------------------- helpers


def _ramp(distance: FloatArray, width: float) -> FloatArray:
    """Soft step: 0 below ``-width/2``, 1 above ``width/2``, linear between (cheaper than a sigmoid)."""
    out = distance * np.float32(1.0 / width)
    out += np.float32(0.5)
    return np.clip(out, 0.0, 1.0, out=out)


def _uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(rng.uniform(bounds[0], bounds[1]))


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[FloatArray, FloatArray]:
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


def _smooth_noise(rng: np.random.Generator, size: int, coarse: int) -> FloatArray:
    """Band-limited noise, roughly unit variance, with about ``coarse`` features across the image.

    Separable linear upsampling of a coarse Gaussian grid (gathers, no BLAS: BLAS threads only slow down
    matrices this small).
    """
    lo, hi, frac = _interp_weights(size, coarse)
    small = rng.standard_normal((coarse, coarse), dtype=np.float32)
    rows = small[lo] + (small[hi] - small[lo]) * frac[:, None]
    field: FloatArray = rows[:, lo] + (rows[:, hi] - rows[:, lo]) * frac[None, :]
    return field * np.float32(1.6)


# ------------------------------------------------------------------------------------------------ anatomy


@dataclass
class _Anatomy:
    """Fields on the pixel grid that findings need (all in patient coordinates u, v)."""

    u: FloatArray
    v: FloatArray
    w: FloatArray  # distance from the midline, |u|
    right: FloatArray  # bool: the patient's right lung side (image left, u < 0)
    t: FloatArray  # 0 at the lung apex, 1 at the dome peak
    medial: FloatArray
    lateral: FloatArray
    lung_soft: FloatArray
    lung_hard: FloatArray
    heart_soft: FloatArray
    hilum_radius: FloatArray  # distance from the hilum of the same side
    hilum_angle: FloatArray  # angle around it (mirrored on the two sides)
    pose: _Pose
    params: dict[str, float]


def _lung_border(
    t: FloatArray | float, *, apex_w: float, lateral_w: float, medial_w: float
) -> tuple[Any, Any]:
    """Medial and lateral lung borders (distance from the midline) at relative height ``t``."""
    t_lat = np.sqrt(np.clip(np.asarray(t, dtype=np.float32) / 0.62, 0.0, 1.0))
    t_med = np.sqrt(np.clip(np.asarray(t, dtype=np.float32) / 0.3, 0.0, 1.0))
    lateral = apex_w + (lateral_w - apex_w) * t_lat
    medial = apex_w - (apex_w - medial_w) * t_med
    return medial, lateral


@dataclass(frozen=True)
class _Pose:
    """Where the patient lies on the detector: image (x, y) = scale * R(theta) (width * u, v) + shift."""

    size: int
    cos_t: float
    sin_t: float
    tx: float
    ty: float
    scale: float
    width: float

    def patient_coords(self) -> tuple[FloatArray, FloatArray]:
        x, y = _grid(self.size)
        xs, ys = x - np.float32(self.tx), y - np.float32(self.ty)
        u = (self.cos_t * xs + self.sin_t * ys) * np.float32(1.0 / (self.scale * self.width))
        v = (-self.sin_t * xs + self.cos_t * ys) * np.float32(1.0 / self.scale)
        return u.astype(np.float32), v.astype(np.float32)

    def box(self, u0: float, u1: float, v0: float, v1: float) -> tuple[slice, slice]:
        """Pixel rows and columns covering the patient-coordinate box [u0, u1] x [v0, v1] (plus a margin)."""
        us = np.array([u0, u1, u0, u1]) * self.width
        vs = np.array([v0, v0, v1, v1])
        xs = self.scale * (self.cos_t * us - self.sin_t * vs) + self.tx
        ys = self.scale * (self.sin_t * us + self.cos_t * vs) + self.ty

        def span(values: np.ndarray) -> slice:
            low = math.floor((values.min() + 1.0) / 2.0 * self.size - 0.5) - 2
            high = math.ceil((values.max() + 1.0) / 2.0 * self.size - 0.5) + 3
            return slice(min(max(low, 0), self.size), min(max(high, 0), self.size))

        return span(ys), span(xs)


def _anatomy(size: int, rng: np.random.Generator, config: SynthConfig) -> tuple[_Anatomy, list[FloatArray]]:
    """Render the normal chest; return the fields findings need and the attenuation parts.

    Returns ``(anatomy, [tissue, air, bone])``: soft-tissue thickness, air fraction (lungs, trachea, stomach)
    and added density (bones, vessels) on the pixel grid. Structures confined to a part of the image are
    computed on their bounding box only, which is what keeps this at a few milliseconds per image.
    """
    pose = _Pose(
        size=size,
        cos_t=1.0,
        sin_t=0.0,
        tx=_uniform(rng, (-config.shift, config.shift)),
        ty=_uniform(rng, (-config.shift, config.shift)),
        scale=_uniform(rng, config.scale),
        width=_uniform(rng, config.patient_width),
    )
    theta = math.radians(_uniform(rng, (-config.rotation_deg, config.rotation_deg)))
    pose = _Pose(**{**asdict(pose), "cos_t": math.cos(theta), "sin_t": math.sin(theta)})
    u, v = pose.patient_coords()
    w = np.abs(u)
    right = u < 0
    right_f = right.astype(np.float32)

    # Body outline: neck, shoulders, chest wall; thickness like a cylinder seen side-on.
    half_width = 0.23 + 0.4 * _ramp(v + 0.83, 0.14) + 0.42 * _ramp(v + 0.66, 0.2) - 0.14 * _ramp(v - 0.1, 1.2)
    tissue = np.clip(1.0 - (u / half_width) ** 2, 0.0, 1.0) ** 0.75

    # Lungs: both sides from the same formulas in w = |u|, with per-side parameters, on the lungs' box.
    insp = _uniform(rng, config.inspiration)
    apex_v = -0.72 - 0.5 * insp + _uniform(rng, (-0.02, 0.02))
    dome_r = 0.40 + insp + _uniform(rng, (-0.03, 0.03))
    dome_l = dome_r + _uniform(rng, (0.02, 0.08))
    lateral_w = _uniform(rng, (0.74, 0.8))
    apex_w = _uniform(rng, (0.27, 0.32))
    medial_w = 0.13
    lungs = pose.box(-lateral_w - 0.05, lateral_w + 0.05, apex_v - 0.05, dome_l + 0.3)
    ub, vb, wb, right_b = u[lungs], v[lungs], w[lungs], right_f[lungs]
    dome_peak = dome_l + (dome_r - dome_l) * right_b
    tb = (vb - apex_v) / (dome_peak - apex_v)
    medial_b, lateral_b = _lung_border(tb, apex_w=apex_w, lateral_w=lateral_w, medial_w=medial_w)
    # The aortic knob pushes the left medial border out.
    medial_b += (1.0 - right_b) * 0.06 * np.exp(-(((vb + 0.32) * (1 / 0.08)) ** 2))
    dw = wb - 0.42  # the dome is highest at w = 0.42, steeper laterally (costophrenic recess)
    base_v = dome_peak + (0.5 + 1.0 * (dw > 0)) * dw * dw
    sd = np.minimum(np.minimum(wb - medial_b, lateral_b - wb), np.minimum(base_v - vb, vb - apex_v))
    lung_b = _ramp(sd, 0.025)
    span = np.maximum(lateral_b - medial_b, 1e-3)
    across = np.clip(4.0 * (wb - medial_b) * (lateral_b - wb) / (span * span), 0.0, 1.0)
    air_b = lung_b * (0.72 + 0.28 * np.sqrt(across)) * (0.8 + 0.2 * np.clip(tb, 0.0, 1.0))

    # Hila and lung markings: vessels radiating from each hilum and tapering outwards.
    hilum_v = -0.08 + _uniform(rng, (-0.03, 0.03))
    du_h, dv_h = wb - 0.15, vb - hilum_v
    radius_b = np.sqrt(du_h * du_h + dv_h * dv_h)
    angle_b = np.arctan2(dv_h, du_h)
    bins = 1024  # a power of two, so that wrapping the index is a bitwise and
    grid = np.arange(bins, dtype=np.float32)
    profile = np.zeros(bins, dtype=np.float32)
    for count, sharp, weight in ((26, 0.008, 1.0), (60, 0.004, 0.55)):
        centres = rng.uniform(0, bins, count).astype(np.float32)
        delta = np.abs(grid[None, :] - centres[:, None])
        delta = np.minimum(delta, bins - delta) * np.float32(2 * np.pi / bins)
        amplitude = rng.uniform(0.5, 1.0, (count, 1)).astype(np.float32)
        profile += weight * (np.exp(-((delta / sharp) ** 2)) * amplitude).sum(axis=0)
    # Half a turn apart on the two sides, so that the lungs do not mirror each other's vessels.
    index = ((angle_b + np.float32(np.pi) * (1.0 + right_b)) * np.float32(bins / (2 * np.pi))).astype(
        np.int32
    )
    index &= bins - 1
    vessels = profile[index] * np.exp(radius_b * np.float32(-1 / 0.34))
    hilum = np.exp(-((radius_b * (1 / 0.075)) ** 2))

    def full(part: FloatArray) -> FloatArray:
        out = np.zeros_like(u)
        out[lungs] = part
        return out

    t, medial, lateral = full(tb), full(medial_b), full(lateral_b)
    lung_soft, air, radius, angle = full(lung_b), full(air_b), full(radius_b), full(angle_b)
    lung_hard = np.zeros(u.shape, dtype=bool)
    lung_hard[lungs] = sd > 0
    bone = full(lung_b * (0.1 * np.minimum(vessels, 1.5) + 0.14 * hilum))

    # Heart: left of centre (image right), its long axis tilted down to the left, its lower border merging
    # with the diaphragm.
    heart_scale = _uniform(rng, config.heart_size)
    hu, hv = 0.13 + _uniform(rng, (-0.03, 0.03)), dome_r - 0.13 + _uniform(rng, (-0.03, 0.03))
    ha, hb = 0.37 * heart_scale, 0.25 * heart_scale
    tilt = math.radians(_uniform(rng, (15.0, 30.0)))
    heart_soft = np.zeros_like(u)
    box = pose.box(hu - ha - 0.05, hu + ha + 0.05, hv - ha - 0.05, hv + ha + 0.05)
    du, dv = u[box] - hu, v[box] - hv
    hx = (math.cos(tilt) * du + math.sin(tilt) * dv) * (1 / ha)
    hy = (-math.sin(tilt) * du + math.cos(tilt) * dv) * (1 / hb)
    heart_soft[box] = _ramp(1.0 - np.sqrt(hx * hx + hy * hy), 0.06)
    air[box] *= 1.0 - 0.8 * heart_soft[box]

    # Trachea (air column over the mediastinum down to the carina).
    carina_v = -0.3 + _uniform(rng, (-0.03, 0.03))
    box = pose.box(-0.06, 0.06, -1.6, carina_v + 0.05)
    air[box] += 0.22 * _ramp(0.035 - w[box], 0.015) * _ramp(carina_v - v[box], 0.03)

    # Gastric bubble under the left dome.
    if rng.random() < 0.7:
        gu, gv = 0.36 + _uniform(rng, (-0.05, 0.05)), dome_l + _uniform(rng, (0.08, 0.13))
        ga, gb = _uniform(rng, (0.07, 0.11)), _uniform(rng, (0.04, 0.06))
        box = pose.box(gu - ga, gu + ga, gv - gb, gv + gb)
        g = ((u[box] - gu) * (1 / ga)) ** 2 + ((v[box] - gv) * (1 / gb)) ** 2
        air[box] += 0.35 * _ramp(1.0 - g, 0.5)

    # Spine: vertebral bodies with darker disc spaces, pedicles.
    box = pose.box(-0.1, 0.1, -1.6, 1.6)
    ub, vb, wb = u[box], v[box], w[box]
    spine_hw = 0.055 + 0.02 * np.clip((vb + 1.0) * 0.5, 0.0, 1.0)
    spine_across = np.sqrt(np.clip(1.0 - (ub / spine_hw) ** 2, 0.0, 1.0))
    period = _uniform(rng, (0.1, 0.115))
    phase = (vb - _uniform(rng, (0.0, period))) * (1 / period)
    frac = phase - np.floor(phase)
    vertebra = _ramp(0.4 - np.abs(frac - 0.5), 0.06)
    pedicles = np.exp(-(((wb - 0.75 * spine_hw) * (1 / 0.014)) ** 2)) * _ramp(
        0.22 - np.abs(frac - 0.45), 0.06
    )
    bone[box] += 0.28 * spine_across * (0.5 + 0.5 * vertebra) + 0.1 * pedicles

    # Ribs: posterior arcs (from the spine, curving down laterally) and fainter anterior ribs.
    rib_spacing = _uniform(rng, (0.115, 0.132)) * (1.0 + 0.6 * insp)
    first_rib = apex_v - 0.1
    box = pose.box(-1.0, 1.0, first_rib - 0.1, first_rib + 11 * rib_spacing + 0.5)
    vb, wb = v[box], np.minimum(w[box], 1.2)
    rib_limit = half_width[box] - 0.05
    rib_phase = (vb - (-0.1 * wb + 0.72 * wb * wb) - first_rib) * (1 / rib_spacing)
    rib_phase *= 1.0 - 0.015 * rib_phase  # intercostal spaces widen downwards
    rib_dist = np.abs(rib_phase - np.floor(rib_phase) - 0.5)
    rib_half = 0.17 + 0.07 * np.minimum(wb, 0.8)  # in units of the rib spacing
    rib_body = _ramp(rib_half - rib_dist, 0.05)
    rib_cortex = rib_body - _ramp(rib_half - 0.06 - rib_dist, 0.05)
    rib_extent = _ramp(rib_phase, 0.2) * _ramp(9.6 - rib_phase, 0.4) * _ramp(wb - 0.07, 0.04)
    rib_extent *= _ramp(rib_limit - wb, 0.05)
    # Each rib its own density, so that the cage does not look like a ladder.
    rib_density = rng.uniform(0.75, 1.15, 24).astype(np.float32)
    rib_number = np.clip(rib_phase, 0, 11).astype(np.int32) + (12 * right_f[box]).astype(np.int32)
    ribs = rib_extent * rib_density[rib_number] * (0.1 * rib_body + 0.06 * rib_cortex)
    ant_phase = (vb + 0.45 * wb - 0.1 * wb * wb - (apex_v + 0.2)) * (1 / (rib_spacing * 1.35))
    ant_body = _ramp(0.2 - np.abs(ant_phase - np.floor(ant_phase) - 0.5), 0.08)
    ant_extent = _ramp(ant_phase, 0.3) * _ramp(6.0 - ant_phase, 0.5) * _ramp(wb - 0.3, 0.1)
    ribs += 0.055 * ant_body * ant_extent * _ramp(rib_limit - wb, 0.05)
    bone[box] += ribs

    # Clavicles: from the manubrium rising laterally towards the shoulders.
    clav_v0 = apex_v + 0.13 + _uniform(rng, (-0.04, 0.04))
    box = pose.box(-0.7, 0.7, clav_v0 - 0.2, clav_v0 + 0.1)
    vb, wb = v[box], w[box]
    clav_dist = np.abs(vb - (clav_v0 - 0.24 * wb + 0.14 * wb * wb))
    clav_half = 0.03 + 0.008 * np.clip(0.3 - wb, 0.0, 0.3) * (1 / 0.3)
    bone[box] += 0.28 * _ramp(clav_half - clav_dist, 0.012) * _ramp(wb - 0.07, 0.03) * _ramp(0.66 - wb, 0.05)

    # Humeral heads and shafts at the upper corners (with the arm's soft tissue outside the chest wall).
    head_v = apex_v + 0.08 + _uniform(rng, (-0.03, 0.03))
    for u0, u1 in ((-1.25, -0.82), (0.82, 1.25)):
        box = pose.box(u0, u1, head_v - 0.17, head_v + 0.45)
        vb, wb = v[box], w[box]
        head = ((wb - 0.97) * (1 / 0.12)) ** 2 + ((vb - head_v) * (1 / 0.15)) ** 2
        humerus = 0.32 * np.sqrt(np.clip(1.0 - head, 0.0, 1.0))
        humerus += (
            0.25
            * _ramp(0.07 - np.abs(wb - 0.99), 0.02)
            * _ramp(vb - head_v, 0.05)
            * _ramp(head_v + 0.3 - vb, 0.2)
        )
        bone[box] += humerus
        tissue[box] = np.maximum(tissue[box], 0.8 * humerus)

    anatomy = _Anatomy(
        u=u,
        v=v,
        w=w,
        right=right,
        t=t,
        medial=medial,
        lateral=lateral,
        lung_soft=lung_soft,
        lung_hard=lung_hard & (heart_soft < 0.5),
        heart_soft=heart_soft,
        hilum_radius=radius,
        hilum_angle=angle,
        pose=pose,
        params={
            "apex_v": apex_v,
            "dome_r": dome_r,
            "dome_l": dome_l,
            "apex_w": apex_w,
            "lateral_w": lateral_w,
            "medial_w": medial_w,
            "scale_px": size / 2 * pose.scale,
        },
    )
    return anatomy, [tissue, air, bone]


# ----------------------------------------------------------------------------------------------- findings


def _side_params(anatomy: _Anatomy, right_side: bool) -> tuple[FloatArray, float, float]:
    """The side mask, apex height and dome height of one lung."""
    p = anatomy.params
    side = anatomy.right if right_side else ~anatomy.right
    return side, p["apex_v"], p["dome_r" if right_side else "dome_l"]


def _lobar_consolidation(
    anatomy: _Anatomy, rng: np.random.Generator, size: int, strength: float
) -> FloatArray:
    """A dense opacity filling (most of) one lobe, sharply bounded by its fissure; maybe air bronchograms."""
    right_side = bool(rng.random() < 0.5)
    side, apex, dome = _side_params(anatomy, right_side)
    v, w = anatomy.v, anatomy.w
    height = dome - apex
    lobes = ("upper", "middle", "lower") if right_side else ("upper", "lower")
    lobe = lobes[int(rng.integers(len(lobes)))]
    level = apex + height * _uniform(rng, (0.45, 0.55))
    if lobe == "upper":
        # Right: horizontal fissure; left: the upper lobe with the lingula reaches lower.
        fissure = level + 0.04 * (w - 0.4) + (0.0 if right_side else 0.12)
        region = _ramp(fissure - v, 0.015)
    elif lobe == "middle":
        region = _ramp(v - level, 0.015) * _ramp(0.48 - w, 0.1)
    else:
        fissure = level + 0.12 + 0.2 * (0.45 - w)
        region = _ramp(v - fissure, 0.015)
    fill = _ramp(_smooth_noise(rng, size, 6) + _uniform(rng, (1.0, 2.2)), 0.9)
    texture = 0.88 + 0.12 * _smooth_noise(rng, size, 24)
    opacity = side * anatomy.lung_soft * region * fill * texture * (0.9 * strength)
    if rng.random() < 0.6:
        # Air bronchograms: thin air-filled branches running from the hilum through the opacity.
        inside = np.flatnonzero((opacity > 0.5) & (anatomy.hilum_radius > 0.12))
        if inside.size:
            bronchi = np.zeros_like(opacity)
            for pick in rng.choice(inside, size=min(int(rng.integers(2, 6)), inside.size), replace=False):
                aim = anatomy.hilum_angle.flat[pick]
                reach = anatomy.hilum_radius.flat[pick] + _uniform(rng, (0.0, 0.1))
                delta = np.abs(anatomy.hilum_angle - aim)
                delta = np.minimum(delta, 2 * np.pi - delta) * anatomy.hilum_radius
                bronchi = np.maximum(
                    bronchi,
                    _ramp(0.011 - delta, 0.008)
                    * _ramp(anatomy.hilum_radius - 0.08, 0.04)
                    * _ramp(reach - anatomy.hilum_radius, 0.05),
                )
            opacity = opacity * (1.0 - 0.35 * bronchi * side)
    return np.clip(opacity, 0.0, 1.0)


def _bilateral_lower_zone(
    anatomy: _Anatomy, rng: np.random.Generator, size: int, strength: float
) -> FloatArray:
    """Patchy opacities in the peripheral lower zones of both lungs."""
    span = np.maximum(anatomy.lateral - anatomy.medial, 1e-3)
    peripheral = _ramp((anatomy.w - anatomy.medial) / span - _uniform(rng, (0.4, 0.55)), 0.3)
    lower = _ramp(anatomy.t - _uniform(rng, (0.6, 0.72)), 0.2)
    per_side = np.where(
        anatomy.right, np.float32(_uniform(rng, (0.75, 1.0))), np.float32(_uniform(rng, (0.75, 1.0)))
    )
    patches = _ramp(_smooth_noise(rng, size, 16) + _uniform(rng, (0.6, 1.1)), 1.0)
    opacity = anatomy.lung_soft * peripheral * lower * per_side * patches * (1.1 * strength)
    return np.clip(opacity, 0.0, 0.95)


def _diffuse_patchy(anatomy: _Anatomy, rng: np.random.Generator, size: int, strength: float) -> FloatArray:
    """Ground-glass patches scattered through both lungs."""
    patches = _ramp(_smooth_noise(rng, size, 14) - _uniform(rng, (0.0, 0.5)), 1.4)
    modulation = 0.7 + 0.2 * _smooth_noise(rng, size, 5) + 0.1 * _smooth_noise(rng, size, 40)
    opacity = anatomy.lung_soft * patches * modulation * (_uniform(rng, (0.5, 0.7)) * strength)
    return np.clip(opacity, 0.0, 0.9)


def _upper_zone_nodules(
    anatomy: _Anatomy, rng: np.random.Generator, size: int, strength: float
) -> FloatArray:
    """2-6 round nodules in the upper zones, about a third of them cavitated (a ring with an air centre)."""
    p = anatomy.params
    opacity = np.zeros_like(anatomy.u)
    min_radius = 2.5 / p["scale_px"]  # at least a few pixels whatever the image size
    for _ in range(int(rng.integers(2, 7))):
        right_side = bool(rng.random() < 0.5)
        _, apex, dome = _side_params(anatomy, right_side)
        t_n = _uniform(rng, (0.12, 0.42))
        radius = max(_uniform(rng, (0.025, 0.06)), min_radius)
        medial, lateral = _lung_border(
            t_n, apex_w=p["apex_w"], lateral_w=p["lateral_w"], medial_w=p["medial_w"]
        )
        low, high = float(medial) + radius + 0.02, float(lateral) - radius - 0.02
        w_n = _uniform(rng, (low, max(low, high)))
        u_n = -w_n if right_side else w_n
        v_n = apex + t_n * (dome - apex)
        box = anatomy.pose.box(u_n - radius, u_n + radius, v_n - radius, v_n + radius)
        d2 = ((anatomy.u[box] - u_n) ** 2 + (anatomy.v[box] - v_n) ** 2) * (1.0 / radius**2)
        nodule = np.clip(1.0 - d2, 0.0, 1.0) ** 0.3
        if rng.random() < 0.35:
            nodule = nodule - 0.9 * np.clip(1.0 - d2 / 0.5**2, 0.0, 1.0) ** 0.3
        opacity[box] = np.maximum(opacity[box], nodule * _uniform(rng, (0.8, 1.0)) * strength)
    return np.clip(opacity, 0.0, 1.0) * anatomy.lung_soft


_FINDING_RENDERERS = (
    None,
    _lobar_consolidation,
    _bilateral_lower_zone,
    _diffuse_patchy,
    _upper_zone_nodules,
)
# Opacity above which a pixel belongs to the lesion mask (per finding; ground glass is fainter).
_MASK_THRESHOLD = (1.0, 0.3, 0.2, 0.15, 0.0)


# ------------------------------------------------------------------------------------------------- images


def _finding_index(label: int | str) -> int:
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
    finding = _finding_index(label)
    if isinstance(size, bool) or not isinstance(size, int) or not MIN_SIZE <= size <= MAX_SIZE:
        raise InputError(f"size must be an integer in [{MIN_SIZE}, {MAX_SIZE}] pixels, got {size!r}")
    if seed < 0 or index < 0:
        raise InputError(f"seed and index must be non-negative integers, got seed={seed}, index={index}")
    config = config or SynthConfig()
    anatomy_rng = np.random.default_rng([seed, index, 0])
    anatomy, (tissue, air, bone) = _anatomy(size, anatomy_rng, config)
    lung_mask = anatomy.lung_hard

    finding_rng = np.random.default_rng([seed, index, 1])
    renderer = _FINDING_RENDERERS[finding]
    opacity = np.zeros_like(tissue)
    lesion_mask = np.zeros((size, size), dtype=bool)
    if renderer is not None:
        for _attempt in range(20):
            strength = _uniform(finding_rng, config.lesion_strength)
            opacity = renderer(anatomy, finding_rng, size, strength)
            lesion_mask = (opacity > _MASK_THRESHOLD[finding]) & lung_mask
            if lesion_mask.any():
                break
        else:  # pragma: no cover - the renderers place findings inside the lungs by construction
            raise RuntimeError(
                f"could not place a {FINDINGS[finding]} finding in image {index} (seed {seed})"
            )

    # Radiograph formation: fluid replaces air, attenuation summed along the beam, detector response.
    texture = 0.025 * _smooth_noise(anatomy_rng, size, 48) * tissue
    attenuation = tissue * (1.0 - 0.8 * np.minimum(air * (1.0 - opacity), 1.0)) + bone + texture
    exposure = _uniform(anatomy_rng, config.exposure)
    image = 1.0 - np.exp(-exposure * np.maximum(attenuation, 0.0))
    low, high = _uniform(anatomy_rng, config.window_low), _uniform(anatomy_rng, config.window_high)
    image = np.clip((image - low) * (1.0 / (high - low)), 0.0, 1.0) ** _uniform(anatomy_rng, config.gamma)
    sigma = _uniform(anatomy_rng, config.blur_px) * size / 256
    image = ndimage.gaussian_filter(image.astype(np.float32), sigma, mode="nearest")
    if cue:
        _draw_cue(image, np.random.default_rng([seed, index, 3]), config.cue_size)
    noise_level = _uniform(anatomy_rng, config.noise)
    # Triangular noise (difference of two uniforms, unit variance): Gaussian enough, 10x cheaper to draw.
    noise = anatomy_rng.random((size, size), dtype=np.float32) - anatomy_rng.random(
        (size, size), dtype=np.float32
    )
    image = image + (noise_level * math.sqrt(6.0)) * np.sqrt(image + 0.05) * noise
    pixels = np.clip(image * 255.0 + 0.5, 0.0, 255.0).astype(np.uint8)
    return pixels, lesion_mask, lung_mask.copy()


# ------------------------------------------------------------------------------------------------ dataset


def parse_class_names(text: str | Sequence[str] | None) -> tuple[str, ...]:
    """Five unique class names (comma-separated text or a sequence), in finding order; None gives defaults."""
    if text is None:
        return DEFAULT_CLASS_NAMES
    names = [n.strip() for n in text.split(",")] if isinstance(text, str) else [str(n).strip() for n in text]
    if len(names) != len(FINDINGS):
        raise InputError(
            f"expected exactly {len(FINDINGS)} class names (for the findings {', '.join(FINDINGS)}), "
            f"got {len(names)}: {names!r}"
        )
    bad = [n for n in names if not _CLASS_NAME_RE.match(n) or n in _RESERVED_NAMES]
    if bad:
        raise InputError(
            f"class names must be folder-safe (letters, digits, '_', '-', '.'; not 'masks'), got {bad!r}"
        )
    if len(set(names)) != len(names):
        raise InputError(f"class names must be unique, got {names!r}")
    return tuple(names)


def parse_split(text: str | Sequence[float]) -> tuple[float, float, float]:
    """Train/val/test fractions (``"0.7,0.15,0.15"`` or a sequence): three numbers >= 0, train > 0, sum 1."""
    try:
        parts = [float(p) for p in (text.split(",") if isinstance(text, str) else text)]
    except (TypeError, ValueError):
        raise InputError(
            f"split must be three numbers like 0.7,0.15,0.15 (train,val,test), got {text!r}"
        ) from None
    if len(parts) != 3 or not all(math.isfinite(p) and p >= 0 for p in parts) or parts[0] <= 0:
        raise InputError(
            f"split must be three non-negative fractions train,val,test with train > 0, got {text!r}"
        )
    if abs(sum(parts) - 1.0) > 1e-6:
        raise InputError(f"split fractions must sum to 1, got {parts} (sum {sum(parts):.6g})")
    return parts[0], parts[1], parts[2]


def _split_counts(count: int, fractions: tuple[float, float, float]) -> list[int]:
    """Largest-remainder allocation of ``count`` items to the three splits."""
    raw = [count * f for f in fractions]
    counts = [math.floor(r) for r in raw]
    order = sorted(range(3), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in order[: count - sum(counts)]:
        counts[i] += 1
    return counts


@dataclass(frozen=True)
class _Item:
    index: int
    finding: int
    class_name: str
    split: str
    cue: bool


def _plan(
    *,
    n: int,
    seed: int,
    class_names: tuple[str, ...],
    split: tuple[float, float, float],
    cue_finding: int | None,
    cue_rate: float,
    cue_noise_rate: float,
) -> list[_Item]:
    """Labels (balanced, interleaved by index), splits (stratified by class) and cue flags of every image."""
    per_class: dict[int, list[int]] = {
        k: list(range(k, n, len(class_names))) for k in range(len(class_names))
    }
    split_of: dict[int, str] = {}
    for finding, indices in per_class.items():
        counts = _split_counts(len(indices), split)
        missing = [SPLITS[i] for i in range(3) if split[i] > 0 and counts[i] == 0]
        if missing:
            needed = math.ceil(len(class_names) / min(f for f in split if f > 0))
            raise InputError(
                f"n={n} is too small for the split {','.join(f'{f:g}' for f in split)}: class "
                f"{class_names[finding]!r} would get no {'/'.join(missing)} image; use at least n={needed}"
            )
        order = np.random.default_rng([seed, 1_000_003, finding]).permutation(indices)
        start = 0
        for name, count in zip(SPLITS, counts, strict=True):
            for index in order[start : start + count]:
                split_of[int(index)] = name
            start += count
    items = []
    for index in range(n):
        finding = index % len(class_names)
        rate = cue_rate if finding == cue_finding else cue_noise_rate
        cue = cue_finding is not None and bool(np.random.default_rng([seed, index, 2]).random() < rate)
        items.append(_Item(index, finding, class_names[finding], split_of[index], cue))
    return items


def _image_id(index: int) -> str:
    return f"synth_{index:06d}"


def _save_png(array: np.ndarray, path: Path) -> None:
    # PIL writes no timestamp into PNGs, so equal pixels give equal bytes. Level 1: 3x faster than the
    # default for noisy radiographs, files ~13% larger.
    Image.fromarray(array).save(path, format="PNG", compress_level=1)


def _render(job: tuple[str, int, int, SynthConfig, _Item]) -> list[str]:
    """Generate and write one image and its masks; return its manifest row."""
    out_dir, seed, size, config, item = job
    root = Path(out_dir)
    image, lesion, lungs = generate_image(
        item.index, seed=seed, label=item.finding, size=size, cue=item.cue, config=config
    )
    image_id = _image_id(item.index)
    rel_image = f"{item.split}/{item.class_name}/{image_id}.png"
    rel_lesion, rel_lungs = f"masks/{image_id}_lesion.png", f"masks/{image_id}_lungs.png"
    _save_png(image, root / rel_image)
    _save_png(lesion.astype(np.uint8) * 255, root / rel_lesion)
    _save_png(lungs.astype(np.uint8) * 255, root / rel_lungs)
    fraction = float(lesion.sum()) / max(int(lungs.sum()), 1)
    return [
        rel_image,
        item.class_name,
        item.split,
        rel_lesion,
        rel_lungs,
        str(int(item.cue)),
        f"{fraction:.6f}",
    ]


def _prepare_out_dir(out_dir: Path, *, class_names: Sequence[str], overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"output path {out_dir} exists and is not a directory")
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise InputError(
                f"output directory {out_dir} is not empty; pass overwrite=True (--overwrite) to replace it"
            )
        # Remove only what a previous run wrote, so that stale images cannot leak into the new dataset.
        for name in (*SPLITS, "masks"):
            if (out_dir / name).is_dir():
                shutil.rmtree(out_dir / name)
        for name in ("manifest.csv", "synth_config.json"):
            (out_dir / name).unlink(missing_ok=True)
    for split in SPLITS:
        for class_name in class_names:
            (out_dir / split / class_name).mkdir(parents=True, exist_ok=True)
    (out_dir / "masks").mkdir(parents=True, exist_ok=True)


def generate_dataset(
    out_dir: str | Path,
    *,
    n: int,
    size: int = 256,
    seed: int = 0,
    class_names: Sequence[str] | str | None = None,
    split: Sequence[float] | str = (0.7, 0.15, 0.15),
    cue_class: str | None = None,
    cue_rate: float = 0.0,
    cue_noise_rate: float | None = None,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
    config: SynthConfig | None = None,
) -> Path:
    """Write a synthetic dataset (ImageFolder tree, masks, manifest.csv, synth_config.json); return the manifest.

    ``n`` images, balanced over the five classes (image ``i`` has finding ``i % 5``), split train/val/test by
    ``split`` within each class. With ``cue_class``, the corner marker appears on images of that class with
    probability ``cue_rate`` and on the others with probability ``cue_noise_rate`` (default
    ``0.1 * (1 - cue_rate)``). The files depend only on the arguments (not on ``workers``).
    """
    names = parse_class_names(class_names)
    fractions = parse_split(split)
    if isinstance(n, bool) or not isinstance(n, int) or n < len(names):
        raise InputError(f"n must be an integer >= {len(names)} (one image per class at least), got {n!r}")
    if isinstance(size, bool) or not isinstance(size, int) or not MIN_SIZE <= size <= MAX_SIZE:
        raise InputError(f"size must be an integer in [{MIN_SIZE}, {MAX_SIZE}] pixels, got {size!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InputError(f"seed must be a non-negative integer, got {seed!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise InputError(f"workers must be a positive integer, got {workers!r}")
    cue_finding: int | None = None
    if cue_class is not None:
        if cue_class not in names:
            raise InputError(f"cue class {cue_class!r} is not one of the class names: {', '.join(names)}")
        cue_finding = names.index(cue_class)
    elif cue_rate or cue_noise_rate:
        raise InputError("cue_rate/cue_noise_rate need a cue class (--cue-class NAME)")
    if cue_noise_rate is None:
        cue_noise_rate = 0.1 * (1.0 - cue_rate) if cue_class is not None else 0.0
    for label, rate in (("cue_rate", cue_rate), ("cue_noise_rate", cue_noise_rate)):
        if not 0.0 <= rate <= 1.0:
            raise InputError(f"{label} must be a probability in [0, 1], got {rate!r}")
    config = config or SynthConfig()

    items = _plan(
        n=n,
        seed=seed,
        class_names=names,
        split=fractions,
        cue_finding=cue_finding,
        cue_rate=cue_rate,
        cue_noise_rate=cue_noise_rate,
    )
    out = Path(out_dir)
    _prepare_out_dir(out, class_names=names, overwrite=overwrite)
    logger.info("writing %d synthetic %dx%d radiographs to %s (%d worker(s))", n, size, size, out, workers)

    from tqdm.auto import tqdm

    jobs = [(str(out), seed, size, config, item) for item in items]
    bar = tqdm(total=n, desc="synth", unit="img", disable=not progress)
    rows: list[list[str]] = []
    try:
        if workers == 1:
            for job in jobs:
                rows.append(_render(job))
                bar.update()
        else:
            # spawn: safe whatever the parent holds (torch threads, open DB handles); each job is independent.
            context = multiprocessing.get_context("spawn")
            with context.Pool(processes=workers) as pool:
                for row in pool.imap(_render, jobs, chunksize=max(1, min(64, n // (workers * 8)))):
                    rows.append(row)
                    bar.update()
    finally:
        bar.close()

    config_record = {
        "generator": "cxr-drift synth",
        "generator_version": GENERATOR_VERSION,
        "n": n,
        "size": size,
        "seed": seed,
        "class_names": list(names),
        "findings": dict(zip(names, FINDINGS, strict=True)),
        "split": dict(zip(SPLITS, fractions, strict=True)),
        "split_counts": {
            s: {c: sum(1 for i in items if i.split == s and i.class_name == c) for c in names} for s in SPLITS
        },
        "cue_class": cue_class,
        "cue_rate": cue_rate,
        "cue_noise_rate": cue_noise_rate,
        "cue_count": sum(i.cue for i in items),
        "config": asdict(config),
        "manifest_columns": list(MANIFEST_COLUMNS),
        "lesion_fraction": "lesion mask pixels / lung mask pixels",
    }
    (out / "synth_config.json").write_text(json.dumps(config_record, indent=2) + "\n", encoding="utf-8")
    # The manifest is written last: its presence marks a complete dataset.
    manifest = out / "manifest.csv"
    tmp = out / "manifest.csv.tmp"
    with tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(MANIFEST_COLUMNS)
        writer.writerows(rows)
    tmp.replace(manifest)
    logger.info("wrote %s", manifest)
    return manifest


def iter_manifest(manifest: str | Path) -> Iterator[dict[str, str]]:
    """Rows of a synth ``manifest.csv`` as dicts."""
    with Path(manifest).open(newline="", encoding="utf-8") as handle:
        yield from csv.DictReader(handle)


def contact_sheet(
    *,
    seed: int = 0,
    size: int = 160,
    per_class: int = 4,
    class_names: Sequence[str] | None = None,
    overlay: bool = True,
    config: SynthConfig | None = None,
) -> Image.Image:
    """A grid of examples: one row per class, ``per_class`` images, then the masks of the first one overlaid
    (lesion red, lung outline green). The first image of the normal row carries the corner cue."""
    from PIL import ImageDraw

    names = parse_class_names(class_names)
    columns = per_class + (1 if overlay else 0)
    label_h = 14
    sheet = Image.new("RGB", (columns * size, len(names) * (size + label_h)), "black")
    draw = ImageDraw.Draw(sheet)
    for row, name in enumerate(names):
        top = row * (size + label_h)
        draw.text((4, top + 1), name, fill="white")
        for col in range(per_class):
            index = row * per_class + col
            image, lesion, lungs = generate_image(
                index, seed=seed, label=row, size=size, cue=(row == 0 and col == 0), config=config
            )
            sheet.paste(Image.fromarray(image).convert("RGB"), (col * size, top + label_h))
            if overlay and col == 0:
                rgb = np.repeat(image[:, :, None], 3, axis=2)
                rgb[lesion] = (0.5 * rgb[lesion] + [127, 0, 0]).astype(np.uint8)
                edge = lungs & ~ndimage.binary_erosion(lungs)
                rgb[edge] = (0, 255, 0)
                sheet.paste(Image.fromarray(rgb), (per_class * size, top + label_h))
        if overlay:
            draw.text((per_class * size + 4, top + 1), "masks", fill="white")
    return sheet
