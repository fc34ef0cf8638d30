"""The allocator tuning applied at ``import nasq`` (``nasq.allocator``): freed memory stays in the process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from nasq import allocator

GLIBC = sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")

# Allocate, touch and free a 64 MiB buffer 5 times; print the minor page faults of the last 4 rounds.
PROBE = """
import resource, sys
import numpy as np
{setup}
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
np.ones(1 << 24, np.float32).sum()
before = faults()
for _ in range(4):
    np.ones(1 << 24, np.float32).sum()
print(faults() - before)
"""


# The same with a 128 MiB buffer on a worker thread (XLA's and the native kernels' threads): glibc's per-thread
# arenas cannot hold a block above 64 MiB, so without M_ARENA_MAX = 1 it is mapped and unmapped every round.
PROBE_THREAD = """
import resource, threading
import numpy as np
{setup}
out = []
def work():
    def faults():
        return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    np.ones(1 << 25, np.float32).sum()
    before = faults()
    for _ in range(4):
        np.ones(1 << 25, np.float32).sum()
    out.append(faults() - before)
t = threading.Thread(target=work)
t.start()
t.join()
print(out[0])
"""


def page_faults(setup: str, env=None, probe: str = PROBE) -> int:
    out = subprocess.run([sys.executable, "-c", probe.format(setup=setup)], capture_output=True, text=True,
                         check=True, env={**os.environ, **(env or {})})
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not GLIBC, reason="the tuning applies to glibc only")
def test_import_nasq_keeps_freed_memory():
    """After ``import nasq`` a freed 64 MiB buffer is reused without faulting its pages in again; with
    ``NASQ_TUNE_MALLOC=0`` glibc's defaults map and unmap it every round (each round faults again: its 16,384
    pages, or as few as its 32 huge pages where the kernel has free transparent huge pages for numpy's madvise,
    which varies with the machine's load)."""
    untuned = page_faults("import nasq", {allocator.ENV: "0"})
    tuned = page_faults("import nasq")
    assert untuned >= 4 * 32, untuned  # at least one fault per 2 MiB huge page per round (THP backs it)
    assert tuned < untuned / 10, (tuned, untuned)


@pytest.mark.skipif(not GLIBC, reason="the tuning applies to glibc only")
def test_import_nasq_keeps_freed_memory_of_worker_threads():
    """A 128 MiB buffer freed on a worker thread is reused too (one arena for every thread); glibc's defaults and
    the thresholds alone map it again every round."""
    untuned = page_faults("import nasq", {allocator.ENV: "0"}, PROBE_THREAD)
    tuned = page_faults("import nasq", probe=PROBE_THREAD)
    assert untuned >= 4 * 50, untuned  # at least one fault per 2 MiB huge page per round
    assert tuned < untuned / 10, (tuned, untuned)


def test_opt_out_and_state(monkeypatch):
    """``NASQ_TUNE_MALLOC=0`` makes a fresh call a no-op; the state says whether the tuning is in force."""
    monkeypatch.setitem(allocator._state, "tuned", False)
    monkeypatch.setenv(allocator.ENV, "0")
    assert allocator.tune_allocator() is False and allocator.allocator_tuned() is False
    monkeypatch.delenv(allocator.ENV)
    assert allocator.tune_allocator() is GLIBC and allocator.allocator_tuned() is GLIBC
