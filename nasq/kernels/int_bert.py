"""Inference-only integer BERT classifier built from artifact tensors (``nasq.export.reader``).

It mirrors ``nasq.models.bert.BertForSequenceClassification`` (eval mode, no dropout) op for op, with every
quantized linear replaced by the integer kernel of ``nasq.kernels.int_linear``::

    x   = LN(E_word[ids] + E_pos[0..s) + E_type[tt])          E_* = codes[ids] * row_scale[ids] (int) or fp32
    per layer:
      q, k, v = IntLinear(x)                                  int8 act x int8/packed W, int32 acc, per-group dequant
      ctx_h   = softmax(q_h k_h^T / sqrt(d) + mask) v_h        only for heads in ``active_heads`` (see below)
      a       = LN(IntLinear(ctx) + x)
      x       = LN(IntLinear(act(IntLinear(a))) + a)
    logits = Linear_cls(tanh(Linear_pool(x[:, 0])))          fp32 or int, as the plan says

LayerNorm, softmax and GELU are the fp32 formulas of ``nasq.models.bert`` (shared code, not copies).

**Dropped heads.** In the fake-quant model a pruned row has zero weight *and* zero bias, so a head whose
``value`` rows are all pruned has ``v_h == 0`` and contributes exactly zero context, whatever its
attention probabilities. Such heads are left out of the attention computation (a static head list per
layer); their context slice is zero. Pruned rows of every linear are never unpacked nor multiplied
(``PackedLinear`` does not store them; the output is scattered back, zeros at pruned rows).

**Unpacking.** ``unpack="auto"`` (default) is ``"panels"`` where the native kernel runs, else ``"fused"``.
``unpack="fused"`` keeps the packed uint8 weights resident and unpacks inside the
jitted forward on every call (XLA fuses the shifts/masks into the consumer); ``unpack="load"`` unpacks once at
load time and keeps int8 codes resident (4x/2x more memory for sub-byte widths, usually faster on CPU);
``unpack="panels"`` (native kernel only) unpacks once at load time into the native kernel's own panel layout
(about 1 byte per weight; ``native.prepack_segments``), so no call unpacks anything. All three give
bit-identical outputs. Panels cost 0.67x the time of fused at 1 x 16 tokens and 0.88-0.98x at 8 x 64 and
1 x 128 on the avg-2.5 SST-2 model (``experiments/results/bench.md``).

**Kernels.** ``IntBertMeta.kernel`` (``"auto"`` | ``"native"`` | ``"xla"``; None: the ``NASQ_KERNEL`` environment
variable) selects the integer GEMM of every quantized linear (``nasq.kernels.int_linear``, module docstring)
and the attention core (native: ``nasq.kernels.native.attention``, the same fp32 formula with the (batch, head)
pairs on all threads, equal to XLA's up to fp32 rounding; XLA CPU runs its batched dots on one thread;
``IntBertMeta.attention`` = ``"native"`` / ``"xla"`` chooses it apart from the GEMM's path, for comparisons);
with the native kernel, ``"panels"`` (the default there) spends no time unpacking and ``"fused"`` reads the
fewest bytes.

Everything runs under one ``jax.jit`` per ``(batch, seq)`` shape: weights are pytree leaves, the config,
head lists and bit widths are static aux data.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nasq.errors import NasqError
from nasq.kernels import native
from nasq.kernels.int_linear import (
    EmbeddingTable,
    PackedLinear,
    embedding_lookup,
    kept_rows_apply,
    packed_linear_apply,
    scatter_rows,
    xla_rows_apply,
)
from nasq.models.bert import _ACTIVATIONS, BertConfig
from nasq.quant.packing import unpack_codes
from nasq.quant.quantizer import quantize_act_int8

UNPACK_MODES = ("auto", "fused", "load", "panels")


# ------------------------------------------------------------------------------------------- linear kinds
@jax.tree_util.register_pytree_node_class
@dataclass(frozen=True, eq=False)
class Fp32Linear:
    """Unquantized linear: ``x @ kernel + bias`` with ``kernel`` (in, out), as ``nasq.models.bert.Linear``."""

    kernel: Any
    bias: Any

    def tree_flatten(self):
        return (self.kernel, self.bias), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children)


@jax.tree_util.register_pytree_node_class
@dataclass(frozen=True, eq=False)
class ResidentLinear:
    """A ``PackedLinear`` unpacked once: int8 codes ``[R_kept, in]`` + derived row scales (``unpack="load"``).

    Same arithmetic as ``packed_linear_apply`` (bit-identical outputs), without the per-call unpack.
    """

    codes: Any
    row_scale: Any
    bias: Any
    out_index: Any
    out_features: int

    @classmethod
    def from_packed(cls, p: PackedLinear) -> ResidentLinear:
        """Unpack on the host with numpy (one pass, no per-shape compilation)."""
        if p.segments:
            parts = [unpack_codes(np.asarray(pk), b, p.in_features, xp=np) for b, pk in p.segments]
            codes = np.concatenate(parts, axis=0)
            row_scale = np.repeat(np.asarray(p.group_scale, np.float32), np.asarray(p.kept_group_sizes))
        else:
            codes, row_scale = np.zeros((0, p.in_features), np.int8), np.zeros((0,), np.float32)
        return cls(jnp.asarray(codes), jnp.asarray(row_scale), p.bias, p.out_index, p.out_features)

    def tree_flatten(self):
        return (self.codes, self.row_scale, self.bias, self.out_index), self.out_features

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, aux)


def resident_linear_apply(x, p: ResidentLinear, kernel: str | None = None):
    """``packed_linear_apply(x, packed, "scatter", kernel)`` with pre-unpacked codes (the native kernel reads
    them as 8-bit packed rows: int8 codes reinterpreted as uint8 are exactly that layout)."""
    x = jnp.asarray(x, jnp.float32)
    lead = x.shape[:-1]
    if p.codes.shape[0] == 0:
        return jnp.zeros((*lead, p.out_features), jnp.float32)
    xq, sx = quantize_act_int8(x)
    if native.resolve_kernel(kernel) == "native":
        segments = ((8, jax.lax.bitcast_convert_type(p.codes, jnp.uint8)),)
        y = kept_rows_apply(xq, sx, segments, p.row_scale, p.bias, "native")
    else:
        y = xla_rows_apply(xq, sx, p.codes, p.row_scale, p.bias)
    return scatter_rows(y, p.out_index, p.out_features)


@jax.tree_util.register_pytree_node_class
@dataclass(frozen=True, eq=False)
class PanelLinear:
    """A ``PackedLinear`` unpacked once into the native kernel's resident panels (``unpack="panels"``).

    ``panels``: ``((bits, rows, uint8 [bytes]), ...)`` per segment for the concrete ``isa``; the same outputs as
    ``packed_linear_apply(..., kernel="native")``, bit for bit, without unpacking per call.
    """

    panels: tuple
    isa: str
    in_features: int
    row_scale: Any
    bias: Any
    out_index: Any
    out_features: int

    @classmethod
    def from_packed(cls, p: PackedLinear) -> PanelLinear:
        isa, panels = native.prepack_segments(p.segments, p.in_features) if p.segments else (
            native.resolved_isa(), ())
        panels = tuple((b, r, jnp.asarray(w)) for b, r, w in panels)
        return cls(panels, isa, p.in_features, p.row_scale, p.bias, p.out_index, p.out_features)

    def tree_flatten(self):
        meta = tuple((b, r) for b, r, _ in self.panels)
        bufs = tuple(w for _, _, w in self.panels)
        return (bufs, self.row_scale, self.bias, self.out_index), (meta, self.isa, self.in_features,
                                                                   self.out_features)

    @classmethod
    def tree_unflatten(cls, aux, children):
        meta, isa, in_features, out_features = aux
        bufs, row_scale, bias, out_index = children
        panels = tuple((b, r, w) for (b, r), w in zip(meta, bufs, strict=True))
        return cls(panels, isa, in_features, row_scale, bias, out_index, out_features)


def panel_linear_apply(x, p: PanelLinear):
    """``packed_linear_apply(x, packed, "scatter", "native")`` on resident panels."""
    x = jnp.asarray(x, jnp.float32)
    lead = x.shape[:-1]
    if not p.panels:
        return jnp.zeros((*lead, p.out_features), jnp.float32)
    return native.linear(x, p.panels, p.row_scale, p.bias, p.out_index, p.out_features, panels_isa=p.isa)


def linear_apply(x, lin, kernel: str | None = None):
    """Dispatch on the linear kind (static pytree type); ``kernel`` selects the integer GEMM."""
    if isinstance(lin, PackedLinear):
        return packed_linear_apply(x, lin, output="scatter", kernel=kernel)
    if isinstance(lin, ResidentLinear):
        return resident_linear_apply(x, lin, kernel)
    if isinstance(lin, PanelLinear):  # the native kernel by construction (panels exist only for it)
        return panel_linear_apply(x, lin)
    if isinstance(lin, Fp32Linear):
        return x @ lin.kernel + lin.bias
    raise TypeError(f"unknown linear kind {type(lin).__name__}")


def embed(ids, emb):
    """Lookup in an int (``EmbeddingTable``) or fp32 (``[vocab, hidden]`` array) table."""
    if isinstance(emb, EmbeddingTable):
        return embedding_lookup(ids, emb)
    return jnp.take(emb, ids, axis=0)


def layer_norm(x, ln, eps: float):
    """``nasq.models.bert.LayerNorm`` with ``ln = (scale, bias)``."""
    scale, bias = ln
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * scale + bias


# ------------------------------------------------------------------------------------------------ forward
@dataclass(frozen=True)
class IntBertMeta:
    """Static (hashable) metadata of an ``IntBert``."""

    config: BertConfig
    num_labels: int
    active_heads: tuple[tuple[int, ...], ...]  # per layer: heads whose value rows are not all pruned
    unpack: str = "auto"
    kernel: str | None = None  # integer GEMM: "auto" | "native" | "xla"; None: NASQ_KERNEL (default "auto")
    attention: str | None = None  # attention core: "native" | "xla"; None: the integer GEMM's path


def attention_core(q, k, v, mask_bias, core: str):
    """Context ``[B, S, H, D]`` of ``q, k, v [B, S, H, D]`` under ``mask_bias [B, 1, 1, S]`` (0 or the fp32 min):

        ctx[b, i, h] = sum_j softmax_j(q[b, i, h] . k[b, j, h] / sqrt(D) + mask_bias[b, j]) v[b, j, h]

    ``core="native"``: one native call (``nasq.kernels.native.attention``; XLA CPU runs the batched dots on one
    thread); anything else: XLA's einsums. Equal to fp32 rounding."""
    if core == "native":
        b, s = q.shape[:2]
        return native.attention(q, k, v, mask_bias.reshape(b, s))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.float32(q.shape[-1])) + mask_bias
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)


