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
A large supernet -> child drop means the gates had not become near one-hot: finalize's argmax picks a network
the supernet never trained. Prints JSON. Bad input exits with status 2 and a one-line error.
"""

import argparse
import json
import sys
from pathlib import Path

from nasq.errors import NasqError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("search_run")
    ap.add_argument("plan")
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--teacher", help="fp32 teacher run (default: the search's kd.teacher)")
    ap.add_argument("--tau", type=float, action="append", default=[], help="extra supernet temperature(s)")
    a = ap.parse_args(argv)
    from nasq.config import load_config
    from nasq.plan import Plan, apply_plan
    from nasq.search.restore import inherit_search_weights, restore_supernet
    from nasq.train.common import evaluate, load_model_dir, load_task_data, model_dir_of

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
        teacher, _ = load_model_dir(teacher_run)
        child = inherit_search_weights(a.search_run, plan, teacher)  # validates run and plan before evaluating
        data = load_task_data(cfg, model_dir=model_dir_of(teacher_run))
        bs = cfg.data.eval_batch_size
        out = {"search_run": a.search_run, "plan": a.plan, "task": data.task.name, "teacher_run": teacher_run,
               "teacher": evaluate(teacher, data, bs), "plan_on_teacher": evaluate(apply_plan(teacher, plan), data, bs),
               "supernet": {}, "child_of_search_weights": evaluate(child, data, bs)}
        for tau in [cfg.search.tau_end, *a.tau]:
            out["supernet"][f"tau={tau:g}"] = evaluate(restore_supernet(a.search_run, teacher, tau), data, bs)
    except NasqError as e:
        print(f"discretization_gap: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
