"""The normal chest: pose, body, lungs and hila, heart, trachea, stomach, spine, ribs, clavicles, humeri.

:func:`draw_anatomy` draws every random number from one generator, structure by structure in a fixed order
(the order of the ``_draw_*`` calls in it), so the same generator state gives the same patient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from training.synth.config import SynthConfig
from training.synth.grid import FloatArray, pixel_grid, ramp, uniform

__all__ = ["Anatomy", "Pose", "draw_anatomy", "lung_border"]


@dataclass(frozen=True)
class Pose:
    """Where the patient lies on the detector: image (x, y) = scale * R(theta) (width * u, v) + shift."""

    size: int
    cos_t: float
    sin_t: float
    tx: float
    ty: float
    scale: float
    width: float

    def patient_coords(self) -> tuple[FloatArray, FloatArray]:
        x, y = pixel_grid(self.size)
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


@dataclass
class Anatomy:
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
    pose: Pose
    params: dict[str, float]


def lung_border(
    t: FloatArray | float, *, apex_w: float, lateral_w: float, medial_w: float
) -> tuple[Any, Any]:
    """Medial and lateral lung borders (distance from the midline) at relative height ``t``."""
    t_lat = np.sqrt(np.clip(np.asarray(t, dtype=np.float32) / 0.62, 0.0, 1.0))
    t_med = np.sqrt(np.clip(np.asarray(t, dtype=np.float32) / 0.3, 0.0, 1.0))
    lateral = apex_w + (lateral_w - apex_w) * t_lat
    medial = apex_w - (apex_w - medial_w) * t_med
    return medial, lateral


@dataclass(frozen=True)
class _Coords:
    """Patient coordinates of every pixel: ``u`` across (patient's right < 0), ``v`` down, ``w = |u|``."""

    pose: Pose
    u: FloatArray
    v: FloatArray
    w: FloatArray
    right: FloatArray  # bool
    right_f: FloatArray  # the same as 0/1 float32


@dataclass(frozen=True)
class _LungShape:
    """The per-image lung geometry: inspiration, apex height, dome heights, apex/lateral/medial widths."""

    insp: float
    apex_v: float
    dome_r: float
    dome_l: float
    lateral_w: float
    apex_w: float
    medial_w: float


@dataclass
class _Lungs:
    """The lungs on their bounding box ``box`` (every array has the box's shape)."""

    box: tuple[slice, slice]
    t: FloatArray
    medial: FloatArray
    lateral: FloatArray
    soft: FloatArray
    signed_distance: FloatArray
    air: FloatArray


def _draw_pose(size: int, rng: np.random.Generator, config: SynthConfig) -> Pose:
    tx = uniform(rng, (-config.shift, config.shift))
    ty = uniform(rng, (-config.shift, config.shift))
    scale = uniform(rng, config.scale)
    width = uniform(rng, config.patient_width)
    theta = math.radians(uniform(rng, (-config.rotation_deg, config.rotation_deg)))
    return Pose(
        size=size, cos_t=math.cos(theta), sin_t=math.sin(theta), tx=tx, ty=ty, scale=scale, width=width
    )


def _body_outline(c: _Coords) -> tuple[FloatArray, FloatArray]:
    """Body outline (neck, shoulders, chest wall) and soft-tissue thickness, like a cylinder seen side-on.

    Returns ``(half_width, tissue)``: the half width of the body at each pixel's height, and the thickness.
    """
    v = c.v
    half_width = 0.23 + 0.4 * ramp(v + 0.83, 0.14) + 0.42 * ramp(v + 0.66, 0.2) - 0.14 * ramp(v - 0.1, 1.2)
    tissue = np.clip(1.0 - (c.u / half_width) ** 2, 0.0, 1.0) ** 0.75
    return half_width, tissue


def _draw_lung_shape(rng: np.random.Generator, config: SynthConfig) -> _LungShape:
    insp = uniform(rng, config.inspiration)
    apex_v = -0.72 - 0.5 * insp + uniform(rng, (-0.02, 0.02))
    dome_r = 0.40 + insp + uniform(rng, (-0.03, 0.03))
    dome_l = dome_r + uniform(rng, (0.02, 0.08))
    lateral_w = uniform(rng, (0.74, 0.8))
    apex_w = uniform(rng, (0.27, 0.32))
    return _LungShape(insp, apex_v, dome_r, dome_l, lateral_w, apex_w, medial_w=0.13)


def _lungs(c: _Coords, shape: _LungShape) -> _Lungs:
    """Both lungs from the same formulas in w = |u|, with per-side parameters, on the lungs' box."""
    apex_v, dome_r, dome_l, lateral_w = shape.apex_v, shape.dome_r, shape.dome_l, shape.lateral_w
    lungs = c.pose.box(-lateral_w - 0.05, lateral_w + 0.05, apex_v - 0.05, dome_l + 0.3)
    vb, wb, right_b = c.v[lungs], c.w[lungs], c.right_f[lungs]
    dome_peak = dome_l + (dome_r - dome_l) * right_b
    tb = (vb - apex_v) / (dome_peak - apex_v)
    medial_b, lateral_b = lung_border(tb, apex_w=shape.apex_w, lateral_w=lateral_w, medial_w=shape.medial_w)
    # The aortic knob pushes the left medial border out.
    medial_b += (1.0 - right_b) * 0.06 * np.exp(-(((vb + 0.32) * (1 / 0.08)) ** 2))
    dw = wb - 0.42  # the dome is highest at w = 0.42, steeper laterally (costophrenic recess)
    base_v = dome_peak + (0.5 + 1.0 * (dw > 0)) * dw * dw
    sd = np.minimum(np.minimum(wb - medial_b, lateral_b - wb), np.minimum(base_v - vb, vb - apex_v))
    lung_b = ramp(sd, 0.025)
    span = np.maximum(lateral_b - medial_b, 1e-3)
    across = np.clip(4.0 * (wb - medial_b) * (lateral_b - wb) / (span * span), 0.0, 1.0)
    air_b = lung_b * (0.72 + 0.28 * np.sqrt(across)) * (0.8 + 0.2 * np.clip(tb, 0.0, 1.0))
    return _Lungs(
        box=lungs, t=tb, medial=medial_b, lateral=lateral_b, soft=lung_b, signed_distance=sd, air=air_b
    )


def _draw_vessel_profile(rng: np.random.Generator, bins: int) -> FloatArray:
    """Vessel density against the angle around a hilum: ``bins`` samples of a sum of narrow peaks."""
    positions = np.arange(bins, dtype=np.float32)
    profile = np.zeros(bins, dtype=np.float32)
    for count, sharp, weight in ((26, 0.008, 1.0), (60, 0.004, 0.55)):
        centres = rng.uniform(0, bins, count).astype(np.float32)
        delta = np.abs(positions[None, :] - centres[:, None])
        delta = np.minimum(delta, bins - delta) * np.float32(2 * np.pi / bins)
        amplitude = rng.uniform(0.5, 1.0, (count, 1)).astype(np.float32)
        profile += weight * (np.exp(-((delta / sharp) ** 2)) * amplitude).sum(axis=0)
    return profile


def _draw_hila(
    rng: np.random.Generator, c: _Coords, lungs: _Lungs
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Hila and lung markings: vessels radiating from each hilum and tapering outwards, on the lungs' box.

    Returns the distance from the hilum of the same side, the angle around it, and the added density.
    """
    vb, wb, right_b = c.v[lungs.box], c.w[lungs.box], c.right_f[lungs.box]
    hilum_v = -0.08 + uniform(rng, (-0.03, 0.03))
    du_h, dv_h = wb - 0.15, vb - hilum_v
    radius_b = np.sqrt(du_h * du_h + dv_h * dv_h)
    angle_b = np.arctan2(dv_h, du_h)
    bins = 1024  # a power of two, so that wrapping the index is a bitwise and
    profile = _draw_vessel_profile(rng, bins)
    # Half a turn apart on the two sides, so that the lungs do not mirror each other's vessels.
    index = ((angle_b + np.float32(np.pi) * (1.0 + right_b)) * np.float32(bins / (2 * np.pi))).astype(
        np.int32
    )
    index &= bins - 1
    vessels = profile[index] * np.exp(radius_b * np.float32(-1 / 0.34))
    hilum = np.exp(-((radius_b * (1 / 0.075)) ** 2))
    return radius_b, angle_b, lungs.soft * (0.1 * np.minimum(vessels, 1.5) + 0.14 * hilum)


def _draw_heart(
    rng: np.random.Generator, config: SynthConfig, c: _Coords, shape: _LungShape, air: FloatArray
) -> FloatArray:
    """Heart: left of centre (image right), its long axis tilted down to the left, its lower border merging
    with the diaphragm. Returns its soft mask; the lung air behind it is reduced in place."""
    heart_scale = uniform(rng, config.heart_size)
    hu, hv = 0.13 + uniform(rng, (-0.03, 0.03)), shape.dome_r - 0.13 + uniform(rng, (-0.03, 0.03))
    ha, hb = 0.37 * heart_scale, 0.25 * heart_scale
    tilt = math.radians(uniform(rng, (15.0, 30.0)))
    heart_soft = np.zeros_like(c.u)
    box = c.pose.box(hu - ha - 0.05, hu + ha + 0.05, hv - ha - 0.05, hv + ha + 0.05)
    du, dv = c.u[box] - hu, c.v[box] - hv
    hx = (math.cos(tilt) * du + math.sin(tilt) * dv) * (1 / ha)
    hy = (-math.sin(tilt) * du + math.cos(tilt) * dv) * (1 / hb)
    heart_soft[box] = ramp(1.0 - np.sqrt(hx * hx + hy * hy), 0.06)
    air[box] *= 1.0 - 0.8 * heart_soft[box]
    return heart_soft


def _draw_trachea(rng: np.random.Generator, c: _Coords, air: FloatArray) -> None:
    """Trachea (air column over the mediastinum down to the carina)."""
    carina_v = -0.3 + uniform(rng, (-0.03, 0.03))
    box = c.pose.box(-0.06, 0.06, -1.6, carina_v + 0.05)
    air[box] += 0.22 * ramp(0.035 - c.w[box], 0.015) * ramp(carina_v - c.v[box], 0.03)


def _draw_gastric_bubble(rng: np.random.Generator, c: _Coords, shape: _LungShape, air: FloatArray) -> None:
    """Gastric bubble under the left dome (in most patients)."""
    if rng.random() < 0.7:
        gu, gv = 0.36 + uniform(rng, (-0.05, 0.05)), shape.dome_l + uniform(rng, (0.08, 0.13))
        ga, gb = uniform(rng, (0.07, 0.11)), uniform(rng, (0.04, 0.06))
        box = c.pose.box(gu - ga, gu + ga, gv - gb, gv + gb)
        g = ((c.u[box] - gu) * (1 / ga)) ** 2 + ((c.v[box] - gv) * (1 / gb)) ** 2
        air[box] += 0.35 * ramp(1.0 - g, 0.5)


def _draw_spine(rng: np.random.Generator, c: _Coords, bone: FloatArray) -> None:
    """Spine: vertebral bodies with darker disc spaces, pedicles."""
    box = c.pose.box(-0.1, 0.1, -1.6, 1.6)
    ub, vb, wb = c.u[box], c.v[box], c.w[box]
    spine_hw = 0.055 + 0.02 * np.clip((vb + 1.0) * 0.5, 0.0, 1.0)
    spine_across = np.sqrt(np.clip(1.0 - (ub / spine_hw) ** 2, 0.0, 1.0))
    period = uniform(rng, (0.1, 0.115))
    phase = (vb - uniform(rng, (0.0, period))) * (1 / period)
    frac = phase - np.floor(phase)
    vertebra = ramp(0.4 - np.abs(frac - 0.5), 0.06)
    pedicles = np.exp(-(((wb - 0.75 * spine_hw) * (1 / 0.014)) ** 2)) * ramp(0.22 - np.abs(frac - 0.45), 0.06)
    bone[box] += 0.28 * spine_across * (0.5 + 0.5 * vertebra) + 0.1 * pedicles


def _draw_ribs(
    rng: np.random.Generator, c: _Coords, shape: _LungShape, half_width: FloatArray, bone: FloatArray
) -> None:
    """Ribs: posterior arcs (from the spine, curving down laterally) and fainter anterior ribs."""
    apex_v = shape.apex_v
    rib_spacing = uniform(rng, (0.115, 0.132)) * (1.0 + 0.6 * shape.insp)
    first_rib = apex_v - 0.1
    box = c.pose.box(-1.0, 1.0, first_rib - 0.1, first_rib + 11 * rib_spacing + 0.5)
    vb, wb = c.v[box], np.minimum(c.w[box], 1.2)
    rib_limit = half_width[box] - 0.05
    rib_phase = (vb - (-0.1 * wb + 0.72 * wb * wb) - first_rib) * (1 / rib_spacing)
    rib_phase *= 1.0 - 0.015 * rib_phase  # intercostal spaces widen downwards
    rib_dist = np.abs(rib_phase - np.floor(rib_phase) - 0.5)
    rib_half = 0.17 + 0.07 * np.minimum(wb, 0.8)  # in units of the rib spacing
    rib_body = ramp(rib_half - rib_dist, 0.05)
    rib_cortex = rib_body - ramp(rib_half - 0.06 - rib_dist, 0.05)
    rib_extent = ramp(rib_phase, 0.2) * ramp(9.6 - rib_phase, 0.4) * ramp(wb - 0.07, 0.04)
    rib_extent *= ramp(rib_limit - wb, 0.05)
    # Each rib its own density, so that the cage does not look like a ladder.
    rib_density = rng.uniform(0.75, 1.15, 24).astype(np.float32)
    rib_number = np.clip(rib_phase, 0, 11).astype(np.int32) + (12 * c.right_f[box]).astype(np.int32)
    ribs = rib_extent * rib_density[rib_number] * (0.1 * rib_body + 0.06 * rib_cortex)
    ant_phase = (vb + 0.45 * wb - 0.1 * wb * wb - (apex_v + 0.2)) * (1 / (rib_spacing * 1.35))
    ant_body = ramp(0.2 - np.abs(ant_phase - np.floor(ant_phase) - 0.5), 0.08)
    ant_extent = ramp(ant_phase, 0.3) * ramp(6.0 - ant_phase, 0.5) * ramp(wb - 0.3, 0.1)
    ribs += 0.055 * ant_body * ant_extent * ramp(rib_limit - wb, 0.05)
    bone[box] += ribs


def _draw_clavicles(rng: np.random.Generator, c: _Coords, shape: _LungShape, bone: FloatArray) -> None:
    """Clavicles: from the manubrium rising laterally towards the shoulders."""
    clav_v0 = shape.apex_v + 0.13 + uniform(rng, (-0.04, 0.04))
    box = c.pose.box(-0.7, 0.7, clav_v0 - 0.2, clav_v0 + 0.1)
    vb, wb = c.v[box], c.w[box]
    clav_dist = np.abs(vb - (clav_v0 - 0.24 * wb + 0.14 * wb * wb))
    clav_half = 0.03 + 0.008 * np.clip(0.3 - wb, 0.0, 0.3) * (1 / 0.3)
    bone[box] += 0.28 * ramp(clav_half - clav_dist, 0.012) * ramp(wb - 0.07, 0.03) * ramp(0.66 - wb, 0.05)


def _draw_humeri(
    rng: np.random.Generator, c: _Coords, shape: _LungShape, bone: FloatArray, tissue: FloatArray
) -> None:
    """Humeral heads and shafts at the upper corners (with the arm's soft tissue outside the chest wall)."""
    head_v = shape.apex_v + 0.08 + uniform(rng, (-0.03, 0.03))
    for u0, u1 in ((-1.25, -0.82), (0.82, 1.25)):
        box = c.pose.box(u0, u1, head_v - 0.17, head_v + 0.45)
        vb, wb = c.v[box], c.w[box]
        head = ((wb - 0.97) * (1 / 0.12)) ** 2 + ((vb - head_v) * (1 / 0.15)) ** 2
        humerus = 0.32 * np.sqrt(np.clip(1.0 - head, 0.0, 1.0))
        humerus += (
            0.25
            * ramp(0.07 - np.abs(wb - 0.99), 0.02)
            * ramp(vb - head_v, 0.05)
            * ramp(head_v + 0.3 - vb, 0.2)
        )
        bone[box] += humerus
        tissue[box] = np.maximum(tissue[box], 0.8 * humerus)


def draw_anatomy(
    size: int, rng: np.random.Generator, config: SynthConfig
) -> tuple[Anatomy, list[FloatArray]]:
    """Render the normal chest; return the fields findings need and the attenuation parts.

    Returns ``(anatomy, [tissue, air, bone])``: soft-tissue thickness, air fraction (lungs, trachea, stomach)
    and added density (bones, vessels) on the pixel grid. Structures confined to a part of the image are
    computed on their bounding box only, which is what keeps this at a few milliseconds per image.
    """
    pose = _draw_pose(size, rng, config)
    u, v = pose.patient_coords()
    right = u < 0
    c = _Coords(pose=pose, u=u, v=v, w=np.abs(u), right=right, right_f=right.astype(np.float32))
    half_width, tissue = _body_outline(c)
    shape = _draw_lung_shape(rng, config)
    lungs = _lungs(c, shape)
    radius_b, angle_b, markings_b = _draw_hila(rng, c, lungs)

    def full(part: FloatArray) -> FloatArray:
        out = np.zeros_like(u)
        out[lungs.box] = part
        return out

    lung_hard = np.zeros(u.shape, dtype=bool)
    lung_hard[lungs.box] = lungs.signed_distance > 0
    air, bone = full(lungs.air), full(markings_b)
    heart_soft = _draw_heart(rng, config, c, shape, air)
    _draw_trachea(rng, c, air)
    _draw_gastric_bubble(rng, c, shape, air)
    _draw_spine(rng, c, bone)
    _draw_ribs(rng, c, shape, half_width, bone)
    _draw_clavicles(rng, c, shape, bone)
    _draw_humeri(rng, c, shape, bone, tissue)

    anatomy = Anatomy(
        u=u,
        v=v,
        w=c.w,
        right=right,
        t=full(lungs.t),
        medial=full(lungs.medial),
        lateral=full(lungs.lateral),
        lung_soft=full(lungs.soft),
        lung_hard=lung_hard & (heart_soft < 0.5),
        heart_soft=heart_soft,
        hilum_radius=full(radius_b),
        hilum_angle=full(angle_b),
        pose=pose,
        params={
            "apex_v": shape.apex_v,
            "dome_r": shape.dome_r,
            "dome_l": shape.dome_l,
            "apex_w": shape.apex_w,
            "lateral_w": shape.lateral_w,
            "medial_w": shape.medial_w,
            "scale_px": size / 2 * pose.scale,
        },
    )
    return anatomy, [tissue, air, bone]
