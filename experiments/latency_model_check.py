"""Does `nasq profile`'s latency table predict what an exported artifact's forward takes on this machine?

Issue 17 item 6 (the latency budget follows the kernel). For each workload shape ``BATCHxSEQ``: one latency table
(``nasq.profile.profile_latency``: the integer linear and attention core an artifact runs here), then for each
artifact

    predicted_ms = fixed_ms + sum over its plan's groups of rows * ms_per_row(cols, bits)   (plan_latency_ms)
    measured_ms  = median of the loaded artifact's jitted forward on [BATCH, SEQ] random tokens, full mask

with the artifacts' forwards interleaved (``nasq.timing.time_interleaved``). A search under ``--latency-ms X``
trusts ``predicted``; ``predicted / measured`` says how far.

Usage (repo root): python experiments/latency_model_check.py ARTIFACT [ARTIFACT ...] [--shape 1x128 --shape 32x128]
Prints one JSON line per shape; experiments/results/bench.md quotes them.
"""

import argparse
import functools
import json
import sys

import jax.numpy as jnp
import numpy as np

from nasq.contract.cost import plan_latency_ms
from nasq.contract.plan import Plan
from nasq.export.reader import load_artifact
from nasq.profile import profile_latency
from nasq.timing import environment, time_interleaved


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("artifacts", nargs="+")
    ap.add_argument("--model", default="minilm-l6", help="the artifacts' base model (profiled)")
    ap.add_argument("--shape", action="append", help="BATCHxSEQ (repeatable; default 1x128 and 32x128)")
    ap.add_argument("--repeats", type=int, default=15)
    a = ap.parse_args(argv)
    models = {p: load_artifact(p) for p in a.artifacts}
    plans = {p: Plan.load(f"{p}/plan.json") for p in a.artifacts}
    bits = sorted({int(b) for pl in plans.values() for t in pl.tensors for b in t.bits if int(b)})  # to profile
    for shape in a.shape or ["1x128", "32x128"]:
        batch, seq = (int(x) for x in shape.split("x"))
        table = profile_latency(a.model, tokens=batch * seq, seq_len=seq, bits=bits, repeats=a.repeats)
        ids = jnp.asarray(np.random.default_rng(0).integers(1000, 20000, (batch, seq)), jnp.int32)
        tt, am = jnp.zeros_like(ids), jnp.ones_like(ids)
        fns = {p: functools.partial(m, ids, tt, am) for p, m in models.items()}  # IntBert's call is jitted
        measured = {p: 1e3 * s for p, s in time_interleaved(fns, a.repeats).items()}
        rows = []
        for p, pl in plans.items():
            pred = plan_latency_ms(pl.searched_tensors(), pl.bits_per_group(), table)
            rows.append({"artifact": p, "avg_bits": pl.totals.get("avg_bits"), "predicted_ms": round(pred, 3),
                         "measured_ms": round(measured[p], 3), "predicted_over_measured": round(pred / measured[p], 3)})
        print(json.dumps({"bench": "latency-model-check", "shape": shape, "fixed_ms": round(table.fixed_ms, 3),
                          "kernel": table.meta["kernel"], "attention": table.meta["attention"], "artifacts": rows,
                          **environment(), "command": " ".join(["python", *sys.argv])}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
