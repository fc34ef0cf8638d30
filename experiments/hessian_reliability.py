#!/usr/bin/env python
"""Split-half reliability of the Hessian baseline's Hutchinson traces (issue 16: does the baseline do what it
claims, "less sensitive groups get fewer bits"?).

``nasq baseline hessian`` scores row group g of a searched tensor by ``Tr(H_g)/n_g`` (Hutchinson, ``n_batches``
train batches x ``n_probes`` Rademacher probes; :mod:`nasq.baselines.hessian`). This computes that estimate twice,
with the protocol's recipe and two independent draws (seed S: batches and probes of the hessian cell of seed S;
seed S + 1000: other batches, other probes), and reports how far the two agree:

    groups      Spearman's rank correlation of the two estimates over every row group, and the share of groups
                whose estimate is <= 0 (clamped by the baseline) in each draw
    within      the same correlation inside each tensor (the groups of one tensor ranked against each other),
                the median over tensors: what a per-group allocation relies on
    tensors     the correlation of the per-tensor traces ``Tr(H_t)/n_t`` (the group traces pooled by weights)
    plans       with ``--avg-bits``: the Hessian plans of the two draws at that budget (the baseline's knapsack),
                per-group (``granularity=group``, the baseline as run) and per-tensor traces (``tensor``: HAWQ's
                layer-wise trace, every group of a tensor scored alike), and with ``--curvature fisher`` per
                weight too (``weight``: each weight's own curvature times its own error, nasq's
                ``--granularity weight``): the share of groups given the same bits, and how the groups spread
                over the widths; ``between``: the share of groups the per-tensor and per-weight plans of the
                same draw give the same bits (how far the two granularities differ, against how far two draws
                of one granularity do)

A per-group estimate whose two draws barely agree allocates noise; a trace pooled over the tensor is the first
remedy (on CoLA it removed most of the noise, not the sign of an indefinite loss Hessian: NOTES.md).
``--curvature fisher`` measures the same for the Gauss-Newton traces (``nasq baseline hessian --curvature fisher``:
exact over the rows, so the two draws differ only in their rows; never negative). Cost: two estimates (3-4
minutes each on CoLA with 32 Hessian-vector products, 2 cores). The data settings are nasq's defaults (the
protocol's for SST-2 and CoLA; MRPC's cells use a longer max length).

Usage (repo root):
    python experiments/hessian_reliability.py runs/protocol/cola/fp32 --task cola --data-dir ../shared/data/glue \\
        [--space aqbert_128g_w234] [--avg-bits 3] [--seed 0] [--n-batches 8] [--n-probes 4] \\
        [--curvature hutchinson|fisher] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from nasq.errors import NasqError


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (average ranks for ties are not needed: float estimates)."""
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1]) if len(a) > 1 else float("nan")


def tensor_pooled(traces: list[np.ndarray], tensors) -> np.ndarray:
    """``Tr(H_t)/n_t`` per tensor (:func:`nasq.baselines.hessian.pooled_traces`)."""
    from nasq.baselines.hessian import pooled_traces

    return np.array([float(x[0]) for x in pooled_traces(traces, tensors)])


