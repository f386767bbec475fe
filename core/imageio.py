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

``max_pixels`` guards against decompression bombs: the declared size (PIL's lazy header parse; DICOM
Rows x Columns) is checked before any pixel is decoded. Without it PIL's own limit still applies.

This module does not import torch.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from core.errors import InputError

log = logging.getLogger(__name__)

__all__ = [
    "SUPPORTED_FORMATS",
    "ImageDecodeError",
    "ImageInfo",
    "ImageSource",
    "ImageTooLargeError",
    "NoPixelDataError",
    "UnsupportedFormatError",
    "read_image",
    "read_image_with_info",
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


class ImageDecodeError(InputError):
    """An image could not be decoded. ``source_name`` is the file (or ``None`` for bytes), ``reason`` why."""

    default_code = "undecodable_image"

    def __init__(self, reason: str, *, source_name: str | None = None, details: Any = None) -> None:
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


def read_image(source: ImageSource, *, max_pixels: int | None = None) -> np.ndarray:
    """Decode ``source`` (a path or the encoded bytes) to float32 (H, W) grayscale in [0, 1].

    Raises :class:`ImageDecodeError` (a ``ValueError``) or one of its subclasses
    :class:`UnsupportedFormatError`, :class:`ImageTooLargeError`, :class:`NoPixelDataError`;
    ``FileNotFoundError`` for a missing path.
    """
    pixels, _ = read_image_with_info(source, max_pixels=max_pixels)
    return pixels


def read_image_with_info(
    source: ImageSource, *, max_pixels: int | None = None
) -> tuple[np.ndarray, ImageInfo]:
    """As :func:`read_image`, and also what was decoded (:class:`ImageInfo`)."""
    if max_pixels is not None and max_pixels <= 0:
        raise ValueError(f"max_pixels must be a positive number of pixels or None, got {max_pixels}")
    data, name = _load_bytes(source)
    fmt = sniff_format(data)
    if fmt is None:
        raise UnsupportedFormatError(
            f"not a recognised image format (leading bytes {bytes(data[:8])!r}); "
            f"valid formats: {', '.join(SUPPORTED_FORMATS)}",
            source_name=name,
        )
    if fmt == "dicom":
        pixels, info = _decode_dicom(data, name=name, max_pixels=max_pixels)
    else:
        pixels, info = _decode_pil(data, fmt=fmt, name=name, max_pixels=max_pixels)
    if pixels.ndim != 2 or pixels.size == 0:
        raise ImageDecodeError(
            f"decoded to an array of shape {pixels.shape}, expected (H, W)", source_name=name
        )
    if not np.all(np.isfinite(pixels)):
        raise ImageDecodeError("decoded pixels contain NaN or infinity", source_name=name)
    pixels = np.clip(pixels, 0.0, 1.0).astype(np.float32, copy=False)
    return np.ascontiguousarray(pixels), info


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


def _check_size(width: int, height: int, *, max_pixels: int | None, name: str | None) -> None:
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"declared size {width}x{height} is empty", source_name=name)
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLargeError(
            f"declared size {width}x{height} = {width * height} pixels exceeds the limit of "
            f"{max_pixels} pixels",
            source_name=name,
            details={"max_pixels": max_pixels},
        )


# ------------------------------------------------------------------------------------------------ PNG, JPEG


def _decode_pil(
    data: bytes, *, fmt: str, name: str | None, max_pixels: int | None
) -> tuple[np.ndarray, ImageInfo]:
    pil_format = {"png": "PNG", "jpeg": "JPEG"}[fmt]
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
        _check_size(width, height, max_pixels=max_pixels, name=name)
        frames = int(getattr(img, "n_frames", 1))
        if frames > 1:
            log.debug("%s has %d frames; reading the first", name or "image", frames)
        bit_depth = _png_bit_depth(data) if fmt == "png" else 8
        mode = img.mode
        try:
            img.load()
            if fmt == "jpeg":
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


def _png_bit_depth(data: bytes) -> int:
    # IHDR is the first chunk: 8 magic + 4 length + 4 type + 4 width + 4 height, then the depth byte.
    return int(data[24]) if len(data) > 24 and data[12:16] == b"IHDR" else 8