def _attention(x, lp, mask_bias, cfg: BertConfig, heads: tuple[int, ...], kernel: str | None,
               core: str | None = None):
    b, s, _ = x.shape
    nh, hd = cfg.num_attention_heads, cfg.head_dim
    if not heads:  # every value row pruned: the context is exactly zero
        return jnp.zeros((b, s, nh * hd), jnp.float32)

    def split(t):
        return t.reshape(b, s, nh, hd)

    q, k, v = (split(linear_apply(x, lp[n], kernel)) for n in ("query", "key", "value"))
    if len(heads) < nh:
        idx = np.asarray(heads)
        q, k, v = q[:, :, idx], k[:, :, idx], v[:, :, idx]
    ctx = attention_core(q, k, v, mask_bias, core or native.resolve_kernel(kernel))
    if len(heads) < nh:
        ctx = jnp.zeros((b, s, nh, hd), jnp.float32).at[:, :, np.asarray(heads)].set(ctx)
    return ctx.reshape(b, s, nh * hd)


def int_bert_forward(meta: IntBertMeta, params: dict, input_ids, token_type_ids, attention_mask):
    """Logits ``[batch, num_labels]`` (pure; jit with ``meta`` static)."""
    cfg = meta.config
    eps = cfg.layer_norm_eps
    seq = input_ids.shape[-1]
    mask_bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min)
    e = params["embeddings"]
    x = embed(input_ids, e["word"]) + embed(jnp.arange(seq), e["position"])[None] + embed(token_type_ids, e["type"])
    x = layer_norm(x, e["ln"], eps)
    act = _ACTIVATIONS[cfg.hidden_act]
    kern = meta.kernel
    for lp, heads in zip(params["layers"], meta.active_heads, strict=True):
        ctx = _attention(x, lp, mask_bias, cfg, heads, kern, meta.attention)
        a = layer_norm(linear_apply(ctx, lp["attn_out"], kern) + x, lp["attn_ln"], eps)
        h = act(linear_apply(a, lp["inter"], kern))
        x = layer_norm(linear_apply(h, lp["out"], kern) + a, lp["out_ln"], eps)
    pooled = jnp.tanh(linear_apply(x[:, 0], params["pooler"], kern))
    return linear_apply(pooled, params["classifier"], kern)


