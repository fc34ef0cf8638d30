"""`nasq finalize RUN --out plan.json`: a search run's gates -> a discrete plan within the budget (the run's size
or latency budget, or a size budget given here)."""

from __future__ import annotations

import argparse

from nasq import api
from nasq.contract.cost import MB
from nasq.errors import NasqError
from nasq.io import check_output_path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "finalize",
        help="turn a search run's gate logits into plan.json (guaranteed within the size or latency budget)",
        description=__doc__,
    )
    p.add_argument("run", help="search run directory (holds search_result.json and alphas.safetensors)")
    p.add_argument("--out", required=True, help="plan.json to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    g = p.add_argument_group("budget override (default: the search run's size or latency budget; at most one)")
    g.add_argument("--budget-mb", type=float, help="size budget in MB (10^6 bytes)")
    g.add_argument("--avg-bits", type=float, help="size of every searched weight at this many bits")
    g.add_argument("--ratio", type=float, help="compression ratio vs fp32 of the searched tensors")
    g.add_argument("--convention", choices=["encoder", "artifact"], default=None,
                   help="--budget-mb covers the searched tensors (encoder, default) or the whole artifact")
    p.add_argument("--time-limit", type=float, default=20.0, help="MILP time limit in seconds (default 20)")
    p.add_argument("--spend-leftover", action="store_true",
                   help="spend bytes the optimal plan leaves unused: upgrade the groups whose wider choice loses "
                        "the least gate log-likelihood per extra byte, while any fits")
    p.set_defaults(fn=cmd_finalize)


def cmd_finalize(args: argparse.Namespace) -> int:
    check_output_path(args.out, args.overwrite)
    if args.convention and all(getattr(args, k) is None for k in ("budget_mb", "avg_bits", "ratio")):
        raise NasqError("--convention only applies together with --budget-mb")
    plan = api.finalize(args.run, args.out, avg_bits=args.avg_bits, budget_mb=args.budget_mb, ratio=args.ratio,
                        convention=args.convention or "encoder", spend_leftover=args.spend_leftover,
                        overwrite=args.overwrite, time_limit=args.time_limit)
    t, p = plan.totals, plan.provenance
    budget = plan.budget or {}
    line = (f"searched {t['searched_bytes'] / MB:.4f} MB / budget {budget.get('bytes', 0) / MB:.4f} MB "
            f"({budget.get('source', '?')}), avg {t['avg_bits']:.3f} bits, pruned {100 * t['pruned_fraction']:.1f}%")
    if t.get("artifact_tensor_bytes") is not None:
        line += f", artifact tensors {t['artifact_tensor_bytes'] / MB:.4f} MB"
    print(line)
    argmax = f"{p['argmax_bytes'] / MB:.4f} MB"
    if p.get("latency_ms") is not None:
        print(f"latency {p['latency_ms']:.4f} ms / budget {p['latency_budget_ms']:.4f} ms (the search's latency "
              "table)")
        argmax = f"{p['argmax_latency_ms']:.4f} ms"
    print(f"argmax plan {argmax} ({'fits' if p['argmax_within_budget'] else 'over budget'}), "
          f"{'kept' if p['argmax_within_budget'] else 'repaired'} by the {p['solver']} solver"
          f"{'' if p['optimal'] else ' (not proven optimal)'}")
    if p.get("spend_leftover") and p.get("latency_ms") is None:
        print(f"leftover spent: {t['searched_bytes'] - p['argmax_bytes']:+,} bytes vs the argmax plan, "
              f"{p['unused_bytes']:,} bytes of the budget unused")
    print(f"wrote {args.out}")
    return 0
