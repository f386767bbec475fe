"""core.imageio: every format and error path against hand-computed values and independent decoders."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset

from core.imageio import (
    ImageDecodeError,
    ImageInfo,
    ImageTooLargeError,
    NoPixelDataError,
    UnsupportedFormatError,
    read_image,
    read_image_with_info,
    sniff_format,
    window,
)
from tests.images import dicom_bytes

# ----------------------------------------------------------------------------------------------- builders


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def declared_png(width: int, height: int, *, idat: bytes = b"garbage, not a zlib stream") -> bytes:
    """A PNG whose header declares width x height but whose pixel data is junk: decoding it must fail."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    )


@pytest.fixture
def ramp8() -> np.ndarray:
    return (np.arange(12 * 20).reshape(12, 20) % 256).astype(np.uint8)


# ----------------------------------------------------------------------------------------------- sniffing


def test_sniff_format_by_magic_bytes(ramp8: np.ndarray) -> None:
    assert sniff_format(png_bytes(Image.fromarray(ramp8))) == "png"
    jpeg = io.BytesIO()
    Image.fromarray(ramp8).save(jpeg, format="JPEG")
    assert sniff_format(jpeg.getvalue()) == "jpeg"
    assert sniff_format(dicom_bytes(np.zeros((2, 2)))) == "dicom"
    assert sniff_format(dicom_bytes(np.zeros((2, 2)), preamble=False)) == "dicom"
    assert sniff_format(b"hello, this is text") is None
    assert sniff_format(b"") is None
    assert sniff_format(b"GIF89a" + b"\0" * 200) is None


def test_format_detected_from_content_not_extension(tmp_path: Path, ramp8: np.ndarray) -> None:
    path = tmp_path / "really_a_png.dcm"
    path.write_bytes(png_bytes(Image.fromarray(ramp8)))
    pixels, info = read_image_with_info(path)
    assert info.format == "png"
    np.testing.assert_array_equal(pixels, ramp8 / np.float32(255))


# ----------------------------------------------------------------------------------------------- PNG, JPEG


def test_png_8bit_gray_is_value_over_255(tmp_path: Path, ramp8: np.ndarray) -> None:
    path = tmp_path / "gray8.png"
    Image.fromarray(ramp8).save(path)
    pixels, info = read_image_with_info(path)
    assert pixels.dtype == np.float32 and pixels.shape == (12, 20)
    np.testing.assert_allclose(pixels, ramp8.astype(np.float64) / 255.0, atol=1e-7)
    assert info == ImageInfo(
        format="png", width=20, height=12, bit_depth=8, mode="L", frames=1, size_bytes=path.stat().st_size
    )


def test_png_16bit_full_range_maps_to_unit_interval(tmp_path: Path) -> None:
    values = np.array([[0, 1, 1000, 32768, 65534, 65535]], dtype=np.uint16)
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    path = tmp_path / "gray16.png"
    image.save(path)
    pixels, info = read_image_with_info(path)
    assert info.bit_depth == 16
    assert pixels[0, 0] == 0.0 and pixels[0, -1] == 1.0
    np.testing.assert_allclose(pixels, values / 65535.0, atol=1e-7)
    # 16-bit precision survives: neighbouring values stay distinct (an 8-bit path would merge them)
    assert pixels[0, 4] < pixels[0, 5]


def test_rgb_is_bt601_luminance_and_matches_pil(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(9, 11, 3), dtype=np.uint8)
    path = tmp_path / "rgb.png"
    Image.fromarray(rgb).save(path)
    pixels = read_image(path)
    expected = (0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]) / 255.0
    np.testing.assert_allclose(pixels, expected, atol=1e-6)
    # PIL's own conversion (rounded to 8 bits) as an independent oracle
    pil_gray = np.asarray(Image.fromarray(rgb).convert("L"), dtype=np.float64) / 255.0
    assert np.abs(pixels - pil_gray).max() <= 1.0 / 255.0 + 1e-6


