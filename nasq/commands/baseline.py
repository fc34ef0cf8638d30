"""`nasq baseline {uniform,rule,hessian,fisher,measured,random,magnitude} --out plan.json`: a baseline plan in the plan.json format.

The model allocated for is the fp32 fine-tuned run `--teacher RUN` (recommended; the Hessian baseline needs a
trained head to mean anything), else the pretrained `--model`. Budgets (`--budget-mb` / `--avg-bits` /
`--ratio`, `--convention`) and the search space (`--space`) are the search's. `uniform` needs `--bits` and no
budget (it records the size it takes); `rule` is a hand allocation by module type: `--rule-bits
attention_qkv=3,attention_output=3 --bits 2` puts the named rules of the space at their widths and the others at
`--bits` (checked against a budget when one is given); `magnitude` needs `--bits` and a budget; `hessian` reads `--task` train
batches (`--train-subset`, `--set train.batch_size=N`, `--n-batches`, `--n-probes`); `fisher` is `hessian
--curvature fisher --granularity tensor --n-batches 16`, the allocation `nasq pipeline` uses by default
(`--granularity weight`: per weight; `--traces-from fisher.json` re-solves one at another budget or space from the
traces or errors it recorded, reading no data);
`random` uses `--seed`. `hessian`, `fisher`, `measured`, `random` and `magnitude` also take a latency budget
(`--latency-ms T --set search.latency_table=lat.json`, a `nasq profile` table): the plan's latency on that table is
within it (`magnitude` prunes its least-magnitude groups until it is).
"""

from __future__ import annotations

import argparse

from nasq.baselines.allocators import METHODS, allocate_plan
from nasq.baselines.hessian import CURVATURES, GRANULARITIES
from nasq.baselines.measured import SPREADS
from nasq.commands._common import add_budget_flags, add_common, config_from_args, parse_plan_list
from nasq.contract.cost import MB
from nasq.errors import NasqError
from nasq.io import check_output_path


def parse_rule_bits(text: str) -> dict[str, int]:
    """``"attention_qkv=3,attention_output=3"`` -> ``{"attention_qkv": 3, "attention_output": 3}``."""
    out: dict[str, int] = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        name, eq, bits = item.partition("=")
        if not eq or not name.strip() or not bits.strip().isdigit():
            raise argparse.ArgumentTypeError(f"{item!r}: expected RULE=BITS, e.g. attention_qkv=3")
        out[name.strip()] = int(bits)
    if not out:
        raise argparse.ArgumentTypeError("expected RULE=BITS[,RULE=BITS], e.g. attention_qkv=3,attention_output=3")
    return out


