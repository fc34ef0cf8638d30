"""`nasq export RUN --out model.nasq` and `nasq predict --artifact model.nasq TEXT... [--pair TEXT]`."""

from __future__ import annotations

import argparse
import json

from nasq.errors import NasqError
from nasq.export.reader import predict_texts, read_manifest
from nasq.export.writer import export_artifact


def cmd_export(args) -> int:
    if not args.out:
        raise NasqError("export needs --out FILE (the artifact directory to write, e.g. model.nasq)")
    out = export_artifact(args.run, args.out, overwrite=args.overwrite)
    m = read_manifest(out)
    ratio = m["payload_vs_predicted"]
    print(f"wrote {out}: tensor payload {m['tensor_bytes']:,} bytes, cost model predicted {m['predicted_bytes']:,}"
          f" (ratio {ratio:.4f}); searched tensors {m['searched_tensor_bytes']:,} vs "
          f"{m['searched_predicted_bytes']:,} predicted")
    return 0


def cmd_predict(args) -> int:
    if not args.texts:
        raise NasqError("predict needs at least one TEXT")
    pairs = args.pair or None
    for res in predict_texts(args.artifact, args.texts, pairs, max_len=args.max_len):
        print(json.dumps(res))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    e = subparsers.add_parser("export", help="write a bit-packed integer artifact (model.nasq) from a QAT run")
    e.add_argument("run", help="QAT run directory (or its model/ directory)")
    e.add_argument("--out", help="artifact directory to write, e.g. model.nasq")
    e.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    e.set_defaults(fn=cmd_export)

    p = subparsers.add_parser("predict", help="classify texts with an exported artifact (integer kernels)")
    p.add_argument("--artifact", required=True, help="exported .nasq artifact directory")
    p.add_argument("texts", nargs="*", metavar="TEXT")
    p.add_argument("--pair", action="append", metavar="TEXT",
                   help="second segment for pair tasks (repeat once per TEXT, same order)")
    p.add_argument("--max-len", type=int, default=128, help="truncate inputs to this many tokens")
    p.set_defaults(fn=cmd_predict)
