"""The persistent compilation cache the ``nasq`` command turns on (``nasq.compilation_cache``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nasq import compilation_cache

# A program that takes over a second to compile (JAX caches only those), run in a fresh process as the CLI
# would: the cache on, then the compile time of the first call and the cache directory's entries.
PROBE = """
import time
from nasq.compilation_cache import enable_compilation_cache
print(enable_compilation_cache())
import jax, jax.numpy as jnp

@jax.jit
def f(x):
    for i in range(150):
        x = jnp.sin(x) @ x + i
    return x

t = time.perf_counter()
f(jnp.ones((8, 8))).block_until_ready()
print(time.perf_counter() - t)
"""


def _probe(env: dict) -> tuple[str, float]:
    env = {k: v for k, v in {**os.environ, **env}.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    where, seconds = out.stdout.split()
    return where, float(seconds)


@pytest.mark.slow  # two subprocesses that compile
def test_second_process_loads_what_the_first_compiled(tmp_path):
    d = tmp_path / "cache"
    where, first = _probe({"NASQ_COMPILATION_CACHE": str(d)})
    assert Path(where) == d and any(p.name.startswith("jit_f") for p in d.iterdir())
    _, second = _probe({"NASQ_COMPILATION_CACHE": str(d)})
    assert second < first / 2, (first, second)  # loaded, not compiled (the program takes seconds to compile)


def test_default_place_opt_out_and_the_users_own_setting(tmp_path, monkeypatch):
    monkeypatch.delenv(compilation_cache.ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compilation_cache.cache_dir() == tmp_path / "xdg" / "nasq" / "jax"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert compilation_cache.cache_dir() == Path.home() / ".cache" / "nasq" / "jax"
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "mine"))
    assert compilation_cache.enable_compilation_cache() == tmp_path / "mine"  # left to JAX, nothing changed
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "")
    monkeypatch.setenv(compilation_cache.ENV, "0")
    assert compilation_cache.cache_dir() is None and compilation_cache.enable_compilation_cache() is None
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    monkeypatch.setenv(compilation_cache.ENV, str(blocked / "cache"))
    assert compilation_cache.enable_compilation_cache() is None  # cannot be created: compile without it
