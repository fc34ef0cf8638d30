#!/usr/bin/env python
"""How close the native integer GEMM runs to this CPU's peak (issue 17): one linear layer, native (resident
panels, the default path) and XLA's fp32 ``x @ W.T`` timed interleaved in one process, in multiply-adds per second.

    gcc -O2 -o /tmp/avx2_peak experiments/peak/avx2_peak.c && /tmp/avx2_peak   # per-core peak of the two inner ops
    python experiments/gemm_efficiency.py M K N BITS REPEATS

The peak program times independent ``vpmaddubsw``+``vpaddw`` pairs (the AVX2 micro kernel's inner operation:
32 u8 x s8 multiply-adds each) and independent fp32 FMAs (8 multiply-adds each) on one core.
"""

import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from nasq.kernels import native
from nasq.quant.packing import pack_codes

M, K, N, bits, R = (int(v) for v in sys.argv[1:6])
rng = np.random.default_rng(0)
codes = rng.integers(-(2 ** (bits - 1)), 2 ** (bits - 1), (N, K)).astype(np.int8)
isa, panels = native.prepack_segments([(bits, pack_codes(codes, bits))], K)
x = jnp.asarray(rng.standard_normal((M, K)).astype(np.float32))
w = jnp.asarray(rng.standard_normal((N, K)).astype(np.float32))
rs, idx = jnp.ones((N,), jnp.float32), jnp.arange(N, dtype=jnp.int32)
fns = {"native": jax.jit(lambda x: native.linear(x, panels, rs, None, idx, N, panels_isa=isa)),
       "fp32": jax.jit(lambda x: x @ w.T)}
ts = {k: [] for k in fns}
for f in fns.values():
    f(x).block_until_ready()
for r in range(R):
    for k in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
        t = time.perf_counter()
        fns[k](x).block_until_ready()
        ts[k].append(time.perf_counter() - t)
out = {"M": M, "K": K, "N": N, "bits": bits, "isa": isa, "repeats": R}
for k, v in ts.items():
    med = float(np.median(v))
    out[f"{k}_ms"] = round(1000 * med, 3)
    out[f"{k}_GMAC_s"] = round(M * K * N / med / 1e9, 1)
print(json.dumps(out))
