#!/usr/bin/env python
"""Dev metric of a plan applied to the fp32 teacher *before* any QAT (quantization damage at step 0).

Usage: python experiments/prequant_eval.py TEACHER_RUN PLAN.json [PLAN.json ...] --data-dir ../shared/data/glue
           [--task sst2]
Bad input (a missing run or plan, an invalid plan) exits with status 2 and a one-line error.
"""

import argparse
import json
import sys

from nasq.errors import NasqError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("teacher")
    ap.add_argument("plans", nargs="+")
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--task", default="sst2")
    a = ap.parse_args(argv)
    from nasq.config import build_config
    from nasq.contract.model_dir import load_model_dir, model_dir_of
    from nasq.contract.plan import Plan
    from nasq.data.tasks import load_task_data
    from nasq.evaluation import evaluate
    from nasq.quant.apply import apply_plan

    try:
        plans = {p: Plan.load(p) for p in a.plans}  # validate every plan before loading the model
        cfg = build_config(("args", {"data": {"task": a.task, "data_dir": a.data_dir}}))
        teacher, _ = load_model_dir(a.teacher)
        data = load_task_data(cfg, model_dir=model_dir_of(a.teacher))
        out = {"teacher": evaluate(teacher, data, 64)}
        for p, plan in plans.items():
            out[p] = evaluate(apply_plan(teacher, plan), data, 64)
    except NasqError as e:
        print(f"prequant_eval: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
