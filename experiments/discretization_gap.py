#!/usr/bin/env python
"""Discretization gap of a finished search: dev metric of the trained supernet vs its discrete child, before QAT.

Usage: python experiments/discretization_gap.py SEARCH_RUN PLAN.json --data-dir ../shared/data/glue
           [--teacher RUN] [--tau 0.02 ...]

Evaluates on the task's dev set (the task, model and data settings of the search's config.yaml):
  teacher                  the fp32 teacher (default: the search's kd.teacher)
  plan_on_teacher          PLAN applied to the teacher, MSE-initialised steps (where the grid's QAT starts)
  supernet                 the trained supernet, soft gates, at the search's tau_end and each --tau, final price
  child_of_search_weights  PLAN applied to the search's weights with the search's steps (nasq.search.restore;
                           where `nasq finetune --init-from SEARCH_RUN` starts)
  gates                    how far the final gates (at tau_end) are from one-hot: the share of searched weights
                           in groups whose most likely width has probability < 0.9, and in groups whose pruning
                           probability is between 0.1 and 0.9 (`gate_sharpness`)
A large supernet -> child drop means the gates had not become near one-hot: finalize's argmax picks a network
the supernet never trained. `--gates-only` skips every evaluation. Prints JSON. Bad input exits with status 2
and a one-line error.
"""

import argparse
import json
import sys
from pathlib import Path

from nasq.errors import NasqError


def gate_sharpness(alphas, tensors, tau: float) -> dict[str, float]:
    """Weight-weighted shares of groups with ``max_c p_c < 0.9`` and with ``0.1 < p_pruned < 0.9``, where
    ``p = softmax(alpha / tau)`` per group (``alphas``: the effective logits finalize reads)."""
    import numpy as np

    n = unsure = half_pruned = 0.0
    for a, t in zip(alphas, tensors, strict=True):
        z = np.asarray(a, np.float64) / tau
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        w = np.asarray(t.group_sizes, np.float64) * t.cols
        n += w.sum()
        unsure += w[p.max(axis=1) < 0.9].sum()
        if 0 in t.choices:
            p0 = p[:, t.choices.index(0)]
            half_pruned += w[(p0 > 0.1) & (p0 < 0.9)].sum()
    return {"tau": tau, "share_max_prob_below_0.9": unsure / n, "share_prune_prob_0.1_to_0.9": half_pruned / n}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("search_run")
    ap.add_argument("plan")
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--teacher", help="fp32 teacher run (default: the search's kd.teacher)")
    ap.add_argument("--tau", type=float, action="append", default=[], help="extra supernet temperature(s)")
    ap.add_argument("--gates-only", action="store_true", help="only the gate statistics (no model evaluation)")
    a = ap.parse_args(argv)
    from nasq.config import load_config
    from nasq.contract.model_dir import load_model_dir, model_dir_of
    from nasq.contract.plan import Plan
    from nasq.contract.search_result import SearchResult
    from nasq.data.tasks import load_task_data
    from nasq.evaluation import evaluate
    from nasq.quant.apply import apply_plan
    from nasq.search.restore import inherit_search_weights, restore_supernet

    try:
        plan = Plan.load(a.plan)
        cfg_path = Path(a.search_run) / "config.yaml"
        if not cfg_path.is_file():
            raise NasqError(f"{a.search_run} is not a nasq search run ({cfg_path} not found).")
        cfg = load_config(cfg_path)
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"data_dir": a.data_dir})})
        teacher_run = a.teacher or cfg.kd.teacher
        if not teacher_run:
            raise NasqError(f"{a.search_run} was searched without a teacher; pass --teacher RUN.")
        res, alphas = SearchResult.load(a.search_run)
        tensors = list(res.tensors)
        out = {"search_run": a.search_run, "plan": a.plan, "task": cfg.data.task, "teacher_run": teacher_run,
               "gates": gate_sharpness(alphas, tensors, cfg.search.tau_end)}
        if a.gates_only:
            print(json.dumps(out, indent=2))
            return 0
        teacher, _ = load_model_dir(teacher_run)
        child = inherit_search_weights(a.search_run, plan, teacher)  # validates run and plan before evaluating
        data = load_task_data(cfg, model_dir=model_dir_of(teacher_run))
        bs = cfg.data.eval_batch_size
        out.update({"teacher": evaluate(teacher, data, bs),
                    "plan_on_teacher": evaluate(apply_plan(teacher, plan), data, bs),
                    "supernet": {}, "child_of_search_weights": evaluate(child, data, bs)})
        for tau in [cfg.search.tau_end, *a.tau]:
            out["supernet"][f"tau={tau:g}"] = evaluate(restore_supernet(a.search_run, teacher, tau), data, bs)
    except NasqError as e:
        print(f"discretization_gap: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