def test_rgba_drops_alpha(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    rgba = rng.integers(0, 256, size=(7, 5, 4), dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(np.ascontiguousarray(rgba[..., :3])).save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(read_image(tmp_path / "rgba.png"), read_image(tmp_path / "rgb.png"))


def test_palette_png(tmp_path: Path, ramp8: np.ndarray) -> None:
    rgb = np.stack([ramp8, ramp8, ramp8], axis=-1)
    Image.fromarray(rgb).quantize(colors=16).save(tmp_path / "pal.png")
    expected = np.asarray(Image.open(tmp_path / "pal.png").convert("L"), dtype=np.float64) / 255.0
    np.testing.assert_allclose(read_image(tmp_path / "pal.png"), expected, atol=1.0 / 255.0 + 1e-6)


def test_jpeg_matches_pil_decoder_and_original(tmp_path: Path) -> None:
    yy, xx = np.mgrid[0:32, 0:48]
    smooth = (255 * (xx + yy) / (31 + 47)).astype(np.uint8)
    path = tmp_path / "scan.jpg"
    Image.fromarray(smooth).save(path, quality=95)
    pixels, info = read_image_with_info(path)
    assert (info.format, info.width, info.height, info.bit_depth) == ("jpeg", 48, 32, 8)
    np.testing.assert_allclose(pixels, np.asarray(Image.open(path), dtype=np.float64) / 255.0, atol=1e-7)
    assert np.abs(pixels - smooth / 255.0).mean() < 0.01


def test_bytes_and_path_give_the_same_pixels(tmp_path: Path, ramp8: np.ndarray) -> None:
    path = tmp_path / "x.png"
    Image.fromarray(ramp8).save(path)
    from_path = read_image(path)
    np.testing.assert_array_equal(from_path, read_image(path.read_bytes()))
    np.testing.assert_array_equal(from_path, read_image(str(path)))
    np.testing.assert_array_equal(from_path, read_image(bytearray(path.read_bytes())))


# ----------------------------------------------------------------------------------------------- DICOM


def test_dicom_monochrome2_min_max(tmp_path: Path) -> None:
    raw = np.array([[100, 200], [300, 500]])
    path = tmp_path / "m2.dcm"
    path.write_bytes(dicom_bytes(raw))
    pixels, info = read_image_with_info(path)
    np.testing.assert_allclose(pixels, [[0.0, 0.25], [0.5, 1.0]], atol=1e-7)
    assert (info.format, info.mode, info.width, info.height, info.bit_depth) == (
        "dicom",
        "MONOCHROME2",
        2,
        2,
        16,
    )


def test_dicom_monochrome1_is_inverted_so_air_is_dark() -> None:
    raw = np.array([[100, 200], [300, 500]])
    m1 = read_image(dicom_bytes(raw, photometric="MONOCHROME1"))
    m2 = read_image(dicom_bytes(raw, photometric="MONOCHROME2"))
    np.testing.assert_allclose(m1, [[1.0, 0.75], [0.5, 0.0]], atol=1e-7)
    np.testing.assert_allclose(m1, 1.0 - m2, atol=1e-7)


def test_dicom_16bit_full_range() -> None:
    raw = np.array([[0, 1], [32768, 65535]])
    pixels = read_image(dicom_bytes(raw, bits_stored=16))
    np.testing.assert_allclose(pixels, raw / 65535.0, atol=1e-7)
    assert pixels.min() == 0.0 and pixels.max() == 1.0


def test_dicom_rescale_is_applied_before_window() -> None:
    # stored 0/1000/2000/3000 -> HU = 2*x - 1024 = -1024/976/2976/4976; window in HU: c=976, w=2001
    raw = np.array([[0, 1000, 1500, 2000, 3000]])
    data = dicom_bytes(raw, RescaleSlope=2, RescaleIntercept=-1024, WindowCenter=976, WindowWidth=2001)
    pixels = read_image(data)
    hu = 2.0 * raw - 1024.0
    c, w = 976.0, 2001.0
    expected = np.clip((hu - (c - 0.5)) / (w - 1) + 0.5, 0, 1)  # DICOM LINEAR, hand formula
    np.testing.assert_allclose(pixels, expected, atol=1e-6)
    assert pixels[0, 1] == pytest.approx(0.50025, abs=1e-6)
    # without the rescale, the same window would put every stored value below HU 976 at ... differently
    unscaled = read_image(dicom_bytes(raw, WindowCenter=976, WindowWidth=2001))
    assert not np.allclose(unscaled, pixels)


def test_dicom_window_agrees_with_pydicom_windowing() -> None:
    """pydicom's apply_windowing maps to [y_min, y_max] of the stored range; ours to [0, 1]."""
    from pydicom.pixels import apply_windowing

    rng = np.random.default_rng(2)
    raw = rng.integers(0, 4096, size=(16, 16))
    data = dicom_bytes(raw, bits_stored=12, WindowCenter=1500, WindowWidth=800)
    ds = pydicom.dcmread(io.BytesIO(data))
    reference = apply_windowing(ds.pixel_array.astype(np.float64), ds)
    np.testing.assert_allclose(read_image(data), reference / 4095.0, atol=1e-6)


def test_dicom_multivalued_window_uses_first() -> None:
    raw = np.array([[0, 50, 100, 150, 200]])
    first = read_image(dicom_bytes(raw, WindowCenter=[100, 10], WindowWidth=[101, 5]))
    np.testing.assert_allclose(first, np.clip((raw - 99.5) / 100 + 0.5, 0, 1), atol=1e-6)


def test_dicom_voi_lut_sequence_wins_over_window() -> None:
    raw = np.array([[0, 1, 2, 3]])
    item = Dataset()
    item.LUTDescriptor = [4, 0, 16]
    item.LUTData = np.array([0, 1000, 3000, 4000], dtype=np.uint16).tobytes()
    data = dicom_bytes(raw, bits_stored=12, VOILUTSequence=[item], WindowCenter=1, WindowWidth=2)
    np.testing.assert_allclose(read_image(data), [[0.0, 0.25, 0.75, 1.0]], atol=1e-6)


def test_window_functions_hand_values() -> None:
    x = np.array([0.0, 40.0, 50.0, 60.0, 100.0])
    np.testing.assert_allclose(window(x, center=50, width=20, function="LINEAR_EXACT"), [0, 0, 0.5, 1, 1])
    np.testing.assert_allclose(window(x, center=50, width=20, function="SIGMOID")[2], 0.5)
    assert window(x, center=50, width=20, function="SIGMOID")[3] == pytest.approx(1 / (1 + np.exp(-2)))
    with pytest.raises(ValueError, match="LINEAR, LINEAR_EXACT, SIGMOID"):
        window(x, center=50, width=20, function="CUBIC")


def test_dicom_multiframe_reads_first_frame() -> None:
    frames = np.stack([np.array([[10, 20], [30, 40]]), np.array([[40, 30], [20, 10]])])
    pixels, info = read_image_with_info(dicom_bytes(frames, frames=2))
    assert info.frames == 2 and pixels.shape == (2, 2)
    np.testing.assert_allclose(pixels, [[0.0, 1 / 3], [2 / 3, 1.0]], atol=1e-6)


def test_dicom_without_preamble(tmp_path: Path) -> None:
    raw = np.array([[0, 10], [20, 40]])
    path = tmp_path / "no_preamble"  # no extension, as PACS exports often are
    path.write_bytes(dicom_bytes(raw, preamble=False))
    np.testing.assert_allclose(read_image(path), raw / 40.0, atol=1e-7)


def test_dicom_signed_pixels() -> None:
    raw = np.array([[-1000, 0], [500, 1000]])
    np.testing.assert_allclose(read_image(dicom_bytes(raw, signed=True)), (raw + 1000) / 2000.0, atol=1e-7)


def test_dicom_without_pixel_data(tmp_path: Path) -> None:
    path = tmp_path / "report.dcm"
    path.write_bytes(dicom_bytes(None))
    with pytest.raises(NoPixelDataError, match=r"report\.dcm") as excinfo:
        read_image(path)
    assert "no pixel data" in str(excinfo.value)
    assert isinstance(excinfo.value, ImageDecodeError) and isinstance(excinfo.value, ValueError)


def test_constant_dicom_is_zeros_not_nan() -> None:
    pixels = read_image(dicom_bytes(np.full((3, 3), 7)))
    assert np.all(pixels == 0.0)


# ----------------------------------------------------------------------------------------------- errors


def test_text_file_named_png(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("this is not an image\n")
    with pytest.raises(UnsupportedFormatError, match=r"notes\.png.*png, jpeg, dicom"):
        read_image(path)


def test_random_bytes_are_unsupported() -> None:
    junk = np.random.default_rng(3).integers(0, 256, size=500, dtype=np.uint8).tobytes()
    with pytest.raises(UnsupportedFormatError, match="image bytes"):
        read_image(b"\x00\x01" + junk)


def test_corrupt_png_body(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.png"
    path.write_bytes(declared_png(8, 8))
    with pytest.raises(ImageDecodeError, match=r"corrupt\.png") as excinfo:
        read_image(path)
    assert not isinstance(excinfo.value, ImageTooLargeError | UnsupportedFormatError)


def test_truncated_png(tmp_path: Path, ramp8: np.ndarray) -> None:
    noise = np.random.default_rng(4).integers(0, 256, size=(64, 64), dtype=np.uint8)
    data = png_bytes(Image.fromarray(noise))
    path = tmp_path / "truncated.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageDecodeError, match=r"truncated\.png.*(truncated|corrupt)"):
        read_image(path)


def test_truncated_jpeg_header() -> None:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(buf, format="JPEG")
    with pytest.raises(ImageDecodeError):
        read_image(buf.getvalue()[:20])


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"absent\.png"):
        read_image(tmp_path / "absent.png")


def test_pixel_cap_checked_before_decoding(tmp_path: Path) -> None:
    # The pixel data is junk: a TooLarge error (not a decode error) proves the cap is checked first.
    path = tmp_path / "bomb.png"
    path.write_bytes(declared_png(5000, 4000))
    with pytest.raises(ImageTooLargeError, match=r"bomb\.png.*5000x4000"):
        read_image(path, max_pixels=1_000_000)
    with pytest.raises(ImageDecodeError, match="corrupt"):
        read_image(path, max_pixels=20_000_000)


def test_huge_declared_png_refused_even_without_cap() -> None:
    with pytest.raises(ImageTooLargeError):
        read_image(declared_png(100_000, 100_000))


def test_pixel_cap_on_real_images(ramp8: np.ndarray) -> None:
    data = png_bytes(Image.fromarray(ramp8))  # 12 x 20 = 240 pixels
    assert read_image(data, max_pixels=240).shape == (12, 20)
    with pytest.raises(ImageTooLargeError, match="240 pixels"):
        read_image(data, max_pixels=239)
    dcm = dicom_bytes(np.zeros((10, 10)))
    with pytest.raises(ImageTooLargeError, match="10x10"):
        read_image(dcm, max_pixels=99)
    with pytest.raises(ValueError, match="max_pixels"):
        read_image(data, max_pixels=0)
