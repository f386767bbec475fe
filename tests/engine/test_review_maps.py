"""Maps for review (engine/review_maps.py): downsampling against independent oracles, quantisation error,
the payload section per keep mode, and the PNGs."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from engine.report import DriftReport
from engine.review_maps import (
    REVIEW_GRID,
    box_downsample,
    decode_map,
    encode_map,
    legend_png,
    map_png,
    review_maps,
)
from tests.db_fixtures import make_report


def _smooth(size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    cy, cx = rng.uniform(0.2, 0.8, 2)
    cam = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.05) + 0.1 * rng.random((size, size))
    return (cam - cam.min()) / (cam.max() - cam.min())


@pytest.mark.parametrize("size", [96, 224])
def test_downsample_is_the_block_mean_when_the_grid_divides(size: int) -> None:
    cam = _smooth(size, seed=size)
    b = size // REVIEW_GRID
    oracle = cam.reshape(REVIEW_GRID, b, REVIEW_GRID, b).mean(axis=(1, 3))
    np.testing.assert_allclose(box_downsample(cam), oracle, atol=1e-12)


@pytest.mark.parametrize("size", [139, 299])
def test_downsample_is_the_exact_area_mean_otherwise(size: int) -> None:
    cam = _smooth(size, seed=size)
    # each pixel split into 16 x 16 equal sub-pixels: the grid then divides, and block means are area means
    fine = np.kron(cam, np.ones((REVIEW_GRID, REVIEW_GRID)))
    oracle = fine.reshape(REVIEW_GRID, size, REVIEW_GRID, size).mean(axis=(1, 3))
    np.testing.assert_allclose(box_downsample(cam), oracle, atol=1e-12)


def test_encode_decode_within_quantisation_error() -> None:
    cam = _smooth(224, seed=3) * 0.7 + 0.2
    encoded = encode_map(cam)
    assert encoded["shape"] == [REVIEW_GRID, REVIEW_GRID]
    assert len(base64.b64decode(encoded["uint8"])) == REVIEW_GRID**2
    small = box_downsample(cam)
    assert encoded["min"] == pytest.approx(small.min()) and encoded["max"] == pytest.approx(small.max())
    step = (small.max() - small.min()) / 255
    decoded = decode_map(json.loads(json.dumps(encoded)))  # as the database gives it back
    assert np.abs(decoded - small).max() <= step / 2 + 1e-12
    assert np.abs(decoded - small).max() > 0  # it is quantised, not the floats
    # a constant map, and one with a NaN cell, still encode to finite values
    np.testing.assert_allclose(decode_map(encode_map(np.full((96, 96), 0.5))), 0.5)
    holed = _smooth(96, seed=4)
    holed[0, 0] = np.nan
    assert np.isfinite(decode_map(encode_map(holed))).all()


@pytest.mark.parametrize(
    "broken",
    [
        {},
        {"shape": [16, 16], "min": 0.0, "max": 1.0, "uint8": "!!!"},
        {"shape": [16, 16], "min": 0.0, "max": 1.0, "uint8": base64.b64encode(b"x" * 255).decode()},
        {"shape": [16, 16], "min": 1.0, "max": 0.0, "uint8": base64.b64encode(b"x" * 256).decode()},
        {"shape": [16, 16], "min": None, "max": 1.0, "uint8": base64.b64encode(b"x" * 256).decode()},
    ],
)
def test_decode_refuses_malformed_maps(broken: dict) -> None:
    with pytest.raises(ValueError):
        decode_map(broken)


def _with_maps(seed: int, *, flagged: bool) -> DriftReport:
    rng = np.random.default_rng(seed)
    report = make_report(rng, model="resnet50v2", methods=("layercam", "gradcampp"))
    for result in report.methods.values():
        result["flagged"] = flagged
    report.maps = {
        m: {c: _smooth(96, seed=seed + i) for i, c in enumerate(("transfer", "finetuned"))}
        for m in report.methods
    }
    return report


def test_review_maps_per_keep_mode() -> None:
    calm, hot = _with_maps(1, flagged=False), _with_maps(2, flagged=True)
    assert review_maps([calm], "none") is None
    assert review_maps([calm], "flagged") == {"keep": "flagged", "grid": 16, "kept": False, "models": {}}
    section = review_maps([hot], "flagged")
    assert section is not None and section["kept"] is True
    every = review_maps([calm], "all")
    assert every is not None and every["kept"] is True
    kept = every["models"]["resnet50v2"]
    assert set(kept) == {"layercam", "gradcampp"} and set(kept["layercam"]) == {"transfer", "finetuned"}
    assert calm.maps is not None
    for method, by_checkpoint in kept.items():
        for checkpoint, encoded in by_checkpoint.items():
            oracle = calm.maps[method][checkpoint].reshape(16, 6, 16, 6).mean(axis=(1, 3))
            np.testing.assert_allclose(decode_map(encoded), oracle, atol=1 / 510 + 1e-12)
    calm.maps = None
    with pytest.raises(ValueError, match="no maps"):
        review_maps([calm], "all")
    with pytest.raises(ValueError, match="keep must be"):
        review_maps([hot], "some")


def test_pngs() -> None:
    grid = np.linspace(0, 1, 256).reshape(16, 16)
    image = Image.open(io.BytesIO(map_png(grid)))
    assert image.format == "PNG" and image.size == (128, 128) and image.mode == "RGB"
    pixels = np.asarray(image)
    assert (pixels[:8, :8] == pixels[0, 0]).all()  # each cell an 8 px square
    assert tuple(pixels[0, 0]) == (0, 0, 128) and tuple(pixels[-1, -1]) == (128, 0, 0)  # jet ends
    legend = Image.open(io.BytesIO(legend_png()))
    assert legend.size == (256, 12)
    with pytest.raises(ValueError):
        map_png(np.full((4, 4), np.nan))