def register(subparsers) -> None:
    p = subparsers.add_parser("baseline", help="baseline plan.json: uniform, rule, hessian, fisher, measured, random or magnitude",
                              description=__doc__)
    p.add_argument("method", choices=METHODS)
    add_common(p)
    add_budget_flags(p)
    p.add_argument("--teacher", help="fp32 fine-tune run to allocate for (default: the pretrained --model)")
    p.add_argument("--bits", type=int, help="bit width of uniform / of the rules not in --rule-bits / of the kept "
                   "groups of magnitude")
    p.add_argument("--rule-bits", type=parse_rule_bits, metavar="RULE=BITS[,RULE=BITS]",
                   help="rule: widths of the space's rules by name, e.g. attention_qkv=3,attention_output=3")
    p.add_argument("--n-batches", type=int, default=None,
                   help="hessian: train batches per probe (default 8); fisher: train batches the traces sum over "
                   "(default 16); measured: train batches per forward (default 8)")
    p.add_argument("--n-probes", type=int, default=4,
                   help="hessian, measured --spread hessian: Rademacher probes (default 4)")
    p.add_argument("--damage-from", metavar="PLAN.json[,PLAN.json...]", type=parse_plan_list,
                   help="measured: re-solve at this budget from the damages a measured plan recorded (no forwards; "
                   "the plan's space may differ in widths, not in row groups or quantizer); "
                   "several plans (measured on other rows, e.g. other --seed): their damages pooled, weighted by "
                   "their rows")
    p.add_argument("--refine-rounds", type=int, default=0, metavar="R",
                   help="measured: re-measure each tensor's damage around the plan (the other tensors quantized) and "
                   "re-solve, R times; the plan of least measured output KL is kept (default 0)")
    p.add_argument("--min-tokens", type=int, default=0, metavar="L",
                   help="measured: measure on train rows of at least L tokens only (default 0: all rows)")
    p.add_argument("--spread", choices=SPREADS, default="rows",
                   help="measured: how a tensor's measured damage is split over its row groups: by rows (default), "
                   "by the Hessian estimate of each group at each width (hessian: Hutchinson, --n-probes) or by "
                   "its Gauss-Newton trace (fisher: exact, never negative); groups of one tensor may then get "
                   "different widths")
    p.add_argument("--granularity", choices=GRANULARITIES, default=None,
                   help="hessian (fisher: tensor unless given): score each row group by its own Hessian trace "
                   "(default), by its tensor's, "
                   "pooled over the tensor's groups (HAWQ's per-layer trace: less noisy, "
                   "experiments/hessian_reliability.py), or (weight, with --curvature fisher) by each weight's own "
                   "curvature times its own quantization error (Optimal Brain Damage's diagonal)")
    p.add_argument("--shrinkage", type=float, default=0.0, metavar="S",
                   help="fisher --granularity weight: shrink each weight's curvature toward its tensor's mean by the "
                   "fraction S in [0, 1], d_i' = (1-S) d_i + S mean_t(d): the plan blends the per-weight (S=0, the "
                   "default) and the per-tensor (S=1) estimates")
    p.add_argument("--curvature", choices=CURVATURES, default=None,
                   help="hessian: the curvature behind each trace: the loss Hessian, Hutchinson's estimate with "
                   "--n-probes probes (default), or its Gauss-Newton part (the Fisher of the model's predictions), "
                   "exact over the rows and never negative (no probes)")
    p.add_argument("--traces-from", metavar="PLAN.json",
                   help="fisher, hessian --granularity tensor: re-solve at this budget from the per-tensor traces a "
                   "fisher or hessian plan recorded (no data read: one estimate, a plan at every budget; a plan of "
                   "the same model, any space of its tensors, the same --curvature); --granularity weight: from "
                   "the per-group weighted errors a per-weight plan recorded (the same row groups, a subset of "
                   "its widths)")
    p.add_argument("--time-limit", type=float, default=20.0, help="MILP time limit in seconds (default 20)")
    p.set_defaults(fn=cmd_baseline)


def cmd_baseline(args: argparse.Namespace) -> int:
    if not args.out:
        raise NasqError("baseline needs --out plan.json")
    check_output_path(args.out, args.overwrite)
    plan = allocate_plan(args.method, config_from_args(args), bits=args.bits, rule_bits=args.rule_bits,
                         n_batches=args.n_batches, n_probes=args.n_probes, time_limit=args.time_limit,
                         damage_from=args.damage_from, refine_rounds=args.refine_rounds, min_tokens=args.min_tokens,
                         spread=args.spread, granularity=args.granularity,
                         curvature=args.curvature, traces_from=args.traces_from, shrinkage=args.shrinkage)
    plan.save(args.out, overwrite=args.overwrite)
    t = plan.totals
    line = (f"{args.method}: searched {t['searched_bytes'] / MB:.4f} MB, avg {t['avg_bits']:.3f} bits, "
            f"pruned {100 * t['pruned_fraction']:.1f}%")
    if plan.provenance.get("latency_ms") is not None:
        p = plan.provenance
        line += f", latency {p['latency_ms']:.4f} ms / budget {p['latency_budget_ms']:.4f} ms ({p['latency_table']})"
    elif plan.budget is not None:
        line += f", budget {plan.budget['bytes'] / MB:.4f} MB ({plan.budget['source']})"
    if t.get("artifact_tensor_bytes") is not None:
        line += f", artifact tensors {t['artifact_tensor_bytes'] / MB:.4f} MB"
    print(line)
    print(f"wrote {args.out}")
    return 0
