"""Native integer GEMM vs the XLA integer path vs fp32 ``x @ W.T``, MiniLM linear shapes (issue 17).

One process, every variant of a (shape, tokens) group timed interleaved round-robin (``nasq.timing``), medians.
Variants (all jitted, input fp32 ``[M, K]``, output fp32 ``[M, N]``, bias included):

  native bB  ``packed_linear_apply(x, p, output="compact", kernel="native")``, all rows at B bits
             (activation quantization in XLA, then one fused native call: unpack in tiles, int GEMM, epilogue)
  xla bB     the same with ``kernel="xla"`` (unpack to int8 + int8 ``dot_general`` + epilogue, fused by XLA)
  fp32       ``x @ W.T + b`` with the fp32 weight

Ratios: ``xla/native`` (> 1: native faster) and ``fp32/native`` (> 1: native faster than fp32).

``--artifact DIR.nasq`` also times a whole integer BERT forward (``IntBert``, seq 128, batch 1 and 8) with
``kernel="native"`` vs ``kernel="xla"`` and checks the logits are equal.

Usage (repo root): python experiments/bench_native.py [--repeats 5] [--tokens 16 128 512 4096] [--bits 2 4 8]
                   [--artifact runs/smoke/model.nasq]
Prints markdown tables (ms and ratios) and the environment; experiments/results/bench_native.md has one run.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from nasq.io import git_rev
from nasq.kernels import native
from nasq.kernels.int_linear import pack_linear, packed_linear_apply
from nasq.timing import environment, time_interleaved

SHAPES = [(384, 1152), (384, 384), (384, 1536), (1536, 384)]  # (K in, N out): qkv fused, attn out, inter, out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tokens", type=int, nargs="+", default=[16, 128, 512, 4096])
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--shapes", type=str, nargs="+", default=[f"{k}x{n}" for k, n in SHAPES],
                    help="KxN (in x out)")
    ap.add_argument("--artifact", default=None, help="also time this integer model, native vs xla")
    a = ap.parse_args()
    print(f"kernel: {native.describe('native')}")
    env = environment()
    env["command"] = "python experiments/bench_native.py " + " ".join(
        f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in vars(a).items() if v)
    rng = np.random.default_rng(0)

    native_fn = jax.jit(lambda x, p: packed_linear_apply(x, p, output="compact", kernel="native"))
    xla_fn = jax.jit(lambda x, p: packed_linear_apply(x, p, output="compact", kernel="xla"))
    fp32_fn = jax.jit(lambda x, w, b: x @ w.T + b)

    rows = []
    t0 = time.time()
    for shape in a.shapes:
        k, n = (int(v) for v in shape.split("x"))
        w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
        bias = (rng.standard_normal(n) * 0.1).astype(np.float32)
        packed = {b: pack_linear(w, bias, [n], [b], np.array([0.02], np.float32)) for b in a.bits}
        wj, bj = jnp.asarray(w), jnp.asarray(bias)
        for m in a.tokens:
            x = jnp.asarray(rng.standard_normal((m, k)).astype(np.float32))
            fns = {"fp32": lambda x=x, wj=wj, bj=bj: fp32_fn(x, wj, bj)}
            for b, p in packed.items():
                fns[f"native b{b}"] = lambda x=x, p=p: native_fn(x, p)
                fns[f"xla b{b}"] = lambda x=x, p=p: xla_fn(x, p)
            sec = time_interleaved(fns, a.repeats)
            for b in a.bits:
                nat, xla, fp = sec[f"native b{b}"], sec[f"xla b{b}"], sec["fp32"]
                rows.append((k, n, m, b, 1e3 * nat, 1e3 * xla, 1e3 * fp, xla / nat, fp / nat))
            print(f"  {k}x{n} M={m} done ({time.time() - t0:.0f} s)", flush=True)

    print()
    print("| K | N | tokens M | bits | native ms | xla int ms | fp32 ms | xla/native | fp32/native |")
    print("|---|---|---|---|---|---|---|---|---|")
    for k, n, m, b, nat, xla, fp, r1, r2 in rows:
        print(f"| {k} | {n} | {m} | {b} | {nat:.3f} | {xla:.3f} | {fp:.3f} | {r1:.2f} | {r2:.2f} |")
    if a.artifact:
        bench_model(a.artifact, a.repeats)
    print()
    print(f"git {git_rev(describe=True)}; {env}")


def bench_model(path: str, repeats: int):
    """Whole integer BERT forward, native vs XLA kernel, seq 128."""
    from nasq.export.reader import load_artifact

    im = load_artifact(path, unpack="fused")  # the same packed weights under both kernels
    models = {k: type(im)(dataclasses.replace(im.meta, kernel=k), im.params) for k in ("native", "xla")}
    rng = np.random.default_rng(0)
    print()
    print(f"Whole model `{path}` (IntBert forward, seq 128):")
    print()
    print("| batch | native ms | xla ms | xla/native | logits equal |")
    print("|---|---|---|---|---|")
    for batch in (1, 8):
        ids = jnp.asarray(rng.integers(1000, 30000, (batch, 128)), jnp.int32)
        same = bool(np.array_equal(np.asarray(models["native"](ids)), np.asarray(models["xla"](ids))))
        sec = time_interleaved({k: (lambda m=m, ids=ids: m(ids)) for k, m in models.items()}, repeats)
        nat, xla = 1e3 * sec["native"], 1e3 * sec["xla"]
        print(f"| {batch} | {nat:.1f} | {xla:.1f} | {xla / nat:.2f} | {same} |")


if __name__ == "__main__":
    main()
