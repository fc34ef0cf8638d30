"""Inference latency of nasq's integer artifact vs what users run today, in ONE process, calls interleaved.

Variants (same batch of random in-vocabulary tokens, full attention mask):
  nasq_int_load   nasq integer path, weights unpacked to int8 once at load
  nasq_int_fused  nasq integer path, sub-byte unpacking fused into every call (jit)
  nasq_fp32       the same model's fp32 JAX forward (QAT weights dequantized)
  torch_fp32      transformers BertForSequenceClassification (all-MiniLM-L6-v2), PyTorch fp32
  torch_dyn_int8  the same after torch.ao.quantization.quantize_dynamic(int8 Linear)

Usage (repo root): python experiments/bench_vs_torch.py ARTIFACT QAT_RUN [--batch 1 --seq 128 --repeats 20]
Prints one JSON line; the README / experiments/results/bench.md quote ratios from one such run.
torch is only needed here (the `parity` extra), never by nasq itself.
"""

import argparse
import json
import sys

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
    for mode in ("load", "fused"):
        m = load_artifact(a.artifact, unpack=mode)
        fns[f"nasq_int_{mode}"] = lambda m=m: m(j_ids, j_tt, j_am)
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
    t = time_interleaved(fns, a.repeats, warmup=3)
    ms = {k: round(1e3 * v, 2) for k, v in t.items()}
    base = t["nasq_fp32"]
    print(json.dumps({"bench": "infer-vs-torch", "batch": a.batch, "seq": a.seq, "repeats": a.repeats,
                      "median_ms": ms, "ratio_vs_nasq_fp32": {k: round(v / base, 3) for k, v in t.items()},
                      "torch_threads": a.threads, "torch": torch.__version__,
                      **environment(), "command": " ".join(["python", *sys.argv])}))


if __name__ == "__main__":
    main()
