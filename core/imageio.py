"""Decode chest radiographs (PNG, JPEG, DICOM) into one grayscale float32 array in [0, 1].

Training and the service decode through :func:`read_image`, so a model sees at inference exactly the
pixels it was trained on. The format is detected from the leading bytes (:func:`sniff_format`), never
from the file name.

What each format becomes:

- PNG/JPEG, 8 bit: ``value / 255``; 16-bit PNG: ``value / (2**16 - 1)`` (the PNG spec requires samples of
  fewer significant bits to be scaled up to the full 16-bit range, so the declared depth is the right
  divisor). Colour is converted to luminance ``0.299 R + 0.587 G + 0.114 B`` (ITU-R BT.601, as PIL's
  ``convert("L")`` but without its rounding to 8 bits); alpha is dropped. The EXIF orientation of a JPEG
  is applied, as viewers do.
- DICOM: Modality LUT (or RescaleSlope/RescaleIntercept), then the VOI LUT if present, else the first
  Window Center/Width (LINEAR, LINEAR_EXACT or SIGMOID, DICOM PS3.3 C.11.2.1.2), else min-max over the
  image; MONOCHROME1 is inverted so that air is dark, like MONOCHROME2. Multi-frame: the first frame only.

Guards, all checked before the pixel buffer is allocated:

- ``max_pixels`` (decompression bombs): the declared size (PIL's lazy header parse; DICOM Rows x Columns).
  Without it PIL's own limit still applies.
- ``max_pixels_per_byte`` (amplification): an image declaring more than :data:`RATIO_FREE_PIXELS` pixels
  must not declare more than this many pixels per byte of the file (a 35 KB all-zero 6000 x 6000 PNG declares
  ~1000; real radiographs, even lossy JPEG, a few to a few tens).
- PNG: the zlib stream of the IDAT chunks must inflate to exactly the number of bytes the header declares
  (streamed and counted, never held), so a short or truncated stream is refused instead of zero-filled.
- JPEG: ``ImageFile.LOAD_TRUNCATED_IMAGES`` is never honoured (a file that ends early is refused), and an
  image whose scan data ran out before its last block (libjpeg only warns, and fills the rest with flat
  grey 128) is refused: when the last block decodes to flat 128, the file is decoded again with filler bytes
  put before its EOI marker; a complete scan ignores them, a scan that ran out decodes them into the blocks
  after its data, so the image changes.

Pixels are converted to float32 directly (lookup tables, or float64 in row blocks), so a decode holds about
the decoded samples plus one float32 copy, not several float64 arrays.

This module does not import torch.
"""

from __future__ import annotations

import io
import logging
import os
import re
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from core.errors import InputError

log = logging.getLogger(__name__)

__all__ = [
    "RATIO_FREE_PIXELS",
    "SUPPORTED_FORMATS",
    "ImageDecodeError",
    "ImageInfo",
    "ImageSource",
    "ImageTooLargeError",
    "NoPixelDataError",
    "UnsupportedFormatError",
    "read_image",
    "read_image_with_info",
    "scrub_reprs",
    "sniff_format",
    "window",
]

ImageSource = str | os.PathLike[str] | bytes | bytearray | memoryview

SUPPORTED_FORMATS: tuple[str, ...] = ("png", "jpeg", "dicom")

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_DICOM_MAGIC_OFFSET = 128
_DICOM_MAGIC = b"DICM"
# Value representations that can follow the first tag of an explicit-VR DICOM stream without preamble.
_DICOM_VRS = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV".split()
)
_BT601 = np.array([0.299, 0.587, 0.114], dtype=np.float64)
# Images up to this many pixels are not held to max_pixels_per_byte (headers dominate tiny files, and a
# 2048 x 2048 float32 image is 16 MiB).
RATIO_FREE_PIXELS = 1 << 22
# Rows converted at a time where a float64 intermediate is needed (RGB luminance, DICOM LUTs).
_ROW_BLOCK_PIXELS = 1 << 20
_LUT8 = (np.arange(256, dtype=np.float64) / 255.0).astype(np.float32)
_ADDRESS = re.compile(r"<([^<>]*?) at 0x[0-9a-fA-F]+>")


