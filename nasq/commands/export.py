"""`nasq export RUN --out model.nasq`, `nasq export SRC --format onnx --out model.onnx [--verify]` and
`nasq predict --artifact model.nasq TEXT... [--pair TEXT]`."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from nasq import api
from nasq.commands._common import config_from_args
from nasq.errors import NasqError
from nasq.export.format import MANIFEST
from nasq.export.reader import read_manifest


def _print_nasq(out) -> None:
    m = read_manifest(out)
    ratio = m["payload_vs_predicted"]
    print(f"wrote {out}: tensor payload {m['tensor_bytes']:,} bytes, cost model predicted {m['predicted_bytes']:,}"
          f" (ratio {ratio:.4f}); searched tensors {m['searched_tensor_bytes']:,} vs "
          f"{m['searched_predicted_bytes']:,} predicted")


def _export_onnx(args) -> int:
    from nasq.export.onnx import verify_onnx

    src = Path(args.run)
    with tempfile.TemporaryDirectory(prefix="nasq-onnx-") as tmp:
        if (src / MANIFEST).is_file():
            artifact = src
        else:  # a QAT run: its integer artifact first (the ONNX graph is built from the validated artifact)
            artifact = api.export_artifact(src, Path(tmp) / "model.nasq")
        rep = api.export_onnx(artifact, args.out, overwrite=args.overwrite)
        widths = ", ".join(f"{b}-bit {n:,}" for b, n in sorted(rep["weights_by_bits"].items()))
        print(f"wrote {rep['path']}: {rep['onnx_file_bytes']:,} bytes (opset {rep['opset']}); the nasq artifact's "
              f"tensors are {rep['nasq_tensor_bytes']:,} bytes (ONNX / nasq "
              f"{rep['onnx_file_bytes'] / rep['nasq_tensor_bytes']:.3f})")
        print(f"  quantized codes {rep['code_bytes_onnx']:,} bytes in ONNX containers vs {rep['code_bytes_nasq']:,} "
              f"at their own widths; per-row scales and row indices +{rep['extra_bytes']:,} bytes; linear weights "
              f"by bits: {widths or 'none'}")
        if args.verify:
            print(json.dumps(verify_onnx(args.out, artifact, config_from_args(args)), indent=2))
    return 0


def cmd_export(args) -> int:
    if not args.out:
        raise NasqError("export needs --out (the artifact directory to write, e.g. model.nasq; "
                        "with --format onnx a file, e.g. model.onnx)")
    if args.format == "onnx":
        return _export_onnx(args)
    if args.verify:
        raise NasqError("--verify compares an ONNX export with the integer path; use it with --format onnx "
                        "(for a .nasq artifact: nasq eval RUN --artifact OUT)")
    eval_cfg = config_from_args(args) if args.eval else None
    _print_nasq(api.export_artifact(args.run, args.out, overwrite=args.overwrite, eval_config=eval_cfg))
    return 0


def cmd_predict(args) -> int:
    if not args.texts:
        raise NasqError("predict needs at least one TEXT")
    pairs = args.pair or None
    for res in api.load(args.artifact).predict(args.texts, pairs, max_len=args.max_len):
        print(json.dumps(res))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    e = subparsers.add_parser("export", help="write a bit-packed integer artifact (model.nasq) or an ONNX model")
    e.add_argument("run", help="QAT run directory (or its model/ directory); with --format onnx also an artifact")
    e.add_argument("--out", help="artifact directory to write, e.g. model.nasq (--format onnx: a file, model.onnx)")
    e.add_argument("--format", choices=["nasq", "onnx"], default="nasq",
                   help="nasq: bit-packed artifact (default); onnx: ONNX model for ONNX Runtime (pip install "
                        "'nasq[onnx]'; docs/ARTIFACT_FORMAT.md, 'ONNX')")
    e.add_argument("--verify", action="store_true",
                   help="--format onnx: run the dev set through ONNX Runtime and nasq's integer path and print "
                        "both metrics and their prediction agreement")
    e.add_argument("--eval", action="store_true",
                   help="measure the dev metrics through the integer path and record them in the model card")
    e.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    g = e.add_argument_group("--eval / --verify data")
    g.add_argument("--task", help="GLUE task (default: the run's / artifact's)")
    g.add_argument("--data-dir", help="local GLUE directory, e.g. ../shared/data/glue")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. model.max_len=128")
    e.set_defaults(fn=cmd_export)

    p = subparsers.add_parser("predict", help="classify texts with an exported artifact (integer kernels)")
    p.add_argument("--artifact", required=True, help="exported .nasq artifact directory")
    p.add_argument("texts", nargs="*", metavar="TEXT")
    p.add_argument("--pair", action="append", metavar="TEXT",
                   help="second segment for pair tasks (repeat once per TEXT, same order)")
    p.add_argument("--max-len", type=int, default=128, help="truncate inputs to this many tokens")
    p.set_defaults(fn=cmd_predict)
