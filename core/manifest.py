"""The artifact manifest (docs/CONTRACTS.md): reading, checking, hashing and writing ``manifest.json``.

Training writes it with :func:`write_manifest` and hashes files with :func:`sha256_file`; the service and the
study read it with :func:`read_manifest` and check the files with :func:`verify_files`, the very same
functions, so what is verified is what was written.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from core.errors import ArtifactError

__all__ = [
    "MANIFEST_FILE",
    "MANIFEST_SCHEMA_VERSION",
    "ArtifactError",
    "read_manifest",
    "sha256_file",
    "verify_files",
    "write_manifest",
]

MANIFEST_FILE = "manifest.json"
MANIFEST_SCHEMA_VERSION = 1
_REQUIRED_KEYS = ("schema_version", "architecture", "class_names", "input_size", "mean", "std", "checkpoints")


def sha256_file(path: Path, *, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in ``chunk``-byte blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(folder: Path) -> dict[str, Any]:
    """``folder/manifest.json``, checked for the keys and schema version the service needs."""
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    if not folder.is_dir():
        raise ArtifactError(f"model folder {str(folder)!r} does not exist or is not a folder")
    if not path.is_file():
        raise ArtifactError(f"{path} is missing; expected a model-pair folder written by training.export")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path} must hold a JSON object, got {type(manifest).__name__}")
    missing = [k for k in _REQUIRED_KEYS if k not in manifest]
    if missing:
        raise ArtifactError(f"{path} lacks required keys: {', '.join(missing)}")
    if manifest["schema_version"] != MANIFEST_SCHEMA_VERSION:
        raise ArtifactError(
            f"{path}: schema_version {manifest['schema_version']!r} is not supported "
            f"(expected {MANIFEST_SCHEMA_VERSION})"
        )
    return manifest


def verify_files(folder: Path, manifest: Mapping[str, Any]) -> None:
    """Check every file in ``manifest["files"]`` against its SHA-256; raise :class:`ArtifactError` naming it."""
    folder = Path(folder)
    files = manifest.get("files")
    if not isinstance(files, Mapping) or not files:
        raise ArtifactError(f"{folder / MANIFEST_FILE} has no 'files' hash list to verify")
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            raise ArtifactError(f"{name} is listed in the manifest but missing from {folder}")
        actual = sha256_file(path)
        if actual != expected:
            raise ArtifactError(
                f"{name} does not match its manifest hash (expected sha256 {expected}, got {actual}); "
                "the file was altered or the manifest belongs to another export"
            )


def write_manifest(out_dir: Path, manifest: Mapping[str, Any]) -> Path:
    """Write ``manifest.json`` atomically (readers never see a half-written file)."""
    path = Path(out_dir) / MANIFEST_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
    return path
