"""Every file nasq reads or writes: bounded, verified reads; atomic writes; the no-clobber rule.

Reading (files may come from someone else: treat each as untrusted). :func:`read_bytes` checks, *before*
reading, that the path is a regular file, that it does not lead out of ``root`` (a symlink to a file elsewhere is
refused) and that its size is at most ``max_bytes`` (and equal to a declared size when one is given); it never
reads more than that. :func:`read_text`, :func:`read_json` and :func:`read_yaml` add strict UTF-8, a nesting bound,
no NaN / Infinity in JSON, and the expected top-level type. Every failure is a ``NasqError`` naming the file.

Writing. Every file nasq writes goes through :func:`write_atomic` (a temp file in the same directory, fsync,
``os.replace``; the user's normal permissions), so a crash or a full disk never leaves a half-written file.
:func:`check_output_path` refuses to replace an existing output unless the user passed ``--overwrite``, and
:func:`replace_dir` replaces a directory only when nasq made it (:func:`nasq_made`), after the new content is
complete.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from nasq.errors import NasqError

__all__ = [
    "MARKER",
    "MAX_METADATA_BYTES",
    "check_output_path",
    "finite_number",
    "git_rev",
    "mark_nasq_made",
    "nasq_made",
    "parse_json",
    "read_bytes",
    "read_json",
    "read_text",
    "read_yaml",
    "replace_dir",
    "write_atomic",
]

MAX_METADATA_BYTES = 256 * 2**20  # JSON / YAML metadata (a per-row plan of a 250k-row vocabulary is ~10 MB)
MAX_NESTING = 64  # JSON / YAML nesting depth; nasq's own files nest at most 4 deep
MAX_YAML_NODES = 10**6  # configs and search spaces have hundreds; aliases could make billions
MARKER = ".nasq"  # written into every directory nasq creates: --overwrite replaces only those


# ------------------------------------------------------------------------------------------------- reading
def _inside(path: Path, root: str | Path | None) -> None:
    if root is None:
        return
    root_r = Path(root).resolve()
    if path.is_symlink() or not path.resolve().is_relative_to(root_r):
        raise NasqError(f"{path}: a link leading outside {root}; nasq reads only the files inside it (copy the "
                        "file in instead of linking it)")


def read_bytes(path: str | Path, *, what: str, max_bytes: int, root: str | Path | None = None,
               size: int | None = None) -> bytes:
    """The bytes of the regular file ``path`` (``what`` names it in errors), checked before reading: inside
    ``root`` when given, at most ``max_bytes`` long, exactly ``size`` bytes when given."""
    path = Path(path)
    _inside(path, root)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise NasqError(f"{what} {path} not found") from None
    except OSError as e:
        raise NasqError(f"cannot read {what} {path}: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise NasqError(f"{what} {path} is not a regular file")
    if size is not None and st.st_size != size:
        raise NasqError(f"{what} {path} has {st.st_size:,} bytes, but {size:,} were declared (truncated or "
                        "replaced?)")
    if st.st_size > max_bytes:
        raise NasqError(f"{what} {path} has {st.st_size:,} bytes, more than the {max_bytes:,} nasq reads for it")
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise NasqError(f"cannot read {what} {path}: {e.strerror or e}") from None
    if len(data) > max_bytes or (size is not None and len(data) != size):
        raise NasqError(f"{what} {path} changed while it was read")
    return data


def read_text(path: str | Path, *, what: str, max_bytes: int = MAX_METADATA_BYTES,
              root: str | Path | None = None) -> str:
    """:func:`read_bytes` decoded as strict UTF-8 (a BOM is dropped)."""
    data = read_bytes(path, what=what, max_bytes=max_bytes, root=root)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise NasqError(f"{what} {path} is not valid UTF-8 ({e})") from None


def _depth(x: Any, limit: int, max_nodes: int | None = None) -> int:
    """Nesting depth of lists / dicts, stopping once past ``limit`` (or, with ``max_nodes``, past that many
    elements: YAML aliases can make a small file a huge tree)."""
    stack, deepest, seen = [(x, 1)], 0, 0
    while stack:
        node, d = stack.pop()
        seen += 1
        if max_nodes is not None and seen > max_nodes:
            return limit + 1
        if isinstance(node, dict | list):
            deepest = max(deepest, d)
            if deepest > limit:
                return deepest
            stack.extend((v, d + 1) for v in (node.values() if isinstance(node, dict) else node))
    return deepest


def _no_constant(name: str):
    raise ValueError(f"{name} is not allowed (numbers must be finite)")


def finite_number(v: Any) -> float | None:
    """``v`` as a float if a parsed file holds a finite real number there (an int or float, not a bool, within
    float range), else ``None``: the first check of every number nasq reads from a plan or result file."""
    if not isinstance(v, int | float) or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except OverflowError:  # an integer beyond float range
        return None
    return f if math.isfinite(f) else None


def _typed(data: Any, expect: type | tuple | None, source: str, max_nodes: int | None = None) -> Any:
    if expect is not None and not isinstance(data, expect):
        want = " or ".join(t.__name__ for t in (expect if isinstance(expect, tuple) else (expect,)))
        want = {"dict": "a mapping (JSON object)", "list": "a list"}.get(want, want)
        raise NasqError(f"{source}: the top level must be {want}, got {type(data).__name__}")
    if _depth(data, MAX_NESTING, max_nodes) > MAX_NESTING:
        raise NasqError(f"{source}: nested more than {MAX_NESTING} levels deep or more than {max_nodes:,} "
                        "elements" if max_nodes else f"{source}: nested more than {MAX_NESTING} levels deep")
    return data


def parse_json(data: str | bytes, source: str, expect: type | tuple | None = dict) -> Any:
    """``json.loads`` with clean errors: invalid JSON or UTF-8, NaN / Infinity, too deep, wrong top-level type."""
    try:
        out = json.loads(data, parse_constant=_no_constant)
    except RecursionError:
        raise NasqError(f"{source}: nested too deeply to parse") from None
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise NasqError(f"{source} is not valid JSON ({e})") from None
    return _typed(out, expect, source)


def read_json(path: str | Path, *, what: str, max_bytes: int = MAX_METADATA_BYTES, root: str | Path | None = None,
              expect: type | tuple | None = dict) -> Any:
    """A bounded, verified JSON file (see :func:`read_bytes`, :func:`parse_json`)."""
    return parse_json(read_text(path, what=what, max_bytes=max_bytes, root=root), f"{what} {path}", expect)


def read_yaml(path: str | Path, *, what: str, max_bytes: int = MAX_METADATA_BYTES,
              expect: type | tuple | None = dict) -> Any:
    """A bounded YAML file read with ``yaml.safe_load`` (an empty file is ``{}``)."""
    text = read_text(path, what=what, max_bytes=max_bytes)
    try:
        data = yaml.safe_load(text)
    except RecursionError:
        raise NasqError(f"{what} {path}: nested too deeply to parse") from None
    except yaml.YAMLError as e:
        raise NasqError(f"{what} {path}: not valid YAML (invalid YAML syntax: {e})") from None
    return _typed({} if data is None and expect is dict else data, expect, f"{what} {path}", MAX_YAML_NODES)


def load_safetensors(data: bytes, source: str | Path, *, finite: bool = True) -> dict[str, Any]:
    """Arrays of a safetensors blob (no pickle); an unreadable blob or (``finite``) a NaN / infinity in a float
    array is a ``NasqError`` naming ``source`` and the tensor."""
    import numpy as np
    from safetensors.numpy import load

    try:
        arrays = load(data)
    except Exception as e:  # noqa: BLE001 - safetensors raises several types on a malformed header
        raise NasqError(f"{source}: unreadable safetensors ({type(e).__name__}: {e})") from None
    if finite:
        for name, a in arrays.items():
            if a.dtype.kind == "f" and not np.isfinite(a).all():
                raise NasqError(f"{source}: tensor {name} has non-finite values (NaN or infinity)")
    return arrays


# ------------------------------------------------------------------------------------------------- writing
def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(path: str | Path, data: bytes | str) -> None:
    """Write a file via a temp file in the same directory + `os.replace` (never a half-written file), with the
    permissions a plain ``open(path, "w")`` would give (``0o666`` less the umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def nasq_made(path: str | Path) -> bool:
    """True for a directory nasq created: it holds the :data:`MARKER` file, or (made before markers existed) a
    run directory's ``run.json`` with a ``kind`` (its own or a pipeline stage's) or an artifact's
    ``manifest.json`` of format ``nasq-artifact``."""
    path = Path(path)
    if not path.is_dir() or path.is_symlink():
        return False
    if (path / MARKER).is_file():
        return True
    runs = [f"{d}run.json" for d in ("", "teacher/", "search/", "qat/")]  # a run, or a pipeline's output
    for name, key, ok in [*((r, "kind", ("finetune", "qat", "search")) for r in runs),
                          ("manifest.json", "format", ("nasq-artifact",))]:
        try:
            if read_json(path / name, what=name, max_bytes=2**20).get(key) in ok:
                return True
        except NasqError:
            continue
    return False


def mark_nasq_made(path: str | Path, kind: str) -> None:
    """Write the :data:`MARKER` into directory ``path``: ``--overwrite`` may replace it later."""
    write_atomic(Path(path) / MARKER, json.dumps({"made_by": "nasq", "kind": kind}) + "\n")


def check_output_path(path: str | Path, overwrite: bool) -> Path:
    """Refuse to clobber an existing file or non-empty directory unless `overwrite`; even with `overwrite`, a
    non-empty directory is only replaced when nasq made it (:func:`nasq_made`)."""
    path = Path(path)
    if not path.exists():
        return path
    nonempty = path.is_file() or path.is_symlink() or any(path.iterdir())
    if nonempty and not overwrite:
        raise NasqError(f"{path} already exists; pass --overwrite to replace it (or --resume to continue a run).")
    if nonempty and path.is_dir() and not path.is_symlink() and not nasq_made(path):
        raise NasqError(f"{path} is a directory nasq did not create; --overwrite only replaces nasq's own outputs. "
                        "Choose another --out (or remove it yourself if you are sure).")
    return path


def replace_dir(out: str | Path, build: Callable[[Path], None], *, kind: str | None, overwrite: bool) -> Path:
    """Create directory ``out`` by ``build(tmp)`` into a temp directory beside it, then move it into place:
    an existing ``out`` (which :func:`check_output_path` allowed) is removed only after the new one is
    complete, and a failing ``build`` leaves ``out`` as it was. ``kind`` is written to the :data:`MARKER`
    (None: no marker, for outputs :func:`nasq_made` recognises by their own content)."""
    out = Path(out)
    check_output_path(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        build(tmp)
        if kind is not None:
            mark_nasq_made(tmp, kind)
        if out.exists() or out.is_symlink():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old"))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


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
