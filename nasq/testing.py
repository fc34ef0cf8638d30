"""Helpers for tests and smoke runs: a tiny random BERT checkpoint in HF layout.

`make_tiny_checkpoint(dir)` writes `config.json`, `model.safetensors` (HF tensor names, random weights) and the
MiniLM tokenizer files, so every code path that loads a real checkpoint can run on a 2-layer, hidden-32 model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from nasq.models.loading import resolve_model_dir

TINY_CONFIG = {
    "model_type": "bert", "vocab_size": 30522, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
    "intermediate_size": 64, "hidden_act": "gelu", "max_position_embeddings": 128, "type_vocab_size": 2,
    "layer_norm_eps": 1e-12, "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "pad_token_id": 0,
}


def make_tiny_checkpoint(path: str | Path, seed: int = 0, **overrides) -> Path:
    from safetensors.numpy import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = {**TINY_CONFIG, **overrides}
    rng = np.random.default_rng(seed)
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]

    def w(*shape):
        return (0.05 * rng.standard_normal(shape)).astype(np.float32)

    t = {
        "embeddings.word_embeddings.weight": w(v, h),
        "embeddings.position_embeddings.weight": w(cfg["max_position_embeddings"], h),
        "embeddings.token_type_embeddings.weight": w(cfg["type_vocab_size"], h),
        "embeddings.LayerNorm.weight": np.ones(h, np.float32),
        "embeddings.LayerNorm.bias": np.zeros(h, np.float32),
        "pooler.dense.weight": w(h, h),
        "pooler.dense.bias": w(h),
    }
    for layer in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{layer}."
        for name, (o, n) in {
            "attention.self.query": (h, h), "attention.self.key": (h, h), "attention.self.value": (h, h),
            "attention.output.dense": (h, h), "intermediate.dense": (i, h), "output.dense": (h, i),
        }.items():
            t[p + name + ".weight"] = w(o, n)
            t[p + name + ".bias"] = w(o)
        for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
            t[p + ln + ".weight"] = np.ones(h, np.float32)
            t[p + ln + ".bias"] = np.zeros(h, np.float32)
    save_file(t, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    src = resolve_model_dir("minilm-l6")
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (src / name).is_file():
            shutil.copyfile(src / name, path / name)
    return path


def bert_shapes(layers=6, hidden=384, ffn=1536, vocab=30522, embeddings=True) -> dict[str, tuple[int, int]]:
    """Module path -> (rows, cols) of a BERT (default: MiniLM-L6 dims): (out, in) for linears, (vocab, hidden)
    for embeddings; no weights are built."""
    shapes: dict[str, tuple[int, int]] = {}
    if embeddings:
        shapes["embeddings.word_embeddings"] = (vocab, hidden)
        shapes["embeddings.position_embeddings"] = (512, hidden)
        shapes["embeddings.token_type_embeddings"] = (2, hidden)
    for i in range(layers):
        p = f"encoder.layer.{i}"
        for n in ("query", "key", "value"):
            shapes[f"{p}.attention.self.{n}"] = (hidden, hidden)
        shapes[f"{p}.attention.output.dense"] = (hidden, hidden)
        shapes[f"{p}.intermediate.dense"] = (ffn, hidden)
        shapes[f"{p}.output.dense"] = (hidden, ffn)
    shapes["pooler.dense"] = (hidden, hidden)
    return shapes
