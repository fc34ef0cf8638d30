"""Timing helpers for benchmarks and latency profiles: medians of interleaved, blocked calls.

Absolute times on a shared machine are noisy; every figure nasq reports is a median of calls interleaved
round-robin with the variants it is compared against, so machine noise hits every variant alike.
"""

from __future__ import annotations

import os
import platform
import sys
import time

import jax
import numpy as np

from nasq.allocator import allocator_tuned

__all__ = ["block", "environment", "median_ms", "time_interleaved"]


def block(tree):
    """Wait until every array of ``tree`` is computed (JAX dispatch is asynchronous); returns ``tree``."""
    jax.tree.map(lambda x: x.block_until_ready() if hasattr(x, "block_until_ready") else x, tree)
    return tree


def time_interleaved(fns: dict, repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each zero-arg fn, calls interleaved round-robin (fair under noise)."""
    for fn in fns.values():
        for _ in range(warmup):
            block(fn())
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            block(fn())
            times[k].append(time.perf_counter() - t)
    return {k: float(np.median(v)) for k, v in times.items()}


def median_ms(fn, *args, repeats: int, warmup: int = 2) -> float:
    """Median milliseconds of `fn(*args)` (blocked until ready) over `repeats` calls after `warmup`."""
    return 1e3 * time_interleaved({"fn": lambda: fn(*args)}, repeats, warmup)["fn"]


def environment() -> dict:
    """Machine, date, JAX version and the command line: recorded next to every measured figure."""
    return {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.machine(), "cpus": os.cpu_count(),
            "jax": jax.__version__, "backend": jax.default_backend(), "malloc_tuned": allocator_tuned(),
            "command": " ".join(["nasq", *sys.argv[1:]])}
