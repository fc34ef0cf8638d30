"""`nasq eval RUN | --artifact A | RUN --artifact A`: dev metrics (fake-quant, integer path, or side by side)."""

from __future__ import annotations

import json

from nasq import api
from nasq.commands._common import add_common, config_from_args, run_config
from nasq.contract.model_dir import load_model_dir, model_dir_of
from nasq.data.tasks import load_task_data
from nasq.errors import NasqError
from nasq.evaluation import evaluate
from nasq.export.reader import compare_with_run


def cmd_eval(args) -> int:
    if args.artifact and args.run:
        cfg = config_from_args(args, run_config(args.run))
        print(json.dumps(compare_with_run(args.run, args.artifact, cfg), indent=2))
        return 0
    if args.artifact:
        print(json.dumps(api.evaluate(args.artifact, config_from_args(args)), indent=2))
        return 0
    if not args.run:
        raise NasqError("eval needs a RUN directory or --artifact FILE.")
    model, _meta = load_model_dir(args.run)
    cfg = config_from_args(args, run_config(args.run))
    data = load_task_data(cfg, model_dir=model_dir_of(args.run))
    res = evaluate(model, data, cfg.data.eval_batch_size)
    print(json.dumps({"task": data.task.name, "dev_rows": len(data.dev), **res}, indent=2))
    return 0


def register(sub) -> None:
    e = sub.add_parser("eval", help="dev-set metric of a run (fake-quant) or an artifact (int kernels)")
    e.add_argument("run", nargs="?", help="run directory")
    e.add_argument("--artifact", help="exported .nasq artifact (runs the integer kernels)")
    add_common(e, out=False)
    e.set_defaults(fn=cmd_eval)
