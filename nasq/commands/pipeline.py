"""`nasq pipeline`: finetune -> allocate (Fisher, measured, or search + finalize) -> QAT -> export -> eval
(`nasq.pipeline`)."""

from __future__ import annotations

from nasq.commands._common import add_common, user_layers
from nasq.errors import NasqError
from nasq.pipeline import ALLOCATORS, PRESETS, run_pipeline


def register(sub) -> None:
    p = sub.add_parser("pipeline",
                       help="finetune -> allocate (Fisher, measured or search) -> QAT -> export -> eval")
    p.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    p.add_argument("--teacher", help="reuse a finished fp32 fine-tune run instead of stage 1")
    p.add_argument("--allocator", choices=ALLOCATORS, default=ALLOCATORS[0],
                   help="how the plan is chosen: the Fisher allocation (default: each tensor's Gauss-Newton "
                   "trace times each width's quantization error, then the exact knapsack; about a minute, no "
                   "training), the measured allocation (each tensor's output damage measured at each width, the "
                   "same knapsack; minutes; level with Fisher or behind it under the protocol, see README "
                   "Results), or the supernet search + finalize (an hour); each takes a size budget or a latency budget "
                   "(--set search.latency_ms=T --set search.latency_table=lat.json)")
    p.add_argument("--refine-rounds", type=int, default=0, metavar="R",
                   help="--allocator measured: rounds of re-measuring around the plan (default 0; it did not help "
                   "on SST-2, see experiments/results/protocol/NOTES.md)")
    p.add_argument("--measure-batches", type=int, default=None, metavar="N",
                   help="--allocator measured, fisher: train batches the damages or traces are measured on "
                   "(default: the preset's: measured smoke 2, quick 8; fisher smoke 2, quick 16, as in the "
                   "protocol; more batches give steadier plans and take proportionally longer)")
    p.add_argument("--granularity", choices=("tensor", "weight"), default=None,
                   help="--allocator fisher: one Gauss-Newton trace per tensor times each group's error (default), "
                   "or each weight's own curvature times its own error, summed per group (weight: level with per "
                   "tensor at most rows, ahead or behind beyond the spread at a few, see README Results)")
    p.add_argument("--shrinkage", type=float, default=0.0, metavar="S",
                   help="--allocator fisher --granularity weight: shrink each weight's curvature toward its "
                   "tensor's mean, (1-S) * per weight + S * per tensor (default 0; S=1 gives the per-tensor plan; "
                   "0.5 was tried at six rows and not adopted, see README Results)")
    add_common(p)
    p.set_defaults(fn=cmd_pipeline)


def cmd_pipeline(args) -> int:
    if args.max_steps is not None:
        raise NasqError("pipeline: --max-steps is ambiguous across stages; set one stage's steps with "
                        "--set stages.{finetune,search,qat}.train.max_steps=N, or every stage's with "
                        "--set train.max_steps=N.")
    # --teacher is also recorded as kd.teacher: the stages that read it (search, QAT) get exactly that run
    layers = user_layers(args)
    out = args.out or "runs/pipeline"
    run_pipeline(out, preset=args.preset, user_layers=layers, teacher=args.teacher, resume=args.resume,
                 overwrite=args.overwrite, allocator=args.allocator, refine_rounds=args.refine_rounds,
                 measure_batches=args.measure_batches, granularity=args.granularity,
                 shrinkage=args.shrinkage)
    return 0
