"""``cxr-drift seal --model-dir DIR [--check]``: check a model pair's manifest seal, or (re-)seal it.

Sealing is for a manifest written before manifests were sealed, or one an operator has edited on purpose
and reviewed: the command checks the required keys, the class names and every file's hash first, prints
what it seals, and writes the seal (an HMAC too when ``CXR_DRIFT_MANIFEST_KEY`` is set). ``--check`` only
verifies (exit 1 with the reason when the seal or a file does not match).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from core.manifest import manifest_key_from_env, read_manifest, reseal, verify_manifest

__all__ = ["configure_parser", "run"]


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model-dir", required=True, type=Path, help="model-pair folder (manifest.json, ONNX files)"
    )
    p.add_argument("--check", action="store_true", help="do not write; verify the seal and the file hashes")


def run(args: argparse.Namespace) -> int:
    folder: Path = args.model_dir
    key = manifest_key_from_env()
    if args.check:
        verify_manifest(folder, read_manifest(folder), key=key)  # an ArtifactError is the exit-1 message
        print(f"{folder / 'manifest.json'}: seal and file hashes ok{' (HMAC checked)' if key else ''}")
        return 0
    before = reseal(folder, key=key)
    manifest = read_manifest(folder)
    print(
        f"sealed {folder / 'manifest.json'} ({'HMAC-SHA256 with CXR_DRIFT_MANIFEST_KEY' if key else 'SHA-256, no key'}); "
        f"previous seal: {before}"
    )
    print(f"  architecture {manifest['architecture']}, input size {manifest['input_size']}")
    print(f"  class names (in output order): {', '.join(manifest['class_names'])}")
    calibrated = "yes" if manifest.get("drift_calibration") else "no"
    print(f"  files: {', '.join(sorted(manifest['files']))}; drift calibration: {calibrated}")
    return 0
