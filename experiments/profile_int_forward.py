"""Where the integer forward's time goes (issue 17, item 4): the whole `IntBert` forward next to its parts, each
part jitted and timed on its own at the shape it has inside the model, interleaved, medians.

    python experiments/profile_int_forward.py ARTIFACT [--shapes 1x16,1x128,8x64,32x128] [--repeats 10]
        [--kernel native|xla] [--out experiments/results/profile_int_forward.jsonl]

Parts (each part of an encoder layer is timed over all layers in one jit, so one dispatch as in the whole
forward; the per-call dispatch of an empty jit is listed): embeddings (lookups + LayerNorm), q/k/v linears (activation quantization + integer GEMM +
epilogue + scatter of pruned rows, three of them), the attention core (scores, softmax, context), the attention
output linear, the FFN input linear, GELU, the FFN output linear, the two residual + LayerNorm, pooler +
classifier. `rest` is the whole forward minus the sum of the parts: what separate jits do not show (fusion across
parts makes it negative; dispatch and copies positive). The fp32 JAX forward of the same model is timed in the
same loop for the ratio.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from nasq.export.reader import load_artifact
from nasq.kernels import native
from nasq.kernels.int_bert import attention_core, embed, int_bert_forward, layer_norm, linear_apply
from nasq.models.bert import _ACTIVATIONS
from nasq.timing import environment, time_interleaved


def parts(model, batch: int, seq: int, kernel: str) -> dict:
    """{name: zero-arg callable} of every part at this shape, plus ``whole``; inputs are random but shaped as in
    the model (the values do not change the work)."""
    meta, params = model.meta, model.params
    cfg = meta.config
    eps, hid, inter = cfg.layer_norm_eps, cfg.hidden_size, cfg.intermediate_size
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(1000, 2000, (batch, seq)), jnp.int32)
    tt, am = jnp.zeros_like(ids), jnp.ones_like(ids)
    x = jnp.asarray(rng.standard_normal((batch, seq, hid)), jnp.float32)
    h = jnp.asarray(rng.standard_normal((batch, seq, inter)), jnp.float32)
    mask_bias = jnp.zeros((batch, 1, 1, seq), jnp.float32)
    meta_k = dataclasses.replace(meta, kernel=kernel)
    act = _ACTIVATIONS[cfg.hidden_act]
    e = params["embeddings"]

    def embeddings(e, ids, tt):
        y = embed(ids, e["word"]) + embed(jnp.arange(ids.shape[-1]), e["position"])[None] + embed(tt, e["type"])
        return layer_norm(y, e["ln"], eps)

    def qkv(lp, x):
        return [linear_apply(x, lp[n], kernel) for n in ("query", "key", "value")]

    def core(x):  # XLA's attention core on q = k = v = x (the q/k/v linears are timed on their own)
        b, s, _ = x.shape
        q = x.reshape(b, s, cfg.num_attention_heads, cfg.head_dim)
        return attention_core(q, q, q, mask_bias, "xla").reshape(b, s, -1)

    def res_ln(x, y, ln):
        return layer_norm(x + y, ln, eps)

    def head(p, x):
        return linear_apply(jnp.tanh(linear_apply(x[:, 0], p["pooler"], kernel)), p["classifier"], kernel)

    def bind(fn, *args):  # jit fn once, return a zero-arg call on these inputs
        jitted = jax.jit(fn)
        return lambda: jitted(*args)

    def every_layer(part):  # one jit over all layers (one dispatch, as in the whole forward)
        return lambda layers, *xs: [part(lp, *xs) for lp in layers]

    layers = params["layers"]
    return {
        "whole": bind(lambda p, i, t, m: int_bert_forward(meta_k, p, i, t, m), params, ids, tt, am),
        "embeddings": bind(embeddings, e, ids, tt),
        "qkv_linears": bind(every_layer(qkv), layers, x),
        "attention_core": bind(every_layer(lambda lp, x: core(x)), layers, x),
        "attn_out_linear": bind(every_layer(lambda lp, x: linear_apply(x, lp["attn_out"], kernel)), layers, x),
        "ffn_in_linear": bind(every_layer(lambda lp, x: linear_apply(x, lp["inter"], kernel)), layers, x),
        "gelu": bind(every_layer(lambda lp, h: act(h)), layers, h),
        "ffn_out_linear": bind(every_layer(lambda lp, h: linear_apply(h, lp["out"], kernel)), layers, h),
        "residual_layernorm_x2": bind(every_layer(lambda lp, x: (res_ln(x, x, lp["attn_ln"]),
                                                                 res_ln(x, x, lp["out_ln"]))), layers, x),
        "pooler_classifier": bind(head, params, x),
        "dispatch": bind(lambda i: i + 1, ids[:, :1]),
    }


def profile(artifact: str, shapes: list[tuple[int, int]], repeats: int, kernel: str) -> list[dict]:
    model = load_artifact(artifact, unpack="fused" if kernel == "xla" else "auto")  # panels only on native
    n_layers = model.meta.config.num_hidden_layers
    out = []
    for b, s in shapes:
        t = time_interleaved(parts(model, b, s, kernel), repeats)
        ms = {k: 1e3 * v for k, v in t.items()}
        whole, dispatch = ms.pop("whole"), ms.pop("dispatch")
        rec = {"bench": "profile-int-forward", "artifact": artifact, "kernel": kernel, "batch": b, "seq": s,
               "whole_ms": whole, "parts_ms": ms, "rest_ms": whole - sum(ms.values()), "dispatch_ms": dispatch,
               "layers": n_layers,
               "repeats": repeats, **environment()}
        rec["command"] = " ".join(["python", *sys.argv])
        out.append(rec)
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in rec.items()
                          if k in ("batch", "seq", "whole_ms", "rest_ms")}), flush=True)
    return out


def table(recs: list[dict]) -> str:
    names = list(recs[0]["parts_ms"])
    lines = ["| part | " + " | ".join(f"{r['batch']}x{r['seq']}" for r in recs) + " |",
             "|---|" + "---|" * len(recs)]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(
            f"{r['parts_ms'][n]:.2f} ms ({100 * r['parts_ms'][n] / r['whole_ms']:.0f}%)" for r in recs) + " |")
    lines.append("| one jit call's dispatch (in every part) | " + " | ".join(f"{r['dispatch_ms']:.3f} ms" for r in recs) + " |")
    lines.append("| rest (whole - parts) | " + " | ".join(f"{r['rest_ms']:.2f} ms" for r in recs) + " |")
    lines.append("| **whole forward** | " + " | ".join(f"**{r['whole_ms']:.2f} ms**" for r in recs) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact")
    ap.add_argument("--shapes", default="1x16,1x128,8x64,32x128")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--kernel", default="native" if native.available() else "xla", choices=("native", "xla"))
    ap.add_argument("--out", help="append the records (JSONL) here")
    a = ap.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")]
    recs = profile(a.artifact, shapes, a.repeats, a.kernel)
    print(table(recs))
    if a.out:
        with Path(a.out).open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in recs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