class _DecoderFailureToDebug(logging.Filter):
    """pydicom logs every plugin that fails on a file at ERROR with a traceback; the failure is the input's,
    and it reaches the caller as an :class:`ImageDecodeError` naming each plugin's reason. Keep the record,
    at DEBUG, without the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.DEBUG:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            record.exc_info, record.exc_text = None, None
        return True


logging.getLogger("pydicom.pixels.decoders.base").addFilter(_DecoderFailureToDebug())


def scrub_reprs(text: str) -> str:
    """``text`` without the memory addresses of default object reprs (``<_io.BytesIO object at 0x7f..>``).

    Decoder messages (PIL's "cannot identify image file <...>") embed them; they reach clients and logs.
    """
    return _ADDRESS.sub(lambda m: f"<{m.group(1)}>", text)


class ImageDecodeError(InputError):
    """An image could not be decoded. ``source_name`` is the file (or ``None`` for bytes), ``reason`` why."""

    default_code = "undecodable_image"

    def __init__(self, reason: str, *, source_name: str | None = None, details: Any = None) -> None:
        reason = scrub_reprs(reason)
        self.reason = reason
        self.source_name = source_name
        where = f"image file {source_name!r}" if source_name else "image bytes"
        super().__init__(f"cannot decode {where}: {reason}", code=self.default_code, details=details)


class UnsupportedFormatError(ImageDecodeError):
    """The bytes are not PNG, JPEG or DICOM (or a variant of them that cannot be decoded here)."""

    default_code = "unsupported_media_type"

    def __init__(self, reason: str, *, source_name: str | None = None, details: Any = None) -> None:
        valid = {"valid": list(SUPPORTED_FORMATS)}
        super().__init__(reason, source_name=source_name, details=details if details is not None else valid)


class ImageTooLargeError(ImageDecodeError):
    """The declared image size exceeds the pixel cap (decompression-bomb guard)."""

    default_code = "image_too_large"


class NoPixelDataError(ImageDecodeError):
    """A DICOM file without pixel data (e.g. a structured report or a header-only file)."""

    default_code = "no_pixel_data"


@dataclass(frozen=True)
class ImageInfo:
    """What was decoded: for audit logs and debugging.

    ``width``/``height`` are those of the returned array (after EXIF orientation); ``bit_depth`` is the
    stored bits per sample (PNG IHDR depth, 8 for JPEG, DICOM BitsStored); ``mode`` is PIL's mode or the
    DICOM photometric interpretation; ``frames`` the number of frames in the file (only the first is read).
    """

    format: str
    width: int
    height: int
    bit_depth: int
    mode: str
    frames: int = 1
    size_bytes: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "width": self.width,
            "height": self.height,
            "bit_depth": self.bit_depth,
            "mode": self.mode,
            "frames": self.frames,
            "size_bytes": self.size_bytes,
        }


def sniff_format(data: bytes) -> str | None:
    """The format of an encoded image from its leading bytes: ``"png"``, ``"jpeg"``, ``"dicom"`` or ``None``.

    DICOM is recognised by ``"DICM"`` at offset 128 (Part 10 files) or, for streams written without the
    preamble, by a first tag in group 0x0002/0x0008 followed by an explicit VR (or, for group 0x0008, a
    plausible implicit-VR length). ``data`` needs at least the first 132 bytes for Part 10 DICOM.
    """
    head = bytes(data[: _DICOM_MAGIC_OFFSET + 4])
    if head.startswith(_PNG_MAGIC):
        return "png"
    if head.startswith(_JPEG_MAGIC):
        return "jpeg"
    if head[_DICOM_MAGIC_OFFSET : _DICOM_MAGIC_OFFSET + 4] == _DICOM_MAGIC:
        return "dicom"
    if len(head) >= 8:
        group = int.from_bytes(head[0:2], "little")
        element = int.from_bytes(head[2:4], "little")
        if group in (0x0002, 0x0008) and element < 0x0100:
            if head[4:6] in _DICOM_VRS:
                return "dicom"
            implicit_length = int.from_bytes(head[4:8], "little")
            if group == 0x0008 and implicit_length < 1024:
                return "dicom"
    return None


def read_image(
    source: ImageSource, *, max_pixels: int | None = None, max_pixels_per_byte: float | None = None
) -> np.ndarray:
    """Decode ``source`` (a path or the encoded bytes) to float32 (H, W) grayscale in [0, 1].

    Raises :class:`ImageDecodeError` (a ``ValueError``) or one of its subclasses
    :class:`UnsupportedFormatError`, :class:`ImageTooLargeError`, :class:`NoPixelDataError`;
    ``FileNotFoundError`` for a missing path.
    """
    pixels, _ = read_image_with_info(source, max_pixels=max_pixels, max_pixels_per_byte=max_pixels_per_byte)
    return pixels


def read_image_with_info(
    source: ImageSource, *, max_pixels: int | None = None, max_pixels_per_byte: float | None = None
) -> tuple[np.ndarray, ImageInfo]:
    """As :func:`read_image`, and also what was decoded (:class:`ImageInfo`)."""
    if max_pixels is not None and max_pixels <= 0:
        raise ValueError(f"max_pixels must be a positive number of pixels or None, got {max_pixels}")
    if max_pixels_per_byte is not None and not max_pixels_per_byte > 0:
        raise ValueError(f"max_pixels_per_byte must be positive or None, got {max_pixels_per_byte}")
    data, name = _load_bytes(source)
    limits = _Limits(max_pixels=max_pixels, max_pixels_per_byte=max_pixels_per_byte, nbytes=len(data))
    fmt = sniff_format(data)
    if fmt is None:
        raise UnsupportedFormatError(
            f"not a recognised image format (leading bytes {bytes(data[:8])!r}); "
            f"valid formats: {', '.join(SUPPORTED_FORMATS)}",
            source_name=name,
        )
    if fmt == "dicom":
        pixels, info = _decode_dicom(data, name=name, limits=limits)
    else:
        pixels, info = _decode_pil(data, fmt=fmt, name=name, limits=limits)
    if pixels.ndim != 2 or pixels.size == 0:
        raise ImageDecodeError(
            f"decoded to an array of shape {pixels.shape}, expected (H, W)", source_name=name
        )
    pixels = np.ascontiguousarray(pixels, dtype=np.float32)
    if not bool(np.isfinite(pixels.min())) or not bool(np.isfinite(pixels.max())):
        raise ImageDecodeError("decoded pixels contain NaN or infinity", source_name=name)
    np.clip(pixels, 0.0, 1.0, out=pixels)
    return pixels, info


def _load_bytes(source: ImageSource) -> tuple[bytes, str | None]:
    if isinstance(source, bytes | bytearray | memoryview):
        return bytes(source), None
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"image file {str(path)!r} does not exist")
        if not path.is_file():
            raise ImageDecodeError("not a regular file", source_name=str(path))
        return path.read_bytes(), str(path)
    raise TypeError(f"source must be a path (str or os.PathLike) or bytes, got {type(source).__name__}")


@dataclass(frozen=True)
class _Limits:
    max_pixels: int | None
    max_pixels_per_byte: float | None
    nbytes: int


def _check_size(width: int, height: int, *, limits: _Limits, name: str | None) -> None:
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"declared size {width}x{height} is empty", source_name=name)
    pixels = width * height
    max_pixels = limits.max_pixels
    if max_pixels is not None and pixels > max_pixels:
        raise ImageTooLargeError(
            f"declared size {width}x{height} = {pixels} pixels exceeds the limit of {max_pixels} pixels",
            source_name=name,
            details={"max_pixels": max_pixels},
        )
    ratio = limits.max_pixels_per_byte
    if ratio is not None and pixels > RATIO_FREE_PIXELS and pixels > ratio * limits.nbytes:
        raise ImageDecodeError(
            f"declared size {width}x{height} = {pixels} pixels is implausible for a file of {limits.nbytes} "
            f"bytes ({pixels / max(limits.nbytes, 1):.0f} pixels per byte; the limit is {ratio:g} above "
            f"{RATIO_FREE_PIXELS} pixels): the header or the file is corrupt, or the image is a bomb",
            source_name=name,
            details={"max_pixels_per_byte": ratio, "declared_pixels": pixels, "file_bytes": limits.nbytes},
        )


# ------------------------------------------------------------------------------------------------ PNG, JPEG


def _decode_pil(data: bytes, *, fmt: str, name: str | None, limits: _Limits) -> tuple[np.ndarray, ImageInfo]:
    pil_format = {"png": "PNG", "jpeg": "JPEG"}[fmt]
    max_pixels = limits.max_pixels
    try:
        with warnings.catch_warnings():
            # PIL warns between its two limits; with an explicit cap we decide ourselves.
            if max_pixels is not None:
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=[pil_format])
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(
            f"PIL refused the declared size: {exc}", source_name=name, details={"max_pixels": max_pixels}
        ) from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageDecodeError(f"invalid {fmt.upper()} header: {exc}", source_name=name) from exc

    with img:
        width, height = img.size
        _check_size(width, height, limits=limits, name=name)
        if fmt == "png":
            _check_png_data(data, name=name)
        frames = int(getattr(img, "n_frames", 1))
        if frames > 1:
            log.debug("%s has %d frames; reading the first", name or "image", frames)
        bit_depth = _png_bit_depth(data) if fmt == "png" else 8
        mode = img.mode
        try:
            _load_strict(img)
            if fmt == "jpeg":
                _check_jpeg_complete(img, data, name=name)
                transposed = ImageOps.exif_transpose(img)
                if transposed is not None and transposed.size != img.size:
                    log.debug("%s: applied EXIF orientation", name or "image")
                pixels = _pil_to_gray(transposed if transposed is not None else img, bit_depth=bit_depth)
            else:
                pixels = _pil_to_gray(img, bit_depth=bit_depth)
        except UnsupportedFormatError as exc:
            raise UnsupportedFormatError(exc.reason, source_name=name) from exc
        except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
            raise ImageDecodeError(
                f"corrupt or truncated {fmt.upper()} data: {exc}", source_name=name
            ) from exc
    info = ImageInfo(
        format=fmt,
        width=int(pixels.shape[1]),
        height=int(pixels.shape[0]),
        bit_depth=bit_depth,
        mode=mode,
        frames=frames,
        size_bytes=len(data),
    )
    return pixels, info


def _load_strict(img: Image.Image) -> None:
    """``img.load()`` refusing truncated files whatever ``ImageFile.LOAD_TRUNCATED_IMAGES`` says elsewhere."""
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    if previous:
        log.warning("PIL ImageFile.LOAD_TRUNCATED_IMAGES was set; truncated images are refused here anyway")
        ImageFile.LOAD_TRUNCATED_IMAGES = False
    img.load()


_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def _png_expected_bytes(width: int, height: int, depth: int, color_type: int, interlace: int) -> int:
    """Bytes of filtered scanlines (one filter byte per row) the IDAT stream must inflate to (PNG spec 7, 8)."""
    bits = _PNG_CHANNELS[color_type] * depth

    def rows(w: int, h: int) -> int:
        return 0 if w == 0 or h == 0 else h * (1 + (w * bits + 7) // 8)

    if interlace == 0:
        return rows(width, height)
    total = 0
    for x0, y0, dx, dy in _ADAM7:
        total += rows(max(0, (width - x0 + dx - 1) // dx), max(0, (height - y0 + dy - 1) // dy))
    return total


def _check_png_data(data: bytes, *, name: str | None) -> None:
    """The IDAT zlib stream must end and inflate to exactly what IHDR declares (counted, never held)."""
    if len(data) < 33 or data[12:16] != b"IHDR":
        return  # PIL refuses it with its own message
    width, height, depth, color_type, _, _, interlace = struct.unpack(">IIBBBBB", data[16:29])
    if color_type not in _PNG_CHANNELS or interlace not in (0, 1):
        return
    expected = _png_expected_bytes(width, height, depth, color_type, interlace)
    inflater = zlib.decompressobj()
    produced = 0
    pos = 8
    seen_idat = False
    while pos + 8 <= len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        kind = data[pos + 4 : pos + 8]
        payload = data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IDAT":
            seen_idat = True
            chunk: bytes = payload
            try:
                while chunk and not inflater.eof:
                    produced += len(inflater.decompress(chunk, 1 << 20))
                    chunk = inflater.unconsumed_tail
                    if produced > expected:
                        break
            except zlib.error as exc:
                raise ImageDecodeError(f"corrupt PNG image data: {exc}", source_name=name) from exc
        elif kind == b"IEND" or produced > expected:
            break
    if not seen_idat:
        return  # PIL refuses it
    if produced < expected:
        state = "ends early" if inflater.eof else "is truncated"
        raise ImageDecodeError(
            f"truncated PNG: the image data stream {state} after {produced} of the {expected} bytes the "
            f"header declares ({width}x{height}); refusing to fill the rest",
            source_name=name,
            details={"declared_bytes": expected, "found_bytes": produced},
        )


_JPEG_FILLER = b"\xa5\x5a" * 256


def _check_jpeg_complete(img: Image.Image, data: bytes, *, name: str | None) -> None:
    """Refuse a JPEG whose scan ran out of data (libjpeg warns, fills the remaining blocks with flat 128)."""
    if img.mode not in ("L", "RGB"):
        return
    if not _flat_grey_tail(img):
        return
    eoi = data.rfind(b"\xff\xd9")
    if eoi < 0:
        return  # PIL refuses a file without EOI as truncated
    probe_data = data[:eoi] + _JPEG_FILLER + data[eoi:]
    try:
        with Image.open(io.BytesIO(probe_data), formats=["JPEG"]) as probe:
            probe.load()
            same = probe.size == img.size and probe.mode == img.mode and _identical(img, probe)
    except Exception:  # the filler made it undecodable: the original scan was incomplete too
        same = False
    if not same:
        raise ImageDecodeError(
            "truncated JPEG: the compressed data ends before the last block (the decoder would fill the "
            "rest with flat grey); refusing it",
            source_name=name,
        )


def _tail_box(img: Image.Image) -> tuple[int, int, int, int]:
    w, h = img.size
    return (max(0, w - 8), max(0, h - 8), w, h)


def _flat_grey_tail(img: Image.Image) -> bool:
    tail = np.asarray(img.crop(_tail_box(img)))
    return bool(tail.size) and bool(np.all(tail == 128))


def _identical(a: Image.Image, b: Image.Image) -> bool:
    from PIL import ImageChops

    return ImageChops.difference(a, b).getbbox() is None


def _png_bit_depth(data: bytes) -> int:
    # IHDR is the first chunk: 8 magic + 4 length + 4 type + 4 width + 4 height, then the depth byte.
    return int(data[24]) if len(data) > 24 and data[12:16] == b"IHDR" else 8


def _pil_to_gray(img: Image.Image, *, bit_depth: int) -> np.ndarray:
    mode = img.mode
    if mode in ("P", "PA", "1", "CMYK", "YCbCr", "LAB", "HSV"):
        img = img.convert("RGBA" if mode == "PA" or "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("LA", "La"):
        img = img.getchannel(0)
        mode = "L"
    if mode == "L":
        return _LUT8[np.asarray(img)]  # float32 value / 255, computed in float64 and rounded once
    if mode in ("RGB", "RGBA", "RGBa", "RGBX"):
        return _luminance(np.asarray(img), 255.0)
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(img)
        depth = bit_depth if bit_depth > 8 else 16
        if arr.dtype.itemsize <= 2 and arr.dtype.kind == "u":
            lut = (np.arange(1 << 16, dtype=np.float64) / float(2**depth - 1)).astype(np.float32)
            return lut[arr]
        return _scaled(arr, 1.0 / float(2**depth - 1))
    raise UnsupportedFormatError(
        f"unsupported pixel mode {mode!r}; supported: grayscale (L, I;16), RGB, RGBA, palette"
    )


def _row_blocks(height: int, width: int) -> range:
    return range(0, height, max(1, _ROW_BLOCK_PIXELS // max(width, 1)))


def _luminance(rgb: np.ndarray, full_scale: float) -> np.ndarray:
    """BT.601 luminance of (H, W, >=3) samples / ``full_scale`` as float32, in float64 row blocks."""
    height, width = rgb.shape[:2]
    out = np.empty((height, width), dtype=np.float32)
    step = _row_blocks(height, width).step
    for top in range(0, height, step):
        block = np.asarray(rgb[top : top + step, :, :3], dtype=np.float64)
        out[top : top + step] = (block @ _BT601) / full_scale
    return out


def _scaled(arr: np.ndarray, factor: float) -> np.ndarray:
    height, width = arr.shape[:2]
    out = np.empty(arr.shape, dtype=np.float32)
    step = _row_blocks(height, width).step
    for top in range(0, height, step):
        out[top : top + step] = np.asarray(arr[top : top + step], dtype=np.float64) * factor
    return out


# ------------------------------------------------------------------------------------------------ DICOM


def _decode_dicom(data: bytes, *, name: str | None, limits: _Limits) -> tuple[np.ndarray, ImageInfo]:
    import pydicom
    from pydicom.errors import InvalidDicomError

    has_preamble = data[_DICOM_MAGIC_OFFSET : _DICOM_MAGIC_OFFSET + 4] == _DICOM_MAGIC
    try:
        # Without the Part 10 preamble pydicom needs force=True; sniff_format already vetted the first tag.
        ds = pydicom.dcmread(io.BytesIO(data), force=not has_preamble)
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError) as exc:
        raise ImageDecodeError(f"invalid DICOM: {exc}", source_name=name) from exc

    _ensure_transfer_syntax(ds)
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise NoPixelDataError("DICOM file has no pixel data", source_name=name)
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError) as exc:
        raise ImageDecodeError(f"DICOM Rows/Columns missing or invalid: {exc}", source_name=name) from exc
    _check_size(columns, rows, limits=limits, name=name)
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        bits_stored = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)) or 16)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ImageDecodeError(f"invalid DICOM image attribute: {exc}", source_name=name) from exc
    if frames < 1 or samples not in (1, 3) or not 1 <= bits_stored <= 32:
        raise ImageDecodeError(
            f"invalid DICOM image attributes: NumberOfFrames {frames}, SamplesPerPixel {samples}, "
            f"BitsStored {bits_stored}",
            source_name=name,
        )

    try:
        arr = _dicom_first_frame(ds, frames=frames)
    except Exception as exc:  # pydicom raises many types (missing decoder plugins, bad lengths, ...)
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        syntax_name = getattr(syntax, "name", syntax)
        raise ImageDecodeError(
            f"cannot decode DICOM pixel data (transfer syntax {syntax_name}): {exc}", source_name=name
        ) from exc
    if frames > 1:
        log.debug("%s has %d frames; reading the first", name or "DICOM", frames)

    if photometric == "PALETTE COLOR" and arr.ndim == 2:
        gray = _dicom_palette(arr, ds, name=name)
    elif samples == 3 or arr.ndim == 3:
        # Colour (e.g. secondary capture); pydicom already converted YBR to RGB.
        gray = _luminance(arr, float(2**bits_stored - 1))
    elif photometric in ("MONOCHROME1", "MONOCHROME2"):
        gray = _dicom_grayscale(arr, ds, name=name)
        if photometric == "MONOCHROME1":
            np.subtract(1.0, gray, out=gray)
    else:
        raise UnsupportedFormatError(
            f"unsupported DICOM photometric interpretation {photometric!r}; "
            "supported: MONOCHROME1, MONOCHROME2, PALETTE COLOR, RGB, YBR_*",
            source_name=name,
        )
    info = ImageInfo(
        format="dicom",
        width=int(gray.shape[1]),
        height=int(gray.shape[0]),
        bit_depth=bits_stored,
        mode=photometric,
        frames=frames,
        size_bytes=len(data),
    )
    return gray, info


def _dicom_palette(arr: np.ndarray, ds: Any, *, name: str | None) -> np.ndarray:
    """PALETTE COLOR: the palette LUTs (pydicom's ``apply_color_lut``) to RGB, then BT.601 luminance."""
    from pydicom.pixels import apply_color_lut

    out = np.empty(arr.shape, dtype=np.float32)
    step = _row_blocks(*arr.shape).step
    try:
        for top in range(0, arr.shape[0], step):
            rgb = np.asarray(apply_color_lut(arr[top : top + step], ds))
            out[top : top + step] = _luminance(rgb, float(np.iinfo(rgb.dtype).max))
    except (AttributeError, IndexError, KeyError, TypeError, ValueError) as exc:
        raise ImageDecodeError(f"invalid DICOM palette colour lookup table: {exc}", source_name=name) from exc
    return out


def _ensure_transfer_syntax(ds: Any) -> None:
    """Streams without file meta (no preamble) have no Transfer Syntax UID: use how pydicom read them."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if implicit is None or little is None:
        return
    explicit = ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    syntax = ImplicitVRLittleEndian if implicit else explicit
    if meta is None:
        meta = FileMetaDataset()
    meta.TransferSyntaxUID = syntax
    ds.file_meta = meta


def _dicom_first_frame(ds: Any, *, frames: int) -> np.ndarray:
    from pydicom.pixels import pixel_array  # decodes only the requested frame

    return np.asarray(pixel_array(ds, index=0 if frames > 1 else None))


def _dicom_grayscale(arr: np.ndarray, ds: Any, *, name: str | None) -> np.ndarray:
    """Modality LUT, then VOI LUT / window / min-max, to float32 [0, 1] (before any MONOCHROME1 inversion).

    Computed in float64 over blocks of rows, written to one float32 array.
    """
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    height, width = arr.shape[:2]
    blocks = [slice(top, top + _row_blocks(height, width).step) for top in _row_blocks(height, width)]

    def values(block: slice) -> np.ndarray:
        return np.asarray(apply_modality_lut(arr[block], ds), dtype=np.float64)

    out = np.empty((height, width), dtype=np.float32)
    voi_seq = ds.get("VOILUTSequence")
    if voi_seq:
        try:
            entries, first_mapped = int(voi_seq[0].LUTDescriptor[0]), int(voi_seq[0].LUTDescriptor[1])
            # The LUT's own output range (pydicom parses its data) is more trustworthy than the descriptor's
            # bit count, which is often wrong by 8 bits. 0 entries means 65536 (PS3.3 C.11.2.1.1).
            domain = np.arange(first_mapped, first_mapped + (entries or 65536), dtype=np.int64)
            lut_out = np.asarray(apply_voi_lut(domain, ds, index=0, prefer_lut=True), dtype=np.float64)
            lo, hi = float(lut_out.min()), float(lut_out.max())
            for block in blocks:
                # A LUT is indexed by integers: round the modality output (pydicom warns on float input).
                indices = np.rint(values(block)).astype(np.int64)
                mapped = np.asarray(apply_voi_lut(indices, ds, index=0, prefer_lut=True), dtype=np.float64)
                out[block] = (mapped - lo) / (hi - lo) if hi > lo else 0.0
        except (AttributeError, IndexError, TypeError, ValueError, KeyError) as exc:
            raise ImageDecodeError(f"invalid DICOM VOI LUT: {exc}", source_name=name) from exc
        log.debug("%s: VOI LUT applied (output range %g..%g)", name or "DICOM", lo, hi)
        return out

    center, width_ = _first_value(ds.get("WindowCenter")), _first_value(ds.get("WindowWidth"))
    if center is not None and width_ is not None and width_ > 0:
        function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
        try:
            for block in blocks:
                out[block] = window(values(block), center=center, width=width_, function=function)
        except ValueError as exc:
            raise ImageDecodeError(f"invalid DICOM window: {exc}", source_name=name) from exc
        return out

    lo, hi = np.inf, -np.inf
    for block in blocks:
        v = values(block)
        lo, hi = min(lo, float(v.min())), max(hi, float(v.max()))
    if not hi > lo:
        log.debug("%s: constant image after modality LUT; returning zeros", name or "DICOM")
        out.fill(0.0)
        return out
    for block in blocks:
        out[block] = (values(block) - lo) / (hi - lo)
    return out


def _first_value(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, list | tuple) or (hasattr(value, "__len__") and not isinstance(value, str)):
        if len(value) == 0:
            return None
        value = value[0]
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def window(values: np.ndarray, *, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """DICOM VOI windowing (PS3.3 C.11.2.1.2 and C.11.2.1.3.2) with output range [0, 1].

    LINEAR (width >= 1): ``0`` if ``x <= c - 0.5 - (w-1)/2``, ``1`` if ``x > c - 0.5 + (w-1)/2``,
    else ``((x - (c - 0.5)) / (w - 1) + 0.5)``.
    LINEAR_EXACT (width > 0): ``0`` if ``x <= c - w/2``, ``1`` if ``x > c + w/2``, else ``(x - c)/w + 0.5``.
    SIGMOID: ``1 / (1 + exp(-4 (x - c) / w))``.
    """
    x = np.asarray(values, dtype=np.float64)
    if function == "LINEAR":
        if width < 1:
            raise InputError(f"LINEAR window width must be >= 1, got {width}")
        if width == 1:
            return (x > center - 0.5).astype(np.float64)
        out = (x - (center - 0.5)) / (width - 1) + 0.5
        out = np.where(x <= center - 0.5 - (width - 1) / 2, 0.0, out)
        out = np.where(x > center - 0.5 + (width - 1) / 2, 1.0, out)
        return np.clip(out, 0.0, 1.0)
    if function == "LINEAR_EXACT":
        if width <= 0:
            raise InputError(f"LINEAR_EXACT window width must be > 0, got {width}")
        return np.clip((x - center) / width + 0.5, 0.0, 1.0)
    if function == "SIGMOID":
        if width <= 0:
            raise InputError(f"SIGMOID window width must be > 0, got {width}")
        return 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    raise InputError(f"unknown VOI LUT function {function!r}; valid options: LINEAR, LINEAR_EXACT, SIGMOID")
