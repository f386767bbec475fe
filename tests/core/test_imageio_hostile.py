"""core.imageio against hostile and damaged files: size checked against the file before allocating, truncated
or grey-filled data refused, no object address in a message, and pydicom's compressed test files decoded
(compared with their uncompressed twins)."""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
import pydicom
import pytest
from PIL import Image, ImageFile
from pydicom.data import get_testdata_file

from core.imageio import (
    RATIO_FREE_PIXELS,
    ImageDecodeError,
    NoPixelDataError,
    read_image,
    read_image_with_info,
    scrub_reprs,
)

# ----------------------------------------------------------------------------------------------- builders


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_from_raw(width: int, height: int, raw: bytes, *, interlace: int = 0, level: int = 9) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, interlace)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(raw, level))
        + png_chunk(b"IEND", b"")
    )


def zero_png(side: int) -> bytes:
    """An all-zero 8-bit gray PNG of side x side: maximally compressible (~1000 pixels per byte)."""
    row = b"\0" * (side + 1)
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    )


def noisy(size: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = 100 + 80 * np.sin(6 * xx) * np.cos(4 * yy) + rng.normal(0, 8, (size, size))
    return np.clip(img, 0, 255).astype(np.uint8)


def jpeg_of(arr: np.ndarray, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90, **kwargs)
    return buf.getvalue()


def patch_sof(data: bytes, width: int, height: int) -> bytes:
    """The JPEG with its frame header (SOF0/1/2) declaring width x height; the scan data is unchanged."""
    out = bytearray(data)
    pos = 2
    while pos < len(out):
        marker = out[pos + 1]
        length = struct.unpack(">H", out[pos + 2 : pos + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            out[pos + 5 : pos + 9] = struct.pack(">HH", height, width)
            return bytes(out)
        pos += 2 + length
    raise AssertionError("no SOF marker")


# ----------------------------------------------------------------------------------------------- size vs file


def test_all_zero_png_declaring_36_megapixels_is_refused_before_decoding() -> None:
    data = zero_png(6000)
    assert len(data) < 40_000
    with pytest.raises(ImageDecodeError, match="implausible") as err:
        read_image(data, max_pixels=40_000_000, max_pixels_per_byte=100)
    assert err.value.details["declared_pixels"] == 36_000_000
    assert err.value.code == "undecodable_image"


def test_pixels_per_byte_spares_small_images_and_real_ones() -> None:
    # small constant images: headers dominate, the ratio does not apply below RATIO_FREE_PIXELS
    small = png_from_raw(512, 512, b"\0" * (513 * 512))
    assert RATIO_FREE_PIXELS > 512 * 512 and 512 * 512 / len(small) > 100
    assert read_image(small, max_pixels_per_byte=100).shape == (512, 512)
    # a large noisy image is far below the limit
    big = noisy(2100)
    data = jpeg_of(big)
    assert big.size > RATIO_FREE_PIXELS
    assert read_image(data, max_pixels_per_byte=100).shape == (2100, 2100)


def test_jpeg_header_patched_to_6000x6000_is_refused() -> None:
    data = patch_sof(jpeg_of(noisy(96)), 6000, 6000)
    assert len(data) < 12_000
    with pytest.raises(ImageDecodeError, match="implausible"):
        read_image(data, max_pixels=40_000_000, max_pixels_per_byte=100)


@pytest.mark.parametrize("progressive", [False, True], ids=["baseline", "progressive"])
def test_jpeg_whose_scan_runs_out_is_refused_not_grey_filled(progressive: bool) -> None:
    # below the ratio floor: only the completeness check can tell (PIL decodes it, filling flat 128)
    data = patch_sof(jpeg_of(noisy(96), progressive=progressive), 1000, 1000)
    with pytest.raises(ImageDecodeError, match="truncated JPEG"):
        read_image(data)


def test_jpeg_cut_in_half_with_an_end_marker_is_refused() -> None:
    data = jpeg_of(noisy(256))
    cut = data[: len(data) // 2] + b"\xff\xd9"
    with pytest.raises(ImageDecodeError, match="truncated JPEG"):
        read_image(cut)


def test_jpeg_cut_without_end_marker_is_refused_even_if_pil_is_told_to_load_truncated_images() -> None:
    data = jpeg_of(noisy(128))
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        with pytest.raises(ImageDecodeError, match="truncated"):
            read_image(data[: len(data) // 2])
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = False


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_uniform_mid_grey_jpeg_is_not_taken_for_a_truncated_one(mode: str) -> None:
    arr = np.full((64, 80) if mode == "L" else (64, 80, 3), 128, dtype=np.uint8)
    pixels = read_image(jpeg_of(arr))
    np.testing.assert_allclose(pixels, 128 / 255, atol=1e-6)


def test_png_whose_zlib_stream_ends_early_is_refused_not_zero_filled() -> None:
    arr = noisy(64)
    raw = b"".join(b"\0" + arr[r].tobytes() for r in range(64))
    whole = png_from_raw(64, 64, raw)
    np.testing.assert_array_equal(read_image(whole), arr / np.float32(255))
    short = png_from_raw(64, 64, raw[: len(raw) // 2])  # a complete zlib stream of half the rows
    with pytest.raises(ImageDecodeError, match="truncated PNG") as err:
        read_image(short)
    assert err.value.details == {"declared_bytes": len(raw), "found_bytes": len(raw) // 2}


def test_png_with_header_patched_larger_is_refused() -> None:
    arr = noisy(64)
    raw = b"".join(b"\0" + arr[r].tobytes() for r in range(64))
    with pytest.raises(ImageDecodeError):
        read_image(png_from_raw(64, 640, raw))


def test_interlaced_png_is_complete_and_decodes() -> None:
    """Adam7: the expected stream length is the sum of the seven passes (a wrong sum would refuse it)."""
    arr = noisy(37)[:, :29]
    passes = (
        (0, 0, 8, 8),
        (4, 0, 8, 8),
        (0, 4, 4, 8),
        (2, 0, 4, 4),
        (0, 2, 2, 4),
        (1, 0, 2, 2),
        (0, 1, 1, 2),
    )
    raw = b""
    for x0, y0, dx, dy in passes:
        sub = arr[y0::dy, x0::dx]
        if sub.size:
            raw += b"".join(b"\0" + row.tobytes() for row in sub)
    pixels = read_image(png_from_raw(29, 37, raw, interlace=1))
    np.testing.assert_array_equal(pixels, arr / np.float32(255))
    with pytest.raises(ImageDecodeError, match="truncated PNG"):
        read_image(png_from_raw(29, 37, raw[:-5], interlace=1))


def test_no_object_address_in_messages() -> None:
    for data in (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0" + b"\0" * 50):
        with pytest.raises(ImageDecodeError) as err:
            read_image(data)
        assert " at 0x" not in str(err.value), str(err.value)
    assert (
        scrub_reprs("cannot identify <_io.BytesIO object at 0x7f00aa>")
        == "cannot identify <_io.BytesIO object>"
    )


def test_conversion_to_float32_matches_the_float64_definition() -> None:
    """The lookup-table and row-block conversions give exactly float32(value / 255) and BT.601 / 255."""
    gray = noisy(50)
    buf = io.BytesIO()
    Image.fromarray(gray).save(buf, format="PNG")
    np.testing.assert_array_equal(read_image(buf.getvalue()), (gray / 255.0).astype(np.float32))
    rgb = np.stack([gray, gray[::-1], gray[:, ::-1]], axis=-1)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    expected = ((rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])) / 255.0).astype(np.float32)
    np.testing.assert_array_equal(read_image(buf.getvalue()), np.clip(expected, 0, 1))


# ----------------------------------------------------------------------------------------------- DICOM


def _testdata(name: str) -> str:
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"pydicom test file {name} is not installed")
    return str(path)


def _decode(name: str) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return read_image(_testdata(name))


COMPRESSED = [
    "JPGExtended.dcm",  # JPEG Extended, 12 bit
    "MR_small_jpeg_ls_lossless.dcm",
    "JPEGLSNearLossless_08.dcm",
    "JPEGLSNearLossless_16.dcm",
    "SC_rgb_jls_lossy_line.dcm",
    "JPEG2000.dcm",
    "693_J2KI.dcm",
    "MR_small_jp2klossless.dcm",
    "GDCMJ2K_TextGBR.dcm",
    "SC_rgb_gdcm_KY.dcm",
    "SC_rgb_jpeg_dcmtk.dcm",
    "SC_rgb_jpeg_gdcm.dcm",
    "SC_rgb_dcmtk_+eb+cy+s4.dcm",
    "SC_jpeg_no_color_transform.dcm",
    "MR_small_RLE.dcm",
    "examples_palette.dcm",
]


@pytest.mark.parametrize("name", COMPRESSED)
def test_compressed_and_palette_dicom_decode(name: str) -> None:
    pixels, info = read_image_with_info(_testdata(name))
    assert pixels.ndim == 2 and pixels.dtype == np.float32
    assert 0.0 <= float(pixels.min()) < float(pixels.max()) <= 1.0
    assert info.format == "dicom"


@pytest.mark.parametrize(
    ("compressed", "uncompressed", "atol"),
    [
        ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm", 0.0),
        ("MR_small_jp2klossless.dcm", "MR_small.dcm", 0.0),
        ("MR_small_RLE.dcm", "MR_small.dcm", 0.0),
        ("SC_rgb_jpeg_gdcm.dcm", "SC_rgb_rle.dcm", 0.0),  # JPEG lossless vs RLE lossless
        ("SC_rgb_jpeg_dcmtk.dcm", "SC_rgb_rle.dcm", 0.03),  # JPEG baseline (lossy)
        ("SC_rgb_dcmtk_+eb+cy+s4.dcm", "SC_rgb_rle.dcm", 0.03),
        ("SC_rgb_jls_lossy_line.dcm", "SC_rgb_rle.dcm", 0.03),  # JPEG-LS near-lossless
        ("SC_rgb_gdcm_KY.dcm", "SC_rgb_rle.dcm", 0.03),  # JPEG 2000 (lossy)
        ("rtdose_rle_1frame.dcm", "rtdose_1frame.dcm", 0.0),
    ],
)
def test_compressed_dicom_matches_its_uncompressed_twin(
    compressed: str, uncompressed: str, atol: float
) -> None:
    a, b = _decode(compressed), _decode(uncompressed)
    assert a.shape == b.shape
    diff = np.abs(a.astype(np.float64) - b)
    if atol == 0.0:
        np.testing.assert_array_equal(a, b)
    else:
        assert float(diff.mean()) < atol / 3 and float(np.percentile(diff, 99)) < atol * 3, (
            float(diff.mean()),
            float(diff.max()),
        )


def test_palette_colour_is_its_lookup_table_luminance() -> None:
    """Oracle: pydicom's own apply_color_lut, then BT.601 over the LUT's 16-bit range."""
    from pydicom.pixels import apply_color_lut

    path = _testdata("examples_palette.dcm")
    ds = pydicom.dcmread(path)
    rgb = apply_color_lut(ds.pixel_array, ds).astype(np.float64)
    expected = (rgb @ np.array([0.299, 0.587, 0.114])) / float(
        np.iinfo(apply_color_lut(ds.pixel_array, ds).dtype).max
    )
    np.testing.assert_allclose(read_image(path), expected, atol=1e-6)


@pytest.mark.parametrize(
    ("name", "error"),
    [
        ("MR_truncated.dcm", ImageDecodeError),  # pixel data shorter than Rows x Columns
        ("JPEG-lossy.dcm", ImageDecodeError),  # invalid SOS (JPGExtended.dcm is its fixed version)
        ("JPEG2000-embedded-sequence-delimiter.dcm", ImageDecodeError),  # corrupted codestream
        ("badVR.dcm", ImageDecodeError),  # NumberOfFrames '1A': was a bare ValueError
        ("rtplan.dcm", NoPixelDataError),
        ("test-SR.dcm", NoPixelDataError),
    ],
)
def test_broken_pydicom_files_are_decode_errors(name: str, error: type[Exception]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(error):
            read_image(_testdata(name))


@pytest.mark.slow
def test_every_installed_pydicom_test_file_decodes_or_is_a_decode_error() -> None:
    """Every file either decodes to (H, W) in [0, 1] or raises ImageDecodeError: nothing else escapes."""
    from pydicom.data import get_testdata_files

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        paths = [p for p in get_testdata_files("*.dcm")]
    decoded = 0
    for path in paths:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                pixels = read_image(path)
            except ImageDecodeError:
                continue
        assert pixels.ndim == 2 and float(pixels.min()) >= 0.0 and float(pixels.max()) <= 1.0, path
        decoded += 1
    assert decoded >= 50, decoded
