"""Cost of a mixed-width linear on the native path (issue 17): an artifact's linear with several width segments vs
single-width linears of the same shape (random weights), interleaved medians, fused fp32 output. The mixed layer
runs twice: as nasq runs it (all segments in one native call) and as it ran before (one call per segment).

    python experiments/segments_bench.py ARTIFACT [--layer 0] [--module inter] [--tokens 16,4096] [--repeats 15]
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from nasq.export.reader import load_artifact
from nasq.kernels import native
from nasq.kernels.int_linear import pack_linear, packed_linear_apply
from nasq.quant.quantizer import quantize_act_int8
from nasq.timing import environment, time_interleaved


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact")
    ap.add_argument("--layer", type=int, default=0)
    ap.add_argument("--module", default="inter", help="query|key|value|attn_out|inter|out")
    ap.add_argument("--tokens", default="16,4096")
    ap.add_argument("--repeats", type=int, default=15)
    a = ap.parse_args(argv)
    mixed = load_artifact(a.artifact, unpack="fused").params["layers"][a.layer][a.module]
    segs = ", ".join(f"{p.shape[0]} rows at {b} bits" for b, p in mixed.segments)
    rng = np.random.default_rng(0)
    n, k = mixed.out_features, mixed.in_features
    w = rng.standard_normal((n, k)).astype(np.float32) * 0.05
    groups = 128 if n % 128 == 0 else 1
    sizes = [n // groups] * groups
    lins = {f"mixed ({segs})": mixed}
    for bits in (2, 3, 4):
        lins[f"all {bits}-bit"] = pack_linear(w, np.zeros(n, np.float32), sizes, [bits] * groups,
                                              np.full(groups, 0.02, np.float32))
    apply = jax.jit(lambda x, p: packed_linear_apply(x, p, output="compact", kernel="native"))

    def call(x, p):
        return lambda: apply(x, p)

    @jax.jit
    def per_segment(x, p):  # the native path before it ran a layer in one call: one call per segment, concatenated
        xq, sx = quantize_act_int8(x)
        parts, r0 = [], 0
        for b, packed in p.segments:
            r1 = r0 + packed.shape[0]
            parts.append(native.int_linear(xq, sx, packed, b, p.row_scale[r0:r1],
                                           None if p.bias is None else p.bias[r0:r1]))
            r0 = r1
        return jnp.concatenate(parts, axis=-1)

    for m in (int(t) for t in a.tokens.split(",")):
        x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
        fns = {name: call(x, p) for name, p in lins.items()}
        if len(mixed.segments) > 1:
            fns["mixed, one call per segment"] = lambda x=x: per_segment(x, mixed)
        t = time_interleaved(fns, a.repeats)
        print(json.dumps({"bench": "segments", "tokens": m, "k": k, "n": n,
                          "ms": {name: round(1e3 * v, 3) for name, v in t.items()}, **environment(),
                          "command": " ".join(["python", *sys.argv])}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
