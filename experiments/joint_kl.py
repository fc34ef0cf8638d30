#!/usr/bin/env python
"""Joint output KL (x1000) of plans applied to the fp32 teacher (MSE-initialised steps, before QAT), on two
seeded 256-row train samples and on the dev set.

Usage: python experiments/joint_kl.py [--task T] TEACHER_RUN SPACE PLAN.json [PLAN.json ...]
(task default sst2; GLUE from ../shared/data/glue; SPACE gives the tensors' row groups, so any space with the
plans' groups, e.g. aqbert_128g_w12348 for plans of w1234 / w234 / w2348)
"""
import json
import sys

from nasq.baselines.allocators import baseline_model, baseline_tensors
from nasq.baselines.hessian import _train_batches
from nasq.baselines.measured import _Probe
from nasq.config import build_config
from nasq.contract.plan import Plan
from nasq.data.batching import eval_batches
from nasq.data.tasks import load_task_data

args = sys.argv[1:]
task = "sst2"
if args[:1] == ["--task"]:
    task, args = args[1], args[2:]
teacher, space, plans = args[0], args[1], args[2:]
cfg = build_config(("x", {"kd": {"teacher": teacher}, "search": {"space": space},
                          "data": {"task": task, "data_dir": "../shared/data/glue",
                                   "train_subset": 20000 if task == "sst2" else None}}))
model, model_dir, _ = baseline_model(cfg)
_, tensors = baseline_tensors(cfg, model)
data = load_task_data(cfg, model_dir=model_dir)
out = {}
rows = {"train256_seed0": _train_batches(data, 8, 32, 0), "train256_seed1": _train_batches(data, 8, 32, 1),
        "dev": list(eval_batches(data.dev, 64, data.buckets))}
for name, batches in rows.items():
    probe = _Probe(model, batches, tensors, "symmetric")
    for p in plans:
        bits = [t.bits for t in Plan.load(p).tensors]
        out.setdefault(p, {})[name] = round(1000 * probe.kl(probe.at_plan(bits)), 2)
print(json.dumps(out, indent=1))
