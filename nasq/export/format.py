"""The ``model.nasq`` artifact format shared by its writer and reader: file names, version, run-length codes,
checksums (see ``docs/ARTIFACT_FORMAT.md``)."""

from __future__ import annotations

import hashlib
import json

__all__ = ["FORMAT", "LAYOUT", "MANIFEST", "TENSORS", "VERSION", "manifest_digest", "rle", "sha256", "unrle"]

FORMAT = "nasq-artifact"
VERSION = 1
TENSORS = "tensors.safetensors"
LAYOUT = "layout.json"
MANIFEST = "manifest.json"


def rle(values) -> list[list[int]]:
    """Run-length encode: ``[1, 1, 4] -> [[1, 2], [4, 1]]``."""
    out: list[list[int]] = []
    for v in values:
        v = int(v)
        if out and out[-1][0] == v:
            out[-1][1] += 1
        else:
            out.append([v, 1])
    return out


def unrle(runs) -> list[int]:
    """Inverse of :func:`rle`."""
    return [int(v) for v, n in runs for _ in range(int(n))]


def sha256(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON without its own ``manifest_sha256`` entry."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
