"""The identity of a served model pair: its name, its architecture and its version digest.

:func:`version_digest` is one SHA-256 over everything that shapes an answer, read from the manifest alone
(pure: no file is opened): the hashes of every file the manifest lists (the checkpoints, ONNX graphs,
...), and the whole manifest as canonical JSON (architecture, class names, input size, normalisation,
head, the drift calibration and its thresholds). The service verifies the files against those hashes
before it serves a pair, so the digest names the bytes that answered. Two folders with identical
contents have the same digest whatever their names; changing a checkpoint, a threshold or any manifest
value changes it.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["DIGEST_SCHEME", "ModelIdentity", "canonical_manifest_json", "version_digest"]

DIGEST_SCHEME = "cxr-drift/version-digest/v1"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def canonical_manifest_json(manifest: Mapping[str, Any]) -> str:
    """The manifest as canonical JSON: sorted keys, no whitespace, ASCII, no NaN/inf."""
    return json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def version_digest(manifest: Mapping[str, Any]) -> str:
    """Hex SHA-256 over the scheme name, the manifest's file hashes and the canonical manifest JSON (without
    its seal: re-sealing, with or without a key, changes nothing that shapes an answer)."""
    files = manifest.get("files")
    hashes = {str(k): str(v) for k, v in files.items()} if isinstance(files, Mapping) else {}
    content = {k: v for k, v in manifest.items() if k != "seal"}
    document = {"scheme": DIGEST_SCHEME, "files": hashes, "manifest": content}
    return hashlib.sha256(canonical_manifest_json(document).encode("ascii")).hexdigest()


@dataclass(frozen=True)
class ModelIdentity:
    """What every audit row records of the pair that answered: ``name`` (its folder's name, the key it is
    served under), ``architecture`` (from the manifest) and ``digest`` (:func:`version_digest`)."""

    name: str
    architecture: str
    digest: str

    @staticmethod
    def check_name(name: str) -> str:
        """``name`` if it can serve as a model name (letters, digits, ``. _ -``, at most 64), else ValueError."""
        if not _NAME.match(name):
            raise ValueError(
                f"model name {name!r}: a model pair's folder name must be 1-64 characters among letters, "
                "digits, '.', '_' and '-', starting with a letter or digit"
            )
        return name
