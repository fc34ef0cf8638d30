"""`nasq finetune`: fp32 fine-tune, or quantization-aware fine-tune of a plan (`--plan`) with KD (`--teacher`)."""

from __future__ import annotations

from nasq import api
from nasq.commands._common import add_common, config_from_args, resume_base
from nasq.errors import NasqError


def cmd_finetune(args) -> int:
    if not args.out:
        raise NasqError("finetune needs --out DIR (the run directory).")
    cfg = config_from_args(args, resume_base(args))
    api.finetune(cfg, args.out, resume=args.resume, overwrite=args.overwrite)
    return 0


def register(sub) -> None:
    f = sub.add_parser("finetune", help="fp32 fine-tune, or QAT with --plan and --teacher")
    add_common(f)
    f.add_argument("--plan", help="plan.json: quantization-aware fine-tune of this plan")
    f.add_argument("--teacher", help="fp32 run directory used as KD teacher")
    f.add_argument("--init-from", metavar="SEARCH_RUN",
                   help="with --plan: start QAT from this search run's trained weights and steps "
                        "(default: the teacher's weights, MSE-initialised steps)")
    f.set_defaults(fn=cmd_finetune)
