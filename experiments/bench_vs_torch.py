"""Inference latency of nasq's integer artifact vs what users run today, in ONE process, calls interleaved.

Variants (same batch of random in-vocabulary tokens, full attention mask):
  nasq_int_load   nasq integer path, weights unpacked to int8 once at load
  nasq_int_fused  nasq integer path, sub-byte unpacking fused into every call (jit)
  nasq_int_panels nasq integer path, weights unpacked once into the native kernel's panels (native only)
  nasq_int_panels_xla_attention  the same with XLA's attention core instead of the native one (native only)
  nasq_fp32       the same model's fp32 JAX forward (QAT weights dequantized)
  torch_fp32      transformers BertForSequenceClassification (all-MiniLM-L6-v2), PyTorch fp32
  torch_dyn_int8  the same after torch.ao.quantization.quantize_dynamic(int8 Linear)
  ort_nasq        ONNX Runtime on nasq's own ONNX export of ARTIFACT (`nasq export --format onnx`)
  ort_fp32        ONNX Runtime on the PyTorch model exported to ONNX (torch.onnx.export, opset 17)
  ort_dyn_int8    the same after onnxruntime.quantization.quantize_dynamic (int8 weights, QInt8)

Usage (repo root): python experiments/bench_vs_torch.py ARTIFACT QAT_RUN [--batch 1 --seq 128 --repeats 20]
Prints one JSON line; the README / experiments/results/bench.md quote ratios from one such run.
torch is only needed here (the `parity` extra), onnxruntime for the ort_* variants (the `onnx` extra; skipped
without it), never by nasq itself. `--threads` sets torch's and ORT's intra-op threads.
"""

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact")
    ap.add_argument("run")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()

    import jax
    import torch
    from flax import nnx
    from transformers import BertForSequenceClassification

    from nasq.bench import dequantized_fp32_model
    from nasq.contract.model_dir import load_model_dir
    from nasq.export.reader import load_artifact
    from nasq.models.loading import resolve_model_dir
    from nasq.timing import environment, time_interleaved

    torch.set_num_threads(a.threads)
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 30000, (a.batch, a.seq)).astype(np.int32)
    ids[:, 0] = 101
    j_ids, j_tt, j_am = jnp.asarray(ids), jnp.zeros((a.batch, a.seq), jnp.int32), jnp.ones((a.batch, a.seq), jnp.int32)
    t_ids = torch.tensor(ids, dtype=torch.long)
    t_am = torch.ones_like(t_ids)

    fns = {}
    from nasq.kernels.native import resolve_kernel

    for mode in ("load", "fused", "panels") if resolve_kernel() == "native" else ("load", "fused"):
        m = load_artifact(a.artifact, unpack=mode)
        fns[f"nasq_int_{mode}"] = lambda m=m: m(j_ids, j_tt, j_am)
        if mode == "panels":
            mx = type(m)(dataclasses.replace(m.meta, attention="xla"), m.params)
            fns["nasq_int_panels_xla_attention"] = lambda mx=mx: mx(j_ids, j_tt, j_am)
    fp, _ = load_model_dir(a.run)
    fp = dequantized_fp32_model(fp)
    gd, st = nnx.split(fp)
    fwd = jax.jit(lambda s, x, y, z: nnx.merge(gd, s)(x, y, z))
    fns["nasq_fp32"] = lambda: fwd(st, j_ids, j_tt, j_am)
    tm = BertForSequenceClassification.from_pretrained(str(resolve_model_dir("minilm-l6")), num_labels=2).eval()
    tq = torch.ao.quantization.quantize_dynamic(tm, {torch.nn.Linear}, dtype=torch.qint8)

    def run_torch(model):
        with torch.inference_mode():
            return model(input_ids=t_ids, attention_mask=t_am).logits

    fns["torch_fp32"] = lambda: run_torch(tm)
    fns["torch_dyn_int8"] = lambda: run_torch(tq)
    versions = {"torch": torch.__version__}
    tmp = tempfile.TemporaryDirectory(prefix="nasq-bench-")
    try:
        import onnxruntime as ort
        from onnxruntime.quantization import QuantType, quantize_dynamic

        from nasq.export.onnx import export_onnx, load_onnx
    except ImportError:
        ort = None
    if ort is not None:
        versions["onnxruntime"] = ort.__version__
        d = Path(tmp.name)
        export_onnx(a.artifact, d / "nasq.onnx")
        om = load_onnx(d / "nasq.onnx", threads=a.threads)
        fns["ort_nasq"] = lambda: om(ids, np.zeros_like(ids), np.ones_like(ids))
        names = ["input_ids", "attention_mask", "token_type_ids"]
        torch.onnx.export(tm, (t_ids, t_am, torch.zeros_like(t_ids)), str(d / "fp32.onnx"), input_names=names,
                          output_names=["logits"], dynamic_axes={n: {0: "batch", 1: "seq"} for n in names},
                          opset_version=17, dynamo=False)
        quantize_dynamic(str(d / "fp32.onnx"), str(d / "int8.onnx"), weight_type=QuantType.QInt8)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = a.threads
        feed = {"input_ids": ids.astype(np.int64), "attention_mask": np.ones_like(ids, np.int64),
                "token_type_ids": np.zeros_like(ids, np.int64)}
        for name, f in (("ort_fp32", "fp32.onnx"), ("ort_dyn_int8", "int8.onnx")):
            sess = ort.InferenceSession(str(d / f), opts, providers=["CPUExecutionProvider"])
            fns[name] = lambda sess=sess: sess.run(None, feed)[0]
    t = time_interleaved(fns, a.repeats, warmup=3)
    ms = {k: round(1e3 * v, 2) for k, v in t.items()}
    base = t["nasq_fp32"]
    print(json.dumps({"bench": "infer-vs-torch", "batch": a.batch, "seq": a.seq, "repeats": a.repeats,
                      "median_ms": ms, "ratio_vs_nasq_fp32": {k: round(v / base, 3) for k, v in t.items()},
                      "threads": a.threads, **versions,
                      **environment(), "command": " ".join(["python", *sys.argv])}))


if __name__ == "__main__":
    main()
