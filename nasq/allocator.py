"""The process's C allocator, tuned for XLA on CPU (Linux with glibc; elsewhere nothing is changed).

XLA's CPU runtime allocates the buffers of every call afresh. glibc serves blocks above its mmap threshold
(128 KiB, rising with use to at most 32 MiB) with ``mmap`` and unmaps them on ``free``, and it trims free memory at
the heap top back to the kernel: each call then faults its buffers in again, and the kernel zeroes every page.
On the 2-core VM of ``experiments/results/bench.md`` a MiniLM forward at 32 x 128 tokens spent about a third of
its time there. :func:`tune_allocator` keeps freed memory in the process instead (``mallopt``)::

    M_MMAP_THRESHOLD = 1 GiB     blocks below it come from the heap, not from mmap
    M_TRIM_THRESHOLD = 1 GiB     free memory at the heap top goes back to the kernel only above this
    M_TOP_PAD        = 256 MiB   the heap grows in large steps
    M_ARENA_MAX      = 1         every thread allocates from the main heap

The last one is there because XLA and the native kernels run on worker threads. glibc gives such threads their own
arenas, whose heaps are at most 64 MiB each, so it serves every larger block of a worker thread with ``mmap``
whatever the threshold says, and unmaps it on ``free``: with the first three settings alone, a MiniLM forward at
32 x 128 tokens still faulted in about 120 MB per call (29,000 page faults; about 350 with one arena, counted with
``perf stat -e page-faults``; the time this saves was within the machine's noise, see
``experiments/results/bench.md``). One arena means one lock for all threads' allocations; it did not slow the
training step there.

The cost is memory: freed blocks stay mapped (about the peak working set, plus up to 1 GiB). ``import nasq``
applies it once; ``NASQ_TUNE_MALLOC=0`` in the environment leaves the allocator alone.
"""

from __future__ import annotations

import ctypes
import os
import sys

ENV = "NASQ_TUNE_MALLOC"
# M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, M_TOP_PAD, M_ARENA_MAX (malloc.h)
SETTINGS = {-3: 1 << 30, -1: 1 << 30, -2: 256 << 20, -8: 1}

_state = {"tuned": False}


def tune_allocator() -> bool:
    """Apply :data:`SETTINGS` with glibc's ``mallopt`` unless ``NASQ_TUNE_MALLOC=0``; True if they are in force
    (now or from an earlier call). Not glibc (macOS, Windows, musl): False, nothing changed."""
    if _state["tuned"]:
        return True
    if os.environ.get(ENV, "1").strip() == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)  # the process's own symbols: libc is loaded (find_library would spawn ldconfig)
        mallopt = libc.mallopt
        _ = libc.gnu_get_libc_version  # glibc only (musl has no mallopt tunables of these numbers)
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _state["tuned"] = all(mallopt(param, value) == 1 for param, value in SETTINGS.items())
    return _state["tuned"]


def allocator_tuned() -> bool:
    """Whether :func:`tune_allocator` is in force in this process (benchmarks record it)."""
    return _state["tuned"]
