"""`nasq` command line: the parser and the error policy; every command lives in `nasq/commands/<name>.py`.

Every command shares the flags of `nasq.commands._common.add_common`; their values land in the one typed
`Config` (precedence: defaults < preset < --config FILE < flags < --set). User errors exit 2 with a
one-paragraph message and no traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

# transformers (tokenizers and configs only) advises on import that PyTorch is missing, which reads like an
# error to a user of a JAX tool: the CLI silences transformers' advisory warnings (a user's own setting wins).
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from nasq.commands import baseline, bench, eval, export, finalize, finetune, pipeline, profile, report, search
from nasq.commands._common import init_distributed_from_args
from nasq.compilation_cache import enable_compilation_cache
from nasq.errors import NasqError

# Subcommands in `nasq --help` order; each module defines `register(subparsers)`.
COMMANDS = (finetune, search, eval, bench, finalize, export, pipeline, report, baseline, profile)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nasq", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    parser = build_parser()
    args = parser.parse_args(argv)
    enable_compilation_cache()  # compiled programs kept on disk (nasq.compilation_cache; NASQ_COMPILATION_CACHE=0: off)
    try:
        init_distributed_from_args(args)
        return args.fn(args)
    except NasqError as e:
        print(f"nasq {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, read-only directory, permission denied, ...: the user's to fix
        where = f"{e.filename}: " if e.filename else ""
        print(f"nasq {args.command}: error: {where}{e.strerror or e}; check the path, its permissions and the free "
              "disk space, then run the same command again (add --resume for a run).", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nasq {args.command}: interrupted; continue with the same command plus --resume.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
