"""`nasq inspect PATH`, `nasq plot PATH | --pareto RESULTS`, `nasq compare PLAN_A PLAN_B`; inspect and compare
take ``--damage-from MEASURED.json``: the predicted output KL of each plan before QAT.

PATH is a plan.json, a search run (pre-repair argmax of its gate logits), a QAT run (its model/plan.json) or an
exported artifact directory.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from nasq.commands._common import parse_plan_list
from nasq.errors import NasqError
from nasq.report.inspect import FORMATS, compare_plans, format_compare, load_sourced_plan, render


def cmd_inspect(args) -> int:
    print(render(args.path, args.format, args.damage_from), end="")
    return 0


def cmd_plot(args) -> int:
    from nasq.report import plots  # matplotlib: imported by the command that draws, not by every `nasq` start

    if args.pareto:
        out = Path(args.out or "report")
        budgets = [b for b in args.budgets.split(",") if b] if args.budgets else None
        methods = [m for m in args.methods.split(",") if m] if args.methods else None
        png = plots.plot_pareto(args.pareto, out if out.suffix == ".png" else out / "pareto.png", size=args.size,
                                budgets=budgets, methods=methods)
        print(f"wrote {png}")
        return 0
    if not args.path:
        raise NasqError("plot needs PATH (plan, search run, QAT run or artifact) or --pareto RESULTS")
    alloc = load_sourced_plan(args.path)
    src = Path(alloc.source)
    out = Path(args.out) if args.out else (src if src.is_dir() else src.parent) / "report"
    files = plots.write_report(alloc, out)
    for p in files.values():
        print(f"wrote {p}")
    return 0


def cmd_compare(args) -> int:
    cmp = compare_plans(args.plan_a, args.plan_b, args.damage_from)
    print(json.dumps(cmp, indent=1) + "\n" if args.format == "json" else format_compare(cmp), end="")
    return 0


DAMAGE_FROM = {
    "metavar": "PLAN.json[,PLAN.json...]", "type": parse_plan_list,
    "help": "add the predicted output KL before QAT from the damages a measured plan of the same model recorded "
            "(`nasq baseline measured`; several: pooled), beside uniform's within the same budget"}


def register(subparsers: argparse._SubParsersAction) -> None:
    i = subparsers.add_parser("inspect", help="bit allocation per layer x module (plan, search run, QAT run, "
                                              "artifact)")
    i.add_argument("path", help="plan.json, search run dir, QAT run dir or exported artifact dir")
    i.add_argument("--format", choices=FORMATS, default="table",
                   help="table (text), json, md (markdown) or rules (ordered pattern -> bits list)")
    i.add_argument("--damage-from", **DAMAGE_FROM)
    i.set_defaults(fn=cmd_inspect)

    p = subparsers.add_parser("plot", help="PNG plots + report.html of an allocation, or --pareto of results")
    p.add_argument("path", nargs="?", help="plan.json, search run dir, QAT run dir or exported artifact dir")
    p.add_argument("--out", help="output directory (default: <run or plan dir>/report); with --pareto also a "
                                 "FILE.png (default: <out>/pareto.png)")
    p.add_argument("--pareto", metavar="CSV_OR_DIR",
                   help="results CSV (or a directory of them): size (MB) vs metric per method")
    p.add_argument("--size", choices=["auto", "artifact_mb", "encoder_mb"], default="auto",
                   help="size column of --pareto (auto: artifact_mb where every row has it)")
    p.add_argument("--budgets", metavar="NAME[,NAME]",
                   help="--pareto: only these budgets' rows (the fp32 reference is always drawn)")
    p.add_argument("--methods", metavar="NAME[,NAME]",
                   help="--pareto: only these methods' rows (the fp32 reference is always drawn)")
    p.set_defaults(fn=cmd_plot)

    c = subparsers.add_parser("compare", help="tensors whose bits differ between two plans, and the totals")
    c.add_argument("plan_a", help="plan.json / run / artifact A")
    c.add_argument("plan_b", help="plan.json / run / artifact B")
    c.add_argument("--format", choices=["table", "json"], default="table")
    c.add_argument("--damage-from", **DAMAGE_FROM)
    c.set_defaults(fn=cmd_compare)