@jax.tree_util.register_pytree_node_class
class IntBert:
    """Integer BERT classifier: ``IntBert(input_ids, token_type_ids, attention_mask) -> logits``.

    Build it with ``nasq.export.reader.load_artifact``. ``params`` is a pytree (dicts of ``PackedLinear`` /
    ``ResidentLinear`` / ``Fp32Linear`` / ``EmbeddingTable`` / arrays); ``meta`` is static.
    """

    def __init__(self, meta: IntBertMeta, params: dict, manifest: dict | None = None):
        if meta.unpack not in UNPACK_MODES:
            raise NasqError(f"unpack={meta.unpack!r}; use one of {UNPACK_MODES}")
        if meta.attention not in (None, "native", "xla"):
            raise NasqError(f"attention={meta.attention!r}; use 'native', 'xla' or None (the integer GEMM's path)")
        if meta.attention == "native":
            native.resolve_kernel("native")  # a clear error where the native library cannot run
        if meta.unpack == "auto":
            meta = replace(meta, unpack="panels" if native.resolve_kernel(meta.kernel) == "native" else "fused")
        if meta.unpack in ("load", "panels"):
            if meta.unpack == "panels" and native.resolve_kernel(meta.kernel) != "native":
                raise NasqError("unpack='panels' lays the weights out for the native kernel, which is not in use "
                                f"here ({native.describe(meta.kernel)}); use unpack='fused' or 'load'")
            make = ResidentLinear.from_packed if meta.unpack == "load" else PanelLinear.from_packed
            params = jax.tree.map(
                lambda leaf: make(leaf) if isinstance(leaf, PackedLinear) else leaf,
                params,
                is_leaf=lambda v: isinstance(v, PackedLinear),
            )
        self.meta = meta
        self.params = params
        self.manifest = manifest or {}
        self._fn = jax.jit(int_bert_forward, static_argnums=0)

    @property
    def config(self) -> BertConfig:
        return self.meta.config

    @property
    def num_labels(self) -> int:
        return self.meta.num_labels

    def tree_flatten(self):
        return (self.params,), (self.meta,)

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = cls.__new__(cls)
        obj.meta, obj.params, obj.manifest = aux[0], children[0], {}
        obj._fn = jax.jit(int_bert_forward, static_argnums=0)
        return obj

    def __call__(self, input_ids, token_type_ids=None, attention_mask=None):
        input_ids = jnp.asarray(input_ids, jnp.int32)
        if input_ids.ndim != 2:
            raise NasqError(f"input_ids must be [batch, seq], got shape {input_ids.shape}")
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise NasqError(
                f"sequence length {input_ids.shape[1]} exceeds max_position_embeddings "
                f"{self.config.max_position_embeddings}; lower --set model.max_len."
            )
        tt = jnp.zeros_like(input_ids) if token_type_ids is None else jnp.asarray(token_type_ids, jnp.int32)
        am = jnp.ones_like(input_ids) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
        return self._fn(self.meta, self.params, input_ids, tt, am)
