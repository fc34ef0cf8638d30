"""Files a user owns: atomic writes, the no-clobber rule, and the checkout's git revision.

Every file nasq writes goes through :func:`write_atomic` (a temp file in the same directory, fsync,
``os.replace``), so a crash or a full disk never leaves a half-written file; :func:`check_output_path` refuses to
replace an existing output unless the user passed ``--overwrite``.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

from nasq.errors import NasqError

__all__ = ["check_output_path", "git_rev", "write_atomic"]


def write_atomic(path: str | Path, data: bytes | str) -> None:
    """Write a file via a temp file in the same directory + `os.replace` (never a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_output_path(path: str | Path, overwrite: bool) -> Path:
    """Refuse to clobber an existing file or non-empty directory unless `overwrite`."""
    path = Path(path)
    if path.exists() and not overwrite and (path.is_file() or any(path.iterdir())):
        raise NasqError(f"{path} already exists; pass --overwrite to replace it (or --resume to continue a run).")
    return path


def git_rev(cwd: str | Path | None = None, *, describe: bool = False) -> str | None:
    """``git rev-parse HEAD`` of the nasq checkout (or of ``cwd``); None outside a git checkout.

    ``describe``: ``git describe --always --dirty --abbrev=12`` instead (short, marks uncommitted changes)."""
    if cwd is None:
        cwd = Path(__file__).resolve().parent
    cmd = ["git", "describe", "--always", "--dirty", "--abbrev=12"] if describe else ["git", "rev-parse", "HEAD"]
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    rev = out.stdout.strip()
    return rev if out.returncode == 0 and rev else None
