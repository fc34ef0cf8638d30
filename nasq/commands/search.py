"""`nasq search`: supernet search under a size or latency budget (``nasq.run_search``)."""

from __future__ import annotations

from nasq import api
from nasq.commands._common import add_budget_flags, add_common, config_from_args, resume_base
from nasq.errors import NasqError


def cmd_search(args) -> int:
    if not args.out:
        raise NasqError("search needs --out DIR (the run directory).")
    api.run_search(config_from_args(args, resume_base(args)), args.out, resume=args.resume, overwrite=args.overwrite)
    return 0


def register(sub) -> None:
    s = sub.add_parser("search", help="supernet search under a size / latency budget")
    add_common(s)
    add_budget_flags(s)
    s.add_argument("--teacher", help="fp32 fine-tune run: starting weights and KD teacher")
    s.add_argument("--mode", choices=["bilevel", "single"], help="bi-level (DARTS) or single-level (EdMIPS)")
    s.set_defaults(fn=cmd_search)
