"""A Flax NNX BERT encoder (post-LN, HF naming) with classification / regression heads.

Attribute names follow Hugging Face's `BertModel`, so module paths read like HF's
(`encoder.layer.3.attention.self.query`) and checkpoints map one-to-one (see `nasq.models.loading`).
Every dense layer is a `Linear`; quantization swaps them for other modules by pure model surgery
(`nasq.models.surgery.replace_modules`) without touching this file.

Dropout is functional: `__call__` takes an optional PRNG key; `None` means deterministic (eval). The key
for each dropout site is `fold_in(key, site_id)`, so a training step is reproducible from (seed, step).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nasq.errors import NasqError
from nasq.io import read_json


class Internals(NamedTuple):
    """What a forward pass computes on the way to the logits, for distillation (``return_internals=True``).

    ``hidden``: ``L + 1`` arrays ``[batch, seq, hidden]``, the embeddings output, then every layer's output (HF's
    ``hidden_states``). ``attention``: ``L`` arrays ``[batch, heads, query, key]``, every layer's attention
    distribution before dropout (HF's ``attentions``); a padded key gets probability 0."""

    hidden: list
    attention: list


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The subset of HF `BertConfig` fields this model uses."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    pad_token_id: int = 0

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> BertConfig:
        model_type = d.get("model_type", "bert")
        if model_type not in ("bert",):
            raise NasqError(
                f"{source}: model_type {model_type!r} is not supported; nasq implements the BERT architecture "
                "(model_type 'bert', e.g. all-MiniLM-L6-v2, bert-base-uncased)."
            )
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise NasqError(f"{source}: only position_embedding_type 'absolute' is supported.")
        names = {f.name for f in dataclasses.fields(cls)}
        for key, (lo, hi) in _BOUNDS.items():
            if key not in d:
                continue
            v = d[key]
            ok = (type(v) is int if isinstance(lo, int) else isinstance(v, int | float) and not isinstance(v, bool)
                  and math.isfinite(v))
            if not ok or not lo <= v <= hi:
                kind = "an integer" if isinstance(lo, int) else "a finite number"
                raise NasqError(f"{source}: {key} must be {kind} in {lo}..{hi}, got {v!r}")
        cfg = cls(**{k: v for k, v in d.items() if k in names})
        if cfg.hidden_size % cfg.num_attention_heads:
            raise NasqError(
                f"{source}: hidden_size {cfg.hidden_size} is not divisible by num_attention_heads "
                f"{cfg.num_attention_heads}."
            )
        if not isinstance(cfg.hidden_act, str) or cfg.hidden_act not in _ACTIVATIONS:
            raise NasqError(f"{source}: hidden_act {cfg.hidden_act!r} unsupported; use one of {sorted(_ACTIVATIONS)}.")
        return cfg

    @classmethod
    def from_json(cls, path: str | Path) -> BertConfig:
        path = Path(path)
        if not path.exists():
            raise NasqError(f"{path}: config.json not found; a model directory needs an HF config.json.")
        return cls.from_dict(read_json(path, what="model config", max_bytes=2**20), source=str(path))

    def to_dict(self) -> dict:
        return {"model_type": "bert", **dataclasses.asdict(self)}

    def num_weights(self, num_labels: int) -> int:
        """Weights of every linear and embedding matrix of the classifier (LayerNorms and biases not counted)."""
        return sum(r * c for fam, r, c in self.module_dims(num_labels).values() if fam != "layernorm")

    def module_dims(self, num_labels: int) -> dict[str, tuple[str, int, int]]:
        """Every module of the classifier: ``{path: (family, rows, cols)}``, family ``linear`` (rows = outputs),
        ``embedding`` or ``layernorm``; paths relative to the BERT root (the head is ``classifier``)."""
        h, i = self.hidden_size, self.intermediate_size
        out = {"embeddings.word_embeddings": ("embedding", self.vocab_size, h),
               "embeddings.position_embeddings": ("embedding", self.max_position_embeddings, h),
               "embeddings.token_type_embeddings": ("embedding", self.type_vocab_size, h),
               "embeddings.LayerNorm": ("layernorm", h, h)}
        for n in range(self.num_hidden_layers):
            p = f"encoder.layer.{n}."
            out.update({p + "attention.self.query": ("linear", h, h), p + "attention.self.key": ("linear", h, h),
                        p + "attention.self.value": ("linear", h, h),
                        p + "attention.output.dense": ("linear", h, h),
                        p + "attention.output.LayerNorm": ("layernorm", h, h),
                        p + "intermediate.dense": ("linear", i, h), p + "output.dense": ("linear", h, i),
                        p + "output.LayerNorm": ("layernorm", h, h)})
        out.update({"pooler.dense": ("linear", h, h), "classifier": ("linear", num_labels, h)})
        return out

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


# What a config may say (inclusive): far beyond any BERT, small enough that a crafted config cannot ask for
# terabytes before a shape check runs.
_BOUNDS = {
    "vocab_size": (1, 2**22), "hidden_size": (1, 2**16), "num_hidden_layers": (1, 1024),
    "num_attention_heads": (1, 2**12), "intermediate_size": (1, 2**18), "max_position_embeddings": (1, 2**20),
    "type_vocab_size": (1, 2**12), "pad_token_id": (0, 2**22), "layer_norm_eps": (1e-30, 1.0),
    "hidden_dropout_prob": (0.0, 1.0), "attention_probs_dropout_prob": (0.0, 1.0),
}

_ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


def dropout(x: jax.Array, rate: float, key: jax.Array | None, site: int) -> jax.Array:
    """Inverted dropout at `rate`; identity when `key is None` (eval) or `rate == 0`."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(jax.random.fold_in(key, site), 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


class Linear(nnx.Module):
    """`y = x @ kernel + bias` with `kernel` of shape (in, out) (Flax layout; HF stores its transpose)."""

    def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs, std: float = 0.02):
        self.in_features = in_features
        self.out_features = out_features
        self.kernel = nnx.Param(std * jax.random.normal(rngs.params(), (in_features, out_features)))
        self.bias = nnx.Param(jnp.zeros((out_features,)))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x @ self.kernel[...] + self.bias[...]


class Embedding(nnx.Module):
    """Token-id lookup in a (num_embeddings, features) table."""

    def __init__(self, num_embeddings: int, features: int, *, rngs: nnx.Rngs, std: float = 0.02):
        self.num_embeddings = num_embeddings
        self.features = features
        self.embedding = nnx.Param(std * jax.random.normal(rngs.params(), (num_embeddings, features)))

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0)


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis, fp32 statistics (HF: `weight`/`bias`, here `scale`/`bias`)."""

    def __init__(self, features: int, eps: float):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((features,)))
        self.bias = nnx.Param(jnp.zeros((features,)))

    def __call__(self, x: jax.Array) -> jax.Array:
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        return (x - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]


