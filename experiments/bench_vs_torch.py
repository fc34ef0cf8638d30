"""Inference latency of nasq's integer artifact vs what users run today, in ONE process, calls interleaved.

A thin client of ``nasq.bench.bench_infer(..., external=True)`` (the same as
``nasq bench infer --artifact ARTIFACT --teacher QAT_RUN --external``); variants, all on one batch of random
in-vocabulary tokens with a full attention mask:

  int_panels_ms    nasq's default integer path (native kernel: resident panels, native attention core)
  int_panels_xla_attention_ms  the same with XLA's attention core
  int_fused_ms     sub-byte unpacking fused into every call;  int_load_ms  weights unpacked to int8 at load (XLA)
  int_xla_ms       the XLA integer path (kernel="xla")
  fp32_ms          the QAT run's fp32 JAX forward (weights dequantized)
  torch_fp32_ms / torch_dyn_int8_ms   transformers BERT of the artifact's config, fp32 / quantize_dynamic int8
  ort_fp32_ms / ort_dyn_int8_ms       that model in ONNX Runtime, fp32 / quantize_dynamic int8
  ort_nasq_ms      ONNX Runtime on nasq's own ONNX export of ARTIFACT

Usage (repo root): python experiments/bench_vs_torch.py ARTIFACT QAT_RUN [--batch 1 --seq 128 --repeats 20]
Prints one JSON line (``ratio_*``: against ``fp32_ms``); experiments/results/bench.md quotes ratios from such runs.
Needs the ``parity`` (torch) and ``onnx`` extras; ``--threads`` sets torch's and ONNX Runtime's threads.
"""

import argparse
import json
import sys

from nasq.bench import bench_infer
from nasq.timing import environment


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact")
    ap.add_argument("run")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    res = bench_infer(a.artifact, a.run, a.batch, a.seq, a.repeats, external=True, threads=a.threads)
    print(json.dumps({"bench": "infer-vs-torch", **res, **environment(), "command": " ".join(["python", *sys.argv])}))


if __name__ == "__main__":
    main()
