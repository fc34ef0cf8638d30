"""`nasq bench {train-step, search-step, infer}`: timing ratios measured side by side (`nasq.bench`)."""

from __future__ import annotations

from nasq import bench
from nasq.commands._common import add_budget_flags, add_common, config_from_args


def cmd_bench(args) -> int:
    return bench.main(args.what, config_from_args(args), args)


def register(sub) -> None:
    b = sub.add_parser("bench", help="timing ratios: train-step, search-step, infer")
    b.add_argument("what", choices=["train-step", "search-step", "infer"])
    b.add_argument("--batch-size", type=int, default=32)
    b.add_argument("--seq-len", type=int, default=64)
    b.add_argument("--repeats", type=int, default=10)
    b.add_argument("--artifact", action="append",
                   help="artifact for `bench infer`; repeat it to time more artifacts of the same model (other "
                        "plans) side by side with the first, in the same interleaved rounds")
    b.add_argument("--teacher", help="fp32 run directory: the weights of `bench infer`'s fp32 JAX baseline "
                   "(default: the artifact's architecture with random weights)")
    b.add_argument("--external", action="store_true",
                   help="`bench infer`: also PyTorch (fp32, quantize_dynamic int8) and ONNX Runtime (fp32, "
                        "quantize_dynamic int8, nasq's ONNX export) in the same rounds (extras parity + onnx)")
    b.add_argument("--threads", type=int, help="`bench infer --external`: PyTorch's and ONNX Runtime's threads "
                   "(default: the native kernel's)")
    add_common(b)
    add_budget_flags(b)
    b.set_defaults(fn=cmd_bench)
