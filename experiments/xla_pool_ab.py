#!/usr/bin/env python
"""The native kernel on XLA's thread pool vs its own threads (issue 17): one process, the whole integer forward of an
artifact at one shape, the two settings interleaved (medians), outputs checked bit-identical first.

Usage: python experiments/xla_pool_ab.py ARTIFACT BxS REPEATS
"""
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from nasq.export.reader import load_artifact
from nasq.kernels import native

m = load_artifact(sys.argv[1])
b, s = [int(v) for v in sys.argv[2].split("x")]
R = int(sys.argv[3])
rng = np.random.default_rng(0)
ids = jnp.asarray(rng.integers(1000, 20000, (b, s)), jnp.int32)
tt = jnp.zeros((b, s), jnp.int32); am = jnp.ones((b, s), jnp.int32)
f = jax.jit(lambda ids, tt, am: m(ids, tt, am))
outs = {}
for on in (True, False):
    native.set_xla_pool(on); outs[on] = np.asarray(f(ids, tt, am))
assert np.array_equal(outs[True], outs[False])
ts = {True: [], False: []}
for r in range(R):
    for on in ((True, False) if r % 2 == 0 else (False, True)):
        native.set_xla_pool(on)
        t = time.perf_counter(); f(ids, tt, am).block_until_ready(); ts[on].append(time.perf_counter() - t)
med = {k: 1000 * float(np.median(v)) for k, v in ts.items()}
print(json.dumps({"shape": sys.argv[2], "repeats": R, "xla_pool_ms": round(med[True], 2), "own_pool_ms": round(med[False], 2),
                  "ratio": round(med[True] / med[False], 3)}))