def _pil_to_gray(img: Image.Image, *, bit_depth: int) -> np.ndarray:
    mode = img.mode
    if mode in ("P", "PA", "1", "CMYK", "YCbCr", "LAB", "HSV"):
        img = img.convert("RGBA" if mode == "PA" or "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("L", "LA", "La"):
        arr = np.asarray(img, dtype=np.float64)
        gray = arr[..., 0] if arr.ndim == 3 else arr
        return gray / 255.0
    if mode in ("RGB", "RGBA", "RGBa", "RGBX"):
        arr = np.asarray(img, dtype=np.float64)[..., :3]
        return (arr @ _BT601) / 255.0
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(img).astype(np.float64)
        depth = bit_depth if bit_depth > 8 else 16
        return arr / float(2**depth - 1)
    raise UnsupportedFormatError(
        f"unsupported pixel mode {mode!r}; supported: grayscale (L, I;16), RGB, RGBA, palette"
    )


# ------------------------------------------------------------------------------------------------ DICOM


def _decode_dicom(data: bytes, *, name: str | None, max_pixels: int | None) -> tuple[np.ndarray, ImageInfo]:
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
    _check_size(columns, rows, max_pixels=max_pixels, name=name)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    bits_stored = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)) or 16)

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

    if samples == 3 or arr.ndim == 3:
        # Colour (e.g. secondary capture); pydicom already converted YBR to RGB.
        rgb = np.asarray(arr, dtype=np.float64)[..., :3]
        gray = (rgb @ _BT601) / float(2**bits_stored - 1)
    elif photometric in ("MONOCHROME1", "MONOCHROME2"):
        gray = _dicom_grayscale(arr, ds, name=name)
        if photometric == "MONOCHROME1":
            gray = 1.0 - gray
    else:
        raise UnsupportedFormatError(
            f"unsupported DICOM photometric interpretation {photometric!r}; "
            "supported: MONOCHROME1, MONOCHROME2, RGB, YBR_*",
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
    """Modality LUT, then VOI LUT / window / min-max, to [0, 1] (before any MONOCHROME1 inversion)."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    values = np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)

    voi_seq = ds.get("VOILUTSequence")
    if voi_seq:
        try:
            entries, first_mapped = int(voi_seq[0].LUTDescriptor[0]), int(voi_seq[0].LUTDescriptor[1])
            # A LUT is indexed by integers: round the modality output (pydicom warns on float input).
            indices = np.rint(values).astype(np.int64)
            out = np.asarray(apply_voi_lut(indices, ds, index=0, prefer_lut=True), dtype=np.float64)
            # The LUT's own output range (pydicom parses its data) is more trustworthy than the descriptor's
            # bit count, which is often wrong by 8 bits. 0 entries means 65536 (PS3.3 C.11.2.1.1).
            domain = np.arange(first_mapped, first_mapped + (entries or 65536), dtype=np.int64)
            lut_out = np.asarray(apply_voi_lut(domain, ds, index=0, prefer_lut=True), dtype=np.float64)
        except (AttributeError, IndexError, TypeError, ValueError, KeyError) as exc:
            raise ImageDecodeError(f"invalid DICOM VOI LUT: {exc}", source_name=name) from exc
        lo, hi = float(lut_out.min()), float(lut_out.max())
        log.debug("%s: VOI LUT applied (output range %g..%g)", name or "DICOM", lo, hi)
        return (out - lo) / (hi - lo) if hi > lo else np.zeros_like(out)

    center, width = _first_value(ds.get("WindowCenter")), _first_value(ds.get("WindowWidth"))
    if center is not None and width is not None and width > 0:
        function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
        try:
            return window(values, center=center, width=width, function=function)
        except ValueError as exc:
            raise ImageDecodeError(f"invalid DICOM window: {exc}", source_name=name) from exc

    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        log.debug("%s: constant image after modality LUT; returning zeros", name or "DICOM")
        return np.zeros_like(values)
    return (values - lo) / (hi - lo)


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