class BertEmbeddings(nnx.Module):
    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.word_embeddings = Embedding(cfg.vocab_size, cfg.hidden_size, rngs=rngs)
        self.position_embeddings = Embedding(cfg.max_position_embeddings, cfg.hidden_size, rngs=rngs)
        self.token_type_embeddings = Embedding(cfg.type_vocab_size, cfg.hidden_size, rngs=rngs)
        self.LayerNorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)

    def __call__(self, input_ids, token_type_ids, key):
        seq = input_ids.shape[-1]
        if seq > self.cfg.max_position_embeddings:
            raise NasqError(
                f"sequence length {seq} exceeds max_position_embeddings {self.cfg.max_position_embeddings}; "
                "lower --set model.max_len."
            )
        x = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(jnp.arange(seq))[None]
            + self.token_type_embeddings(token_type_ids)
        )
        return dropout(self.LayerNorm(x), self.cfg.hidden_dropout_prob, key, 0)


class BertSelfAttention(nnx.Module):
    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        h = cfg.hidden_size
        self.query = Linear(h, h, rngs=rngs)
        self.key = Linear(h, h, rngs=rngs)
        self.value = Linear(h, h, rngs=rngs)

    def __call__(self, x, mask_bias, key):
        b, s, _ = x.shape
        nh, hd = self.cfg.num_attention_heads, self.cfg.head_dim

        def heads(t):
            return t.reshape(b, s, nh, hd)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.float32(hd)) + mask_bias
        probs = jax.nn.softmax(scores, axis=-1)
        dropped = dropout(probs, self.cfg.attention_probs_dropout_prob, key, 1)
        return jnp.einsum("bhqk,bkhd->bqhd", dropped, v).reshape(b, s, nh * hd), probs


class BertSelfOutput(nnx.Module):
    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.dense = Linear(cfg.hidden_size, cfg.hidden_size, rngs=rngs)
        self.LayerNorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)

    def __call__(self, h, residual, key):
        return self.LayerNorm(dropout(self.dense(h), self.cfg.hidden_dropout_prob, key, 2) + residual)


class BertAttention(nnx.Module):
    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.self = BertSelfAttention(cfg, rngs=rngs)
        self.output = BertSelfOutput(cfg, rngs=rngs)

    def __call__(self, x, mask_bias, key):
        """``(output, attention probabilities)``."""
        context, probs = self.self(x, mask_bias, key)
        return self.output(context, x, key), probs


class BertIntermediate(nnx.Module):
    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.act = cfg.hidden_act
        self.dense = Linear(cfg.hidden_size, cfg.intermediate_size, rngs=rngs)

    def __call__(self, x):
        return _ACTIVATIONS[self.act](self.dense(x))


