"""Dev metric of a plan applied to the fp32 teacher *before* any QAT (quantization damage at step 0).

Usage: python experiments/prequant_eval.py TEACHER_RUN PLAN.json [PLAN.json ...] --data-dir ../shared/data/glue
"""

import argparse
import json

from nasq.config import build_config
from nasq.plan import Plan, apply_plan
from nasq.train.common import evaluate, load_model_dir, load_task_data, model_dir_of


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("teacher")
    ap.add_argument("plans", nargs="+")
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--task", default="sst2")
    a = ap.parse_args()
    cfg = build_config(("args", {"data": {"task": a.task, "data_dir": a.data_dir}}))
    teacher, _ = load_model_dir(a.teacher)
    data = load_task_data(cfg, model_dir=model_dir_of(a.teacher))
    out = {"teacher": evaluate(teacher, data, 64)}
    for p in a.plans:
        out[p] = evaluate(apply_plan(teacher, Plan.load(p)), data, 64)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
