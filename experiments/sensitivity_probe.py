#!/usr/bin/env python
"""Measured damage of quantizing ONE encoder linear of the fp32 teacher, every linear in turn (issue 16).

The searched plans and the Hessian plans allocate along different axes (NOTES.md: nasq by module type, flat over
depth; Hessian by depth). This probe measures the ground truth those allocations estimate, at the level of whole
tensors: for each searched tensor and width b, only that tensor is quantized (every 128-row group at b bits, the
MSE-initialised steps QAT starts from, ``init_plan_scales``), everything else stays fp32, and the probe reports

    KL(teacher || quantized)   mean over rows of the train subset, from the logits (nats x 1000)
    agree                      share of rows whose predicted class is unchanged

No training: a step-0 measure (it does not say what QAT recovers). One jitted forward serves every probe (the
dequantized weight replaces the fp32 kernel), so the cost is one forward of the rows per (tensor, width).
``nasq baseline measured`` allocates bits from the same measurement (nasq.baselines.measured).

Usage (repo root):
    python experiments/sensitivity_probe.py runs/protocol/sst2/fp32 --data-dir ../shared/data/glue \\
        [--task sst2] [--rows 512] [--bits 1 2] [--space aqbert_128g_w1234] [--out probe.json]
    python experiments/sensitivity_probe.py --from probe.json --plans PLAN.json [PLAN.json ...]
Prints a markdown table (module x layer) per width; --out writes every number as JSON. ``--plans``: how well
each plan follows the measurements: Spearman's rank correlation over the tensors between the plan's average bits
per tensor and the measured KL per weight (the damage a bit saves, per byte it costs), per probed width.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from nasq.baselines.measured import kl_rows
from nasq.errors import NasqError


def load_teacher(run: str, task: str, data_dir: str | None, train_subset: int | None, seed: int, space_name: str):
    """(config, fp32 teacher, task data, search space, its tensors resolved on the teacher) for the analysis
    scripts; ``NasqError`` on a bad run, task, data directory or space."""
    from nasq.config import build_config
    from nasq.contract.model_dir import load_model_dir, model_dir_of
    from nasq.contract.space import load_space, resolve
    from nasq.data.tasks import load_task_data
    from nasq.models.surgery import linear_shapes

    cfg = build_config(("args", {"data": {"task": task, "data_dir": data_dir, "train_subset": train_subset},
                                 "train": {"seed": seed}}))
    teacher, _ = load_model_dir(run)
    data = load_task_data(cfg, model_dir=model_dir_of(run))
    space = load_space(space_name)
    tensors = resolve(space, linear_shapes(teacher.bert), teacher.config.num_attention_heads)
    return cfg, teacher, data, space, tensors


def plan_agreement(probes: list[dict], plan_path: str) -> dict[int, float]:
    """Per probed width b: Spearman's rank correlation, over the probed tensors, of the plan's average bits per
    tensor with the measured KL per weight at b bits (+1: more bits exactly where a bit saves most per byte);
    None for a plan with the same average bits in every tensor."""
    from scipy.stats import spearmanr

    from nasq.contract.plan import Plan

    plan = Plan.load(plan_path)
    avg = {t.path: float(np.dot(t.group_sizes, t.bits) / sum(t.group_sizes)) for t in plan.tensors}
    out = {}
    for b in sorted({r["bits"] for r in probes}):
        rs = [r for r in probes if r["bits"] == b]
        if missing := [r["path"] for r in rs if r["path"] not in avg]:
            raise NasqError(f"{plan_path}: the plan has no tensor {missing[0]} (probed); give a plan of the same model")
        bits = [avg[r["path"]] for r in rs]
        out[b] = None if len(set(bits)) == 1 else float(  # one width everywhere (uniform): no ranking
            spearmanr([r["kl_x1000"] / r["weights"] for r in rs], bits).statistic)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("teacher", nargs="?")
    ap.add_argument("--from", dest="from_json", help="a probe.json written by --out: report --plans against it")
    ap.add_argument("--plans", nargs="+", default=[])
    ap.add_argument("--data-dir")
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--bits", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--space", default="aqbert_128g_w1234")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    if a.from_json:
        try:
            probes = json.loads(Path(a.from_json).read_text())["probes"]
            print("| plan | " + " | ".join(f"rank corr. with KL per weight at {b} bit(s)" for b in
                                         sorted({r["bits"] for r in probes})) + " |")
            print("|---|" + "---|" * len({r["bits"] for r in probes}))
            for p in a.plans:
                print(f"| {p} | " + " | ".join("one width" if v is None else f"{v:+.2f}"
                                             for v in plan_agreement(probes, p).values()) + " |")
        except (OSError, KeyError, ValueError, NasqError) as e:
            print(f"sensitivity_probe: error: {e}", file=sys.stderr)
            return 2
        return 0
    if not a.teacher or not a.data_dir:
        ap.error("give TEACHER and --data-dir (or --from probe.json --plans ...)")

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from nasq.evaluation import collect_logits
    from nasq.models.bert import Linear
    from nasq.models.surgery import module_path, strip_root
    from nasq.quant.layers import QuantLinear

    try:
        _, teacher, data, space, tensors = load_teacher(a.teacher, a.task, a.data_dir, a.rows, a.seed, a.space)
    except NasqError as e:
        print(f"sensitivity_probe: error: {e}", file=sys.stderr)
        return 2

    graphdef, state = nnx.split(teacher)
    flat = dict(nnx.to_flat_state(state))
    linears = {strip_root(module_path(p)): (p + ("kernel",), m) for p, m in nnx.iter_modules(teacher)
               if isinstance(m, Linear)}
    fwd = jax.jit(lambda s, ids, tt, am: nnx.merge(graphdef, s)(ids, tt, am))

    def logits_with(st):
        return collect_logits(lambda b: fwd(st, b.input_ids, b.token_type_ids, b.attention_mask), data.train, 64,
                              data.buckets)

    base = logits_with(state)
    pred = base.argmax(1)
    rows = []
    t0 = time.time()
    for t in tensors:
        key, lin = linears[t.path]
        for b in a.bits:  # the fixed-plan layer QAT starts from: MSE-initialised steps, every group at b bits
            wq = QuantLinear(lin, t.path, t.group_sizes, [b] * t.num_groups, mode=space.quant_mode).quantized_weight()
            new = dict(flat)
            new[key] = flat[key].replace(jnp.asarray(wq).T)
            q = logits_with(nnx.from_flat_state(new))
            parts = t.path.split(".")
            rows.append({"path": t.path, "layer": int(parts[2]) if parts[1] == "layer" else None,
                         "rule": t.rule, "bits": b, "weights": t.num_weights,
                         "kl_x1000": 1000 * float(kl_rows(base, q).mean()),
                         "agree": float((q.argmax(1) == pred).mean())})
        print(f"{t.path}: " + ", ".join(f"{r['bits']}b KL {r['kl_x1000']:.2f}" for r in rows[-len(a.bits):]) +
              f"  ({time.time() - t0:.0f}s)", file=sys.stderr, flush=True)

    short = {}
    for r in rows:
        short[r["path"]] = r["path"].split(".", 3)[-1] if r["layer"] is not None else r["path"]
    layers = sorted({r["layer"] for r in rows if r["layer"] is not None})
    names = list(dict.fromkeys(short[r["path"]] for r in rows))
    for b in a.bits:
        print(f"\nKL(teacher || one tensor at {b} bit(s)) x 1000, mean over {len(pred)} train rows "
              f"(agreement in parentheses)\n")
        print("| tensor | " + " | ".join(f"layer {i}" for i in layers) + " |")
        print("|---|" + "---|" * len(layers))
        for n in names:
            cells = []
            for i in layers:
                r = next((r for r in rows if r["bits"] == b and r["layer"] == i and short[r["path"]] == n), None)
                cells.append("" if r is None else f"{r['kl_x1000']:.2f} ({100 * r['agree']:.1f}%)")
            print(f"| {n} | " + " | ".join(cells) + " |")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"teacher": a.teacher, "task": a.task, "rows": len(pred), "space": a.space,
                       "bits": a.bits, "seed": a.seed, "probes": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