class BertOutput(nnx.Module):
    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.dense = Linear(cfg.intermediate_size, cfg.hidden_size, rngs=rngs)
        self.LayerNorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)

    def __call__(self, h, residual, key):
        return self.LayerNorm(dropout(self.dense(h), self.cfg.hidden_dropout_prob, key, 3) + residual)


class BertLayer(nnx.Module):
    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.attention = BertAttention(cfg, rngs=rngs)
        self.intermediate = BertIntermediate(cfg, rngs=rngs)
        self.output = BertOutput(cfg, rngs=rngs)

    def __call__(self, x, mask_bias, key):
        """``(output, attention probabilities)``."""
        a, probs = self.attention(x, mask_bias, key)
        return self.output(self.intermediate(a), a, key), probs


class BertEncoder(nnx.Module):
    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.layer = nnx.List([BertLayer(cfg, rngs=rngs) for _ in range(cfg.num_hidden_layers)])

    def __call__(self, x, mask_bias, key, *, return_internals: bool = False):
        hidden, attention = [x], []
        for i, layer in enumerate(self.layer):
            x, probs = layer(x, mask_bias, None if key is None else jax.random.fold_in(key, 100 + i))
            hidden.append(x)
            attention.append(probs)
        return (x, Internals(hidden, attention)) if return_internals else (x, None)


class BertPooler(nnx.Module):
    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.dense = Linear(cfg.hidden_size, cfg.hidden_size, rngs=rngs)

    def __call__(self, x):
        return jnp.tanh(self.dense(x[:, 0]))


def attention_bias(attention_mask: jax.Array) -> jax.Array:
    """``[batch, 1, 1, seq]`` additive attention bias: 0 at real tokens, the most negative float32 at padding."""
    return jnp.where(attention_mask[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min)


class BertModel(nnx.Module):
    """BERT encoder + pooler. Returns `(sequence_output, pooled_output, Internals | None)`."""

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.embeddings = BertEmbeddings(cfg, rngs=rngs)
        self.encoder = BertEncoder(cfg, rngs=rngs)
        self.pooler = BertPooler(cfg, rngs=rngs)

    def __call__(self, input_ids, token_type_ids=None, attention_mask=None, *, key=None, return_internals=False):
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        mask_bias = attention_bias(attention_mask)
        x = self.embeddings(input_ids, token_type_ids, key)
        x, internals = self.encoder(x, mask_bias, key, return_internals=return_internals)
        return x, self.pooler(x), internals


class BertForSequenceClassification(nnx.Module):
    """BERT + dropout + linear head; `num_labels == 1` is regression (STS-B)."""

    def __init__(self, cfg: BertConfig, num_labels: int, *, rngs: nnx.Rngs):
        self.config = cfg
        self.num_labels = num_labels
        self.bert = BertModel(cfg, rngs=rngs)
        self.classifier = Linear(cfg.hidden_size, num_labels, rngs=rngs)

    def __call__(self, input_ids, token_type_ids=None, attention_mask=None, *, key=None, return_internals=False):
        """Logits `[batch, num_labels]`; with `return_internals`, `(logits, Internals)` (hidden states and
        attention distributions, for distillation)."""
        _, pooled, internals = self.bert(
            input_ids, token_type_ids, attention_mask, key=key, return_internals=return_internals
        )
        logits = self.classifier(dropout(pooled, self.config.hidden_dropout_prob, key, 4))
        return (logits, internals) if return_internals else logits


def empty_model(cfg: BertConfig, num_labels: int) -> BertForSequenceClassification:
    """``BertForSequenceClassification(cfg, num_labels)`` with every weight zero, built without running an
    initialiser: host (numpy) arrays, no XLA program compiled. For weights that are loaded right after
    (:func:`nasq.models.loading.load_pretrained`, :func:`nasq.contract.model_dir.load_model_dir`): a random
    initialisation of MiniLM costs seconds (one compiled program per weight shape, 12M normal draws) that a load
    throws away."""
    abstract = nnx.eval_shape(lambda: BertForSequenceClassification(cfg, num_labels, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    return nnx.merge(graphdef, jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), state))


def initial_head(model: BertForSequenceClassification, seed: int) -> Linear:
    """The classifier ``BertForSequenceClassification(model.config, model.num_labels, rngs=nnx.Rngs(seed))``
    starts with, without initialising the rest: the same key, the ``params`` stream's count after the encoder's
    initialisers (one per ``Linear`` / ``Embedding`` of ``model.bert``, built before the head)."""
    before = sum(isinstance(m, Linear | Embedding) for _, m in nnx.iter_graph(model.bert))
    rngs = nnx.Rngs(seed)
    rngs.params.count[...] = before
    return Linear(model.config.hidden_size, model.num_labels, rngs=rngs)
