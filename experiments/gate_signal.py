#!/usr/bin/env python
"""What the search's gates hear at the start: the gate gradient per tensor next to the measured damage (issue 16).

Every nasq search variant kept the FFN input of layers 0-2 at 1.3-1.5 bits at avg 1.5, where the sensitivity probe
(experiments/sensitivity_probe.py) measures the most damage per weight. This script asks whether the signal the
gates train on ranks tensors like that damage, and whether it rises above its own noise.

It builds the supernet exactly as ``nasq search`` does at step 0 (teacher weights, initial gates, the initial
temperature and the budget's price, no Gumbel noise) and takes the gradient of the gate step's loss with respect
to the gate logits on ``--batches`` train batches. For group g of tensor t with choices c_lo < ... < c_hi,

    s_g = dL/d alpha_{g,c_lo} - dL/d alpha_{g,c_hi}

is how much the loss falls, to first order, per unit of logit moved from the narrowest to the widest width
(positive: the loss wants more bits). The budget's price trades bits per byte, so the signal is compared per
weight: per tensor the mean over groups and batches of s_g / n_g (n_g: the group's weights), its
signal-to-noise ratio (mean / (std over batches / sqrt(batches))), and Spearman's rank correlation, over the
tensors, of that mean with the probe's measured KL per weight at each probed width. Two losses: ``task``
(the default gate loss: cross-entropy on labels) and ``kd`` (KL to the teacher's logits, ``search.gate_loss=
task_kd``'s dense part).

Usage (repo root):
    python experiments/gate_signal.py runs/protocol/sst2/fp32 --data-dir ../shared/data/glue \\
        --probe experiments/results/protocol/sensitivity_probe_sst2.json [--avg-bits 1.5] \\
        [--space aqbert_128g_w1234] [--batches 16] [--seed 0] [--out gate_signal.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from nasq.errors import NasqError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("teacher")
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--probe", required=True, help="a sensitivity_probe.py --out JSON of the same teacher")
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--space", default="aqbert_128g_w1234")
    ap.add_argument("--avg-bits", type=float, default=1.5)
    ap.add_argument("--batches", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out")
    a = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    from flax import nnx
    from scipy.stats import spearmanr

    from nasq.config import build_config
    from nasq.data.batching import iterate_batches
    from nasq.data.tasks import load_task_data
    from nasq.evaluation import predict_logits
    from nasq.objectives import kd_loss, task_loss
    from nasq.quant.layers import GateLogits, gated_modules, set_search_context
    from nasq.search.loop import base_model, build_steps, make_problem, search_optimizers, supernet_of

    try:
        probes = json.loads(Path(a.probe).read_text())["probes"]
        cfg = build_config(("args", {"data": {"task": a.task, "data_dir": a.data_dir,
                                              "train_subset": 32 * a.batches},
                                     "search": {"space": a.space, "avg_bits": a.avg_bits},
                                     "kd": {"teacher": a.teacher}, "train": {"seed": a.seed}}))
        data = load_task_data(cfg)
        model = base_model(cfg, data)
        problem = make_problem(cfg, model)
    except (OSError, KeyError, ValueError, NasqError) as e:
        print(f"gate_signal: error: {e}", file=sys.stderr)
        return 2
    t0 = time.time()
    sn = supernet_of(cfg, model, problem)
    graphdef, weights, gates, rest = nnx.split(sn, nnx.Param, GateLogits, ...)
    w_tx, g_tx = search_optimizers(cfg, 100)
    fns = build_steps(graphdef, rest, problem, w_tx, g_tx, is_regression=data.task.is_regression,
                      kd_beta=cfg.kd.beta, kd_temperature=cfg.kd.temperature)
    s = cfg.search
    tau = jnp.float32(s.tau_start)
    mu = fns.price(weights, gates, rest, tau)
    ctx = set_search_context(rest, tau, jax.random.key(a.seed), False, mu)
    teacher = predict_logits(model, data.train, cfg.data.eval_batch_size, data.buckets)
    paths = [m.path for m in gated_modules(nnx.merge(graphdef, weights, gates, ctx))]

    @jax.jit
    def grads(g, batch, tl):
        def loss(g, which):
            m = nnx.merge(graphdef, weights, g, ctx)
            logits = m(batch.input_ids, batch.token_type_ids, batch.attention_mask)
            if which == "task":
                return task_loss(logits, batch.labels, batch.weights, data.task.is_regression)
            return kd_loss(logits, tl, batch.weights, cfg.kd.temperature, data.task.is_regression)

        out = {}
        for which in ("task", "kd"):
            gr = jax.grad(loss)(g, which)
            out[which] = [x.alpha[...] for x in gated_modules(nnx.merge(graphdef, weights, gr, ctx))]
        return out

    per_batch: dict[str, list[list[np.ndarray]]] = {"task": [], "kd": []}
    it = iterate_batches(data.train, 32, data.buckets, a.seed)
    for i in range(a.batches):
        _, _, b = next(it)
        tl = jnp.asarray(teacher[np.maximum(b.index, 0)])
        out = grads(gates, b, tl)
        for which, got in per_batch.items():
            got.append([np.asarray(x, np.float64) for x in out[which]])
        print(f"batch {i + 1}/{a.batches} ({time.time() - t0:.0f}s)", file=sys.stderr, flush=True)

    by_path = {t.path: t for t in problem.tensors}
    rows = []
    for ti, path in enumerate(paths):
        t = by_path[path]
        lo, hi = int(np.argmin(t.choices)), int(np.argmax(t.choices))
        n_g = np.asarray(t.group_sizes, np.float64) * t.cols  # weights per group
        rec = {"path": path, "groups": t.num_groups, "weights": t.num_weights}
        for which, bl in per_batch.items():
            sig = np.stack([(g[ti][:, lo] - g[ti][:, hi]) / n_g for g in bl])  # [batches, groups], per weight
            per_b = sig.mean(1)
            mean, sd = float(per_b.mean()), float(per_b.std(ddof=1)) if len(per_b) > 1 else float("nan")
            rec[f"{which}_signal"] = mean
            rec[f"{which}_snr"] = mean / (sd / np.sqrt(len(per_b))) if sd > 0 else float("nan")
        rows.append(rec)

    widths = sorted({r["bits"] for r in probes})
    dmg = {(r["path"], r["bits"]): r["kl_x1000"] / r["weights"] for r in probes}
    corr = {}
    for which in per_batch:
        for b in widths:
            xs = [(dmg[(r["path"], b)], r[f"{which}_signal"]) for r in rows if (r["path"], b) in dmg]
            corr[f"{which}@{b}bit"] = float(spearmanr(*zip(*xs)).statistic) if len(xs) > 2 else None

    print(f"\nGate-gradient signal for more bits at the search's start ({a.space}, avg {a.avg_bits} bits, "
          f"{a.batches} batches of 32, tau {float(tau):.3g}, price {float(mu):.4g}); SNR = mean / standard error\n")
    print("Signals per weight x 1e9; probe KL x 1000 per weight x 1e6\n")
    print("| tensor | groups | task signal | task SNR | kd signal | kd SNR | probe KL/weight at "
          + ", ".join(f"{b} bit" for b in widths) + " |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        d = ", ".join(f"{1e6 * dmg[(r['path'], b)]:.1f}" if (r["path"], b) in dmg else "" for b in widths)
        print(f"| {r['path']} | {r['groups']} | {1e9 * r['task_signal']:+.3f} | {r['task_snr']:+.1f} | "
              f"{1e9 * r['kd_signal']:+.3f} | {r['kd_snr']:+.1f} | {d} |")
    print("\nSpearman rank correlation over tensors, gate signal vs probe KL per weight: "
          + ", ".join(f"{k} {v:+.2f}" for k, v in corr.items() if v is not None))
    snr = {w: float(np.median([abs(r[f"{w}_snr"]) for r in rows])) for w in per_batch}
    print("Median |SNR| over tensors: " + ", ".join(f"{k} {v:.1f}" for k, v in snr.items()))
    if a.out:
        Path(a.out).write_text(json.dumps({"teacher": a.teacher, "probe": a.probe, "space": a.space,
                                           "avg_bits": a.avg_bits, "batches": a.batches, "seed": a.seed,
                                           "tau": float(tau), "price": float(mu), "rows": rows,
                                           "spearman": corr, "median_abs_snr": snr}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
