"""The prediction use case without HTTP: option checking, decoding, and one typed report per model pair."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.errors import ArtifactError, InputError
from core.imageio import ImageTooLargeError, UnsupportedFormatError
from core.vocabulary import METHODS
from engine.predict import MAP_MODES, PredictOptions, decode_image, predict_pairs, resolve_options
from engine.report import DriftReport, drift_report
from engine.runtime import ModelPair
from tests.pairs import CLASS_NAMES, PAIR_ARCHS


@pytest.fixture(scope="module")
def pairs(api_artifacts: Path) -> dict[str, ModelPair]:
    return {arch: ModelPair.load(api_artifacts / arch, threads=1) for arch in PAIR_ARCHS}


def png(gray: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((gray * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_defaults_are_every_pair_both_methods_top20_no_maps(pairs: dict[str, ModelPair]) -> None:
    options = resolve_options(pairs)
    assert options == PredictOptions(
        models=sorted(PAIR_ARCHS), methods=list(METHODS), target_class=None, topk=20.0, maps="none"
    )
    assert MAP_MODES == ("none", "overlay", "raw")


@pytest.mark.parametrize(
    ("kwargs", "code", "valid"),
    [
        ({"models": "densenet201,vgg16"}, "unknown_model", sorted(PAIR_ARCHS)),
        ({"methods": "gradcam"}, "unknown_method", list(METHODS)),
        ({"target_class": "effusion"}, "unknown_class", CLASS_NAMES),
        ({"target_class": "5"}, "unknown_class", CLASS_NAMES),
        ({"topk": 4.9}, "validation_error", None),
        ({"topk": float("nan")}, "validation_error", None),
        ({"maps": "png"}, "validation_error", None),
    ],
)
def test_bad_options_name_the_valid_ones(
    pairs: dict[str, ModelPair], kwargs: dict[str, object], code: str, valid: list[str] | None
) -> None:
    with pytest.raises(InputError) as info:
        resolve_options(pairs, **kwargs)  # type: ignore[arg-type]
    assert info.value.code == code
    if valid is not None:
        assert info.value.details["valid"] == valid
        assert all(v in str(info.value) for v in valid)


def test_options_parse_lists_indices_and_names(pairs: dict[str, ModelPair]) -> None:
    options = resolve_options(pairs, models=" resnet50v2 ,resnet50v2", methods="gradcampp", target_class="3")
    assert options.models == ["resnet50v2"] and options.methods == ["gradcampp"] and options.target_class == 3
    assert resolve_options(pairs, target_class="normal").target_class == "normal"
    with pytest.raises(InputError) as superscript:  # not an index (int() would refuse it): an unknown name
        resolve_options(pairs, target_class="²")
    assert superscript.value.code == "unknown_class"
    with pytest.raises(ArtifactError, match="no model pair is loaded"):
        resolve_options({})


def test_decode_hashes_and_refuses_with_codes() -> None:
    gray = np.linspace(0, 1, 48 * 40).reshape(48, 40)
    data = png(gray)
    image = decode_image(data, max_pixels=10_000)
    assert image.gray.shape == (48, 40) and image.nbytes == len(data) and len(image.sha256) == 64
    np.testing.assert_allclose(image.gray, (gray * 255).astype(np.uint8) / 255, atol=1e-6)
    with pytest.raises(InputError) as empty:
        decode_image(b"", max_pixels=10_000)
    assert empty.value.code == "empty_file"
    with pytest.raises(UnsupportedFormatError) as unknown:
        decode_image(b"GIF89a....", max_pixels=10_000)
    assert unknown.value.code == "unsupported_media_type"
    with pytest.raises(ImageTooLargeError) as large:
        decode_image(data, max_pixels=100)
    assert large.value.details == {"max_pixels": 100}


@pytest.mark.parametrize("maps", ["none", "raw"])
def test_one_typed_report_per_pair_equal_to_the_engine_report(pairs: dict[str, ModelPair], maps: str) -> None:
    gray = np.random.default_rng(0).random((70, 60)).astype(np.float32)
    options = resolve_options(pairs, models="resnet50v2,densenet201", topk=10.0, maps=maps)
    results = predict_pairs(pairs, gray, options)
    assert [r.report.model for r in results] == ["resnet50v2", "densenet201"]
    for result in results:
        assert isinstance(result.report, DriftReport) and result.elapsed_ms > 0
        expected = drift_report(
            pairs[result.report.model], gray, topk_percent=10.0, include_maps=maps != "none"
        )
        got, want = result.report.to_dict(), expected.to_dict()
        got.pop("timings_ms"), want.pop("timings_ms")
        assert got == want
        assert (result.report.maps is None) == (maps == "none")


def test_an_input_the_engine_refuses_names_the_model(pairs: dict[str, ModelPair]) -> None:
    options = resolve_options(pairs, models="densenet201")
    with pytest.raises(InputError) as info:
        predict_pairs(pairs, np.full((8, 8, 3), 0.5, dtype=np.float32), options)
    assert str(info.value).startswith("densenet201: ") and info.value.details == {"model": "densenet201"}
