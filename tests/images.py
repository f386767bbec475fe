"""Image files the tests write: DICOM through pydicom and a small labelled ImageFolder tree of PNGs."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

__all__ = ["dicom_bytes", "dicom_from_gray", "write_image_folder"]


def dicom_bytes(
    pixels: np.ndarray | None,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 16,
    signed: bool = False,
    preamble: bool = True,
    frames: int = 1,
    **attrs: Any,
) -> bytes:
    """A DICOM file written by pydicom. ``pixels`` is (H, W) or (frames, H, W); None writes no PixelData."""
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "DX"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    if pixels is not None:
        ds.Rows, ds.Columns = pixels.shape[-2:]
        if frames > 1:
            ds.NumberOfFrames = frames
        ds.PixelData = pixels.astype(np.int16 if signed else np.uint16).tobytes()
    else:
        ds.Rows, ds.Columns = 4, 4
    for key, value in attrs.items():
        setattr(ds, key, value)
    buf = io.BytesIO()
    if preamble:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        ds.save_as(buf, enforce_file_format=True)
    else:
        pydicom.dcmwrite(buf, ds, implicit_vr=True, little_endian=True, enforce_file_format=False)
    return buf.getvalue()


def dicom_from_gray(gray: np.ndarray | None) -> bytes:
    """A 12-bit MONOCHROME2 Part-10 DICOM of a [0, 1] image; ``None`` writes one without pixel data."""
    pixels = None if gray is None else (gray * 4095).round()
    return dicom_bytes(pixels, bits_stored=12, PatientID="ANON")


def write_image_folder(
    root: Path, *, classes: int = 5, per_class: int = 8, size: int = 64, seed: int = 0
) -> Path:
    """``root/class<c>/<i>.png``: noisy gray images, each class with a bright patch at its own place."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.normal(0.3, 0.05, (size, size))
            r, col = divmod(c, 3)
            s = size // 8
            img[s + r * 3 * s : 3 * s + r * 3 * s, s + col * 2 * s : 3 * s + col * 2 * s] += 0.6
            Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(folder / f"{i}.png")
    return root