def reliability(a: list[np.ndarray], b: list[np.ndarray], tensors) -> dict:
    fa, fb = np.concatenate(a), np.concatenate(b)
    within = [spearman(x, y) for x, y in zip(a, b) if len(x) > 1]
    return {"groups": int(fa.size), "spearman_groups": spearman(fa, fb),
            "nonpositive_share": [float((fa <= 0).mean()), float((fb <= 0).mean())],
            "spearman_within_tensor_median": float(np.median(within)),
            "spearman_within_tensor_quartiles": [float(np.quantile(within, q)) for q in (0.25, 0.75)],
            "spearman_tensors": spearman(tensor_pooled(a, tensors), tensor_pooled(b, tensors)),
            "trace_per_weight_quantiles": [float(np.quantile(fa, q)) for q in (0.0, 0.1, 0.5, 0.9, 1.0)]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("teacher", help="fp32 fine-tune run (nasq finetune without --plan)")
    p.add_argument("--task", required=True)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--space", default="aqbert_128g_w234")
    p.add_argument("--avg-bits", type=float, default=None, help="also compare the two draws' plans at this budget")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-batches", type=int, default=8)
    p.add_argument("--n-probes", type=int, default=4, help="Rademacher probes (hutchinson only)")
    p.add_argument("--curvature", choices=["hutchinson", "fisher"], default="hutchinson",
                   help="the Hessian (Hutchinson, default) or its Gauss-Newton part (exact, no probes)")
    p.add_argument("--train-subset", type=int, default=None,
                   help="draw the batches from a seeded subset of the train rows (default: every row, as the "
                   "protocol's hessian cells)")
    p.add_argument("--out", default=None, help="write every number as JSON")
    a = p.parse_args(argv)

    from nasq.baselines.hessian import (
        _train_batches,
        group_traces,
        hessian_utilities,
        pooled_traces,
        quant_perturbations,
        weight_curvatures,
        weighted_perturbations,
    )
    from nasq.contract.cost import size_budget, size_tables
    from nasq.models.surgery import model_param_shapes
    from nasq.search.finalize import allocate, choices_to_bits

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from sensitivity_probe import load_teacher

    try:
        cfg, teacher, data, space, tensors = load_teacher(a.teacher, a.task, a.data_dir, a.train_subset, a.seed,
                                                          a.space)
    except NasqError as e:
        print(f"hessian_reliability: error: {e}", file=sys.stderr)
        return 2

    draws, diagonals = [], []
    for seed in (a.seed, a.seed + 1000):
        t0 = time.time()
        batches = _train_batches(data, a.n_batches, cfg.train.batch_size, seed)
        diagonals.append(weight_curvatures(teacher, batches, tensors, is_regression=data.task.is_regression,
                                           n_probes=a.n_probes, seed=seed, curvature=a.curvature))
        draws.append(group_traces(teacher, batches, tensors, is_regression=data.task.is_regression,
                                  n_probes=a.n_probes, seed=seed, curvature=a.curvature, diagonals=diagonals[-1]))
        print(f"draw seed {seed}: {time.time() - t0:.0f} s", flush=True)
    out = {"teacher": a.teacher, "task": a.task, "space": a.space, "seed": a.seed, "n_batches": a.n_batches,
           "curvature": a.curvature, **({"n_probes": a.n_probes} if a.curvature == "hutchinson" else {}),
           "train_subset": a.train_subset, **reliability(*draws, tensors)}

    if a.avg_bits is not None:
        budget = size_budget(tensors, space, model_param_shapes(teacher), avg_bits=a.avg_bits)
        perts = quant_perturbations(teacher, tensors, space.quant_mode)
        out["plans"], by_gran = {}, {}
        grans = ("group", "tensor", "weight") if a.curvature == "fisher" else ("group", "tensor")
        for gran in grans:
            plans = []
            for tr, diag in zip(draws, diagonals, strict=True):
                if gran == "weight":  # as nasq.baselines.hessian.hessian_allocation(granularity="weight")
                    utils, _ = hessian_utilities([np.ones(t.num_groups) for t in tensors],
                                                 weighted_perturbations(teacher, tensors, space.quant_mode, diag))
                else:
                    utils, _ = hessian_utilities(pooled_traces(tr, tensors) if gran == "tensor" else tr, perts)
                alloc = allocate(utils, size_tables(tensors), budget.bytes, time_limit=20.0)
                plans.append(np.concatenate(choices_to_bits(tensors, alloc.choices)))
            by_gran[gran] = plans
            out["plans"][gran] = {"same_bits_share": float((plans[0] == plans[1]).mean()),
                                  "groups_per_width": [dict(sorted(Counter(map(int, x)).items())) for x in plans]}
        if "weight" in by_gran:
            out["plans"]["between"] = {"tensor_vs_weight_same_bits_share": [
                float((t == w).mean()) for t, w in zip(by_gran["tensor"], by_gran["weight"], strict=True)]}
    print(json.dumps(out, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
