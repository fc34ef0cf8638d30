"""The ``model.nasq`` artifact format shared by its writer and reader: file names, version, run-length codes,
checksums (see ``docs/ARTIFACT_FORMAT.md``)."""

from __future__ import annotations

import hashlib
import json

__all__ = ["CARD", "FORMAT", "LAYOUT", "MANIFEST", "READABLE_VERSIONS", "TENSORS", "VERSION", "manifest_digest", "rle",
           "sha256", "unrle"]

FORMAT = "nasq-artifact"
# 2: every width b in 1..8 packed densely (b bits per code, ``nasq.quant.packing``). 1: 3-bit codes in 4-bit and
# 5..7-bit codes in 8-bit containers; 0/1/2/4/8-bit rows are laid out identically in both, so a version-1
# artifact is readable when it has no rows at 3, 5, 6 or 7 bits (``packing.V1_REPACKED_WIDTHS``).
VERSION = 2
READABLE_VERSIONS = (1, 2)
TENSORS = "tensors.safetensors"
LAYOUT = "layout.json"
MANIFEST = "manifest.json"
CARD = "README.md"  # the model card (nasq.export.card); listed and checksummed like every other file


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
