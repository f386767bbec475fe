"""The artifact manifest (docs/CONTRACTS.md): reading, checking, hashing, sealing and writing ``manifest.json``.

Training writes it with :func:`write_manifest` and hashes files with :func:`sha256_file`; the service and the
study read it with :func:`read_manifest` and check it with :func:`verify_manifest` (its seal, then every
file's hash), the very same functions, so what is verified is what was written.

**The seal.** :func:`write_manifest` adds ``"seal"``: the SHA-256 of the canonical JSON of every other key
(sorted keys, no whitespace, ASCII escapes), and with a key (``CXR_DRIFT_MANIFEST_KEY``) an HMAC-SHA256 of the same
bytes. The file hashes are part of that content, so the seal binds the class names, preprocessing and
calibration to the exact weight files. A plain digest catches accidental and careless edits (a swapped class
name, a hand-edited calibration); someone who can write the folder can recompute it, so only the HMAC, with
the key kept away from the artifact folder, stops a deliberate edit. With a key configured, a manifest
sealed without it (or with another key) is refused.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import unicodedata
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from core.errors import ArtifactError

__all__ = [
    "MANIFEST_FILE",
    "MANIFEST_KEY_ENV",
    "MANIFEST_SCHEMA_VERSION",
    "SEAL_KEY",
    "ArtifactError",
    "UnsealedManifest",
    "check_class_names",
    "manifest_key_from_env",
    "read_manifest",
    "reseal",
    "seal_manifest",
    "sha256_file",
    "verify_files",
    "verify_manifest",
    "verify_seal",
    "write_manifest",
]

MANIFEST_FILE = "manifest.json"
MANIFEST_SCHEMA_VERSION = 1
_REQUIRED_KEYS = ("schema_version", "architecture", "class_names", "input_size", "mean", "std", "checkpoints")
SEAL_KEY = "seal"
# The environment variable holding the optional manifest HMAC key (the service reads it as a setting too).
MANIFEST_KEY_ENV = "CXR_DRIFT_MANIFEST_KEY"
_SEAL_ALGORITHM = (
    "sha256 over canonical JSON (sort_keys, separators=(',', ':'), ASCII) of all keys but 'seal'"
)
CLASS_NAME_MAX = 64
_RESEAL_HINT = "check the manifest's content, then re-seal it with `cxr-drift seal --model-dir {folder}`"


class UnsealedManifest(ArtifactError):
    """The manifest carries no seal (written before manifests were sealed, or the seal was removed)."""


def manifest_key_from_env() -> bytes | None:
    """The manifest HMAC key from ``CXR_DRIFT_MANIFEST_KEY`` (UTF-8 bytes), or None when unset or empty."""
    value = os.environ.get(MANIFEST_KEY_ENV, "")
    return value.encode("utf-8") if value else None


def check_class_names(names: object, *, where: str = "class_names") -> list[str]:
    """Class names as the service may show and export them: a list of unique strings of 1-64 characters that
    start with a letter or digit and hold no control characters (so never a spreadsheet formula such as
    ``=cmd|...``, ``+``, ``-`` or ``@``). Raises :class:`ArtifactError` naming the first bad one."""
    if not isinstance(names, list) or not names:
        raise ArtifactError(f"{where} must be a non-empty list of strings")
    for name in names:
        if (
            not isinstance(name, str)
            or not 1 <= len(name) <= CLASS_NAME_MAX
            or not name[0].isalnum()
            or any(unicodedata.category(ch).startswith("C") for ch in name)
        ):
            raise ArtifactError(
                f"{where}: invalid class name {name!r}: expected 1-{CLASS_NAME_MAX} characters starting with "
                "a letter or digit, without control characters"
            )
    if len(set(names)) != len(names):
        raise ArtifactError(f"{where}: class names must be unique, got {names}")
    return list(names)


def _canonical(manifest: Mapping[str, Any]) -> bytes:
    content = {k: v for k, v in manifest.items() if k != SEAL_KEY}
    return json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def seal_manifest(manifest: Mapping[str, Any], *, key: bytes | None = None) -> dict[str, Any]:
    """``manifest`` with a fresh ``seal`` over all its other keys (an HMAC too when ``key`` is given)."""
    body = _canonical(manifest)
    seal: dict[str, str] = {"algorithm": _SEAL_ALGORITHM, "sha256": hashlib.sha256(body).hexdigest()}
    if key:
        seal["hmac_sha256"] = hmac.new(key, body, hashlib.sha256).hexdigest()
    return {**{k: v for k, v in manifest.items() if k != SEAL_KEY}, SEAL_KEY: seal}


def verify_seal(folder: Path, manifest: Mapping[str, Any], *, key: bytes | None = None) -> None:
    """Check the manifest's seal: its SHA-256, and its HMAC when ``key`` is given (then required).

    Raises :class:`UnsealedManifest` when there is no seal and :class:`ArtifactError` when it does not match,
    each saying how to re-seal after checking the content.
    """
    path = Path(folder) / MANIFEST_FILE
    hint = _RESEAL_HINT.format(folder=folder)
    seal = manifest.get(SEAL_KEY)
    if seal is None:
        raise UnsealedManifest(
            f"{path} is not sealed (written before manifests were sealed, or the seal was removed), so its "
            f"class names and settings cannot be trusted; {hint}"
        )
    if not isinstance(seal, Mapping) or not isinstance(seal.get("sha256"), str):
        raise ArtifactError(f"{path}: the seal is malformed (expected an object with 'sha256'); {hint}")
    body = _canonical(manifest)
    if not hmac.compare_digest(hashlib.sha256(body).hexdigest(), str(seal["sha256"])):
        raise ArtifactError(
            f"{path} was edited after it was sealed (its content no longer matches the seal's sha256): "
            f"class names, preprocessing, calibration or file hashes may have changed; {hint}"
        )
    if key:
        mac = seal.get("hmac_sha256")
        if not isinstance(mac, str):
            raise ArtifactError(
                f"{path} is sealed without a key, but {MANIFEST_KEY_ENV} is set: re-seal it with the key "
                f"({hint})"
            )
        if not hmac.compare_digest(hmac.new(key, body, hashlib.sha256).hexdigest(), mac):
            raise ArtifactError(
                f"{path}: the seal's HMAC does not match (edited and re-digested without the key, or sealed "
                f"with another key); {hint}"
            )


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
    check_class_names(manifest["class_names"], where=f"{path}: class_names")
    return manifest


def verify_manifest(folder: Path, manifest: Mapping[str, Any], *, key: bytes | None = None) -> None:
    """:func:`verify_seal`, then :func:`verify_files`: the manifest is as exported and so is every file."""
    verify_seal(folder, manifest, key=key)
    verify_files(folder, manifest)


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


def write_manifest(out_dir: Path, manifest: Mapping[str, Any], *, key: bytes | None = None) -> Path:
    """Seal (:func:`seal_manifest`) and write ``manifest.json`` atomically (readers never see a half-written
    file)."""
    path = Path(out_dir) / MANIFEST_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(seal_manifest(manifest, key=key), indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
    return path


def reseal(folder: Path, *, key: bytes | None = None) -> str:
    """Seal ``folder``'s manifest as it is now, after checking it (required keys, class names) and every
    file against its hash: the seal vouches for the content an operator has reviewed, never for weights
    that differ from the hash list. Returns what the old seal said ("ok", or why it failed)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    verify_files(folder, manifest)
    try:
        verify_seal(folder, manifest, key=key)
        before = "ok"
    except ArtifactError as exc:
        before = str(exc).split(";")[0]
    write_manifest(folder, manifest, key=key)
    return before
