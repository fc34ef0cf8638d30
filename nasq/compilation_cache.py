"""XLA's persistent compilation cache for the ``nasq`` command: a program compiled once is loaded from disk later.

Every ``nasq`` process compiles its step functions afresh, once per sequence bucket: on the 2-core VM of
``experiments/`` the MiniLM supernet's weight and gate steps took minutes to compile, a good part of a short
search, and a resumed run, another seed of the same search space or the next grid cell compiled the same
programs again. JAX can keep compiled executables on disk, keyed by the program, the compile options, the
backend and the JAX version (any change is a miss, never a wrong hit); :func:`enable_compilation_cache` turns it
on for the command line::

    directory   $NASQ_COMPILATION_CACHE, else $XDG_CACHE_HOME/nasq/jax (default ~/.cache/nasq/jax)
    size        at most MAX_BYTES on disk; JAX evicts the least recently used entries
    entries     only programs that took at least 1 s to compile (JAX's default)

``NASQ_COMPILATION_CACHE=0`` turns it off; a ``JAX_COMPILATION_CACHE_DIR`` the user set is left to JAX. The
Python API leaves JAX's configuration to its caller: call :func:`enable_compilation_cache` to opt in.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "NASQ_COMPILATION_CACHE"
MAX_BYTES = 4 << 30


def cache_dir() -> Path | None:
    """Where :func:`enable_compilation_cache` keeps the cache; None when ``NASQ_COMPILATION_CACHE=0``."""
    given = os.environ.get(ENV, "").strip()
    if given == "0":
        return None
    if given:
        return Path(given).expanduser()
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or str(Path.home() / ".cache")
    return Path(base).expanduser() / "nasq" / "jax"


def enable_compilation_cache() -> Path | None:
    """Point JAX's persistent compilation cache at :func:`cache_dir` (created if missing), at most
    :data:`MAX_BYTES`; returns the directory in use, or None when it is off (``NASQ_COMPILATION_CACHE=0``, or the
    directory cannot be created: compiling without a cache is only slower). A ``JAX_COMPILATION_CACHE_DIR`` the
    user set wins (returned as is)."""
    import jax

    if os.environ.get("JAX_COMPILATION_CACHE_DIR", "").strip():
        return Path(os.environ["JAX_COMPILATION_CACHE_DIR"])
    d = cache_dir()
    if d is None:
        return None
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    jax.config.update("jax_compilation_cache_dir", str(d))
    jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    return d
