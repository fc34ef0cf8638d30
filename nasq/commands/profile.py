"""`nasq profile --model M --out lat.json`: a latency lookup table for a `--latency-ms` budget (`nasq search`, `nasq
baseline fisher|hessian|measured|random`, `nasq pipeline`)."""

from __future__ import annotations

import argparse

from nasq.contract.cost import save_latency_table
from nasq.contract.space import load_space
from nasq.errors import NasqError
from nasq.io import check_output_path
from nasq.profile import profile_latency


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "profile",
        help="measure int-kernel latency per (input width, bits) on this machine (for --latency-ms)",
        description=__doc__,
    )
    p.add_argument("--model", required=True, help="alias (minilm-l6), local model dir, or hub id")
    p.add_argument("--out", required=True, help="latency table JSON to write, e.g. lat.json")
    p.add_argument("--tokens", type=int, default=128, help="batch * sequence length of the workload (default 128)")
    p.add_argument("--seq-len", type=int,
                   help="sequence length of the workload (--tokens must be a multiple; attention grows with its "
                        "square); default: one sequence of --tokens tokens")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per entry; the median is kept (default 20)")
    p.add_argument("--space", help="search space (name or YAML): profile only its bit widths (default 1..8)")
    p.add_argument("--no-fixed", action="store_true",
                   help="do not estimate the unsearched remainder of a forward pass (fixed_ms = 0)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(fn=cmd_profile)


def cmd_profile(args: argparse.Namespace) -> int:
    check_output_path(args.out, args.overwrite)
    bits = None
    if args.space:
        bits = sorted({int(b) for r in load_space(args.space).rules for b in r.choices if int(b) != 0})
        if not bits:
            raise NasqError(f"search space {args.space} has no non-zero bit widths to profile")
    table = profile_latency(args.model, tokens=args.tokens, seq_len=args.seq_len, bits=bits, repeats=args.repeats,
                            measure_fixed=not args.no_fixed, log=print)
    save_latency_table(table, args.out, overwrite=args.overwrite)
    print(f"wrote {args.out}: {len(table.ms_per_row)} entries at {table.tokens} tokens, "
          f"fixed {table.fixed_ms:.4f} ms")
    return 0
