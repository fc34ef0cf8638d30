#!/usr/bin/env python
"""Where the measured allocation and the Fisher allocation disagree, by module type and width (issue 16).

Both allocators score "the damage of quantizing tensor t at width b" and solve the same knapsack; they differ only
in that score:

    measured   d_meas(t, b) = KL(teacher || teacher with t alone at b bits), measured on train rows
               (``nasq baseline measured``; recorded in the plan's provenance as ``damage_kl_x1000``)
    Fisher     d_fish(t, b) = 0.5 * Tr(F_t)/n_t * ||W_t - Q_b(W_t)||^2, the second-order estimate of that KL
               with the Gauss-Newton (Fisher) curvature taken isotropic over the tensor (``nasq baseline hessian
               --curvature fisher --granularity tensor``; the trace per weight in ``tensor_trace_per_weight``)

This script reads one plan of each (their provenance holds the two scores' inputs), computes the quantization
errors ``||W_t - Q_b(W_t)||^2`` on the teacher (the MSE-initialised steps both allocators use) and reports
``log(d_meas / d_fish)`` per tensor and width, its mean per module type and width, and the Pearson correlation
of the two log scores. A module type whose mean log ratio is above the others' is one the measured allocation
finds more damaging than the Fisher does (so it gives it more bits); below, less. Only ratios between module
types and widths move a plan: a common factor changes nothing in the knapsack. No training; seconds.

Usage (repo root):
    python experiments/criteria_compare.py runs/protocol/cola/fp32 --task cola --data-dir ../shared/data/glue \\
        --measured runs/protocol/cola/avg2.5/measured_fs/seed0/plan.json \\
        --fisher runs/protocol/cola/avg2.5/fisher_t/seed0/plan.json [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from nasq.errors import NasqError

MODULE_KINDS = (("attention.self.query", "query"), ("attention.self.key", "key"), ("attention.self.value", "value"),
                ("attention.output.dense", "attn_out"), ("intermediate.dense", "ffn_in"), ("output.dense", "ffn_out"))


def module_kind(path: str) -> str:
    """``query``, ``key``, ``value``, ``attn_out``, ``ffn_in`` or ``ffn_out`` for an encoder linear's path (the
    first suffix that matches, so ``attention.output.dense`` is not ``ffn_out``); else the path's last part."""
    for suffix, kind in MODULE_KINDS:
        if path.endswith(suffix):
            return kind
    return path.rsplit(".", 1)[-1]


def compare(tensors, perturbations, damage_x1000: dict, traces: dict) -> dict:
    """Per tensor and width (pruning excluded): ``d_meas`` (``damage_x1000[path][str(b)]``, x1000 nats),
    ``d_fish = 0.5 * traces[path] * sum_g perturbations[t][g, b] * 1000`` and their log ratio; the mean log ratio
    per (module kind, width) and the Pearson correlation of the log scores. Widths a plan did not measure, and
    scores <= 0, are left out."""
    rows = []
    for t, pert in zip(tensors, perturbations, strict=True):
        if t.path not in damage_x1000 or t.path not in traces:
            continue
        for k, b in enumerate(t.choices):
            meas = damage_x1000[t.path].get(str(int(b)))
            fish = 0.5 * float(traces[t.path]) * float(np.asarray(pert)[:, k].sum()) * 1000.0
            if b == 0 or meas is None or meas <= 0 or fish <= 0:
                continue
            rows.append({"path": t.path, "kind": module_kind(t.path), "bits": int(b), "measured_x1000": float(meas),
                         "fisher_x1000": fish, "log_ratio": float(np.log(meas / fish))})
    by_kind = defaultdict(list)
    for r in rows:
        by_kind[f"{r['kind']}@{r['bits']}"].append(r["log_ratio"])
    corr = (float(np.corrcoef(np.log([r["measured_x1000"] for r in rows]),
                              np.log([r["fisher_x1000"] for r in rows]))[0, 1]) if len(rows) > 1 else float("nan"))
    return {"rows": rows, "log_ratio_by_kind": {k: {"mean": float(np.mean(v)), "n": len(v)}
                                                for k, v in sorted(by_kind.items())},
            "pearson_log": corr}


def markdown(res: dict) -> str:
    """A table: module kinds down, widths across, mean ``log(d_meas / d_fish)`` in each cell."""
    cells = res["log_ratio_by_kind"]
    kinds = [k for _, k in MODULE_KINDS if any(c.startswith(k + "@") for c in cells)]
    widths = sorted({int(c.split("@")[1]) for c in cells})
    lines = ["| module | " + " | ".join(f"{b} bits" for b in widths) + " |", "|---" * (len(widths) + 1) + "|"]
    for k in kinds:
        vals = [cells.get(f"{k}@{b}") for b in widths]
        lines.append(f"| {k} | " + " | ".join("" if v is None else f"{v['mean']:+.2f}" for v in vals) + " |")
    return "\n".join(lines) + f"\n\nPearson correlation of the log scores: {res['pearson_log']:.3f}\n"


def _provenance(path: str, key: str, flag: str) -> dict:
    from nasq.contract.plan import Plan

    prov = Plan.load(path).provenance
    if not isinstance(prov.get(key), dict):
        raise NasqError(f"{path}: its provenance has no {key!r}; {flag} needs a plan made by "
                        + ("`nasq baseline measured`" if flag == "--measured" else
                           "`nasq baseline hessian --curvature fisher --granularity tensor`"))
    return prov


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("teacher", help="the fp32 fine-tune run both plans were allocated for")
    p.add_argument("--task", required=True)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--measured", required=True, help="a plan of `nasq baseline measured` (its damages)")
    p.add_argument("--fisher", required=True, help="a plan of `nasq baseline hessian --curvature fisher "
                   "--granularity tensor` (its traces)")
    p.add_argument("--out", default=None, help="write every number as JSON")
    a = p.parse_args(argv)

    from nasq.baselines.hessian import quant_perturbations

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from sensitivity_probe import load_teacher

    try:
        meas = _provenance(a.measured, "damage_kl_x1000", "--measured")
        fish = _provenance(a.fisher, "tensor_trace_per_weight", "--fisher")
        _, teacher, _, space, tensors = load_teacher(a.teacher, a.task, a.data_dir, None, 0, meas["space_name"])
    except NasqError as e:
        print(f"criteria_compare: error: {e}", file=sys.stderr)
        return 2
    perts = quant_perturbations(teacher, tensors, space.quant_mode)
    res = {"teacher": a.teacher, "task": a.task, "space": meas["space_name"], "measured": a.measured,
           "fisher": a.fisher, **compare(tensors, perts, meas["damage_kl_x1000"], fish["tensor_trace_per_weight"])}
    print(markdown(res))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
