"""Quantized drop-in replacements for `Linear` / `Embedding`, and the surgery that installs them.

Two families, both fake-quant (float tensors holding exactly representable quantized values):

* **Supernet** (`GatedLinear`, `GatedEmbedding`): per row-group gate logits `alpha_g in R^C` over the bit
  choices `c`; probabilities `p_g = softmax((alpha_g - mu * k_g + eps) / tau)` where `k_{g,c}` is the group's
  normalised cost at choice `c` (bytes or ms, `nasq.contract.cost`), `mu >= 0` the budget price set by the search
  loop (`nasq.search.loop.solve_price`) and eps Gumbel noise (optional); then the EdMIPS composite weight

      W~_g = sum_c p_{g,c} * Q_{b_c}(W_g; s_{g,c}),     b~_g = (1 - p_{g,0}) * b_g   (if 0 = pruned is a choice)

  followed by **one** matmul `y = Q8(x) @ W~^T + b~`. One LSQ step `s_{g,c}` per (group, choice).
* **Fixed plan** (`QuantLinear`, `QuantEmbedding`): one bit width and one learned step per group;
  pruned groups give exactly zero rows and zero bias, matching the exported integer model.

The temperature, price and Gumbel key live in `SearchContext` variables (not trainable); the search loop sets
them each step with `set_search_context`. The cost table `k` is a constant `CostTable` variable.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nasq.models.bert import Embedding, Linear
from nasq.models.surgery import replace_modules, strip_root
from nasq.quant.quantizer import (
    fake_quant,
    fake_quant_act_int8,
    fake_quant_mixed,
    init_group_scales,
    init_plan_scales,
)


class QuantScale(nnx.Param):
    """A learned LSQ step size (trained with the weights, no weight decay)."""


class GateLogits(nnx.Variable):
    """Architecture parameters alpha (trained by the gate optimizer on held-out data)."""


class SearchContext(nnx.Variable):
    """Non-trainable per-step inputs of the supernet: temperature, budget price and Gumbel key."""


class CostTable(nnx.Variable):
    """Constant normalised cost `k [G, C]` of each (group, choice) (set by the search loop)."""


def _row_groups(group_sizes: Sequence[int]) -> np.ndarray:
    return np.repeat(np.arange(len(group_sizes)), np.asarray(group_sizes))


def gate_probs(alpha: jax.Array, tau: jax.Array, key: jax.Array | None = None, price: jax.Array = 0.0,
               cost: jax.Array | None = None) -> jax.Array:
    """`softmax((alpha - price * cost + Gumbel) / tau)` over the last axis; no noise when `key` is None."""
    logits = alpha if cost is None else alpha - price * cost
    if key is not None:
        logits = logits + jax.random.gumbel(key, logits.shape, logits.dtype)
    return jax.nn.softmax(logits / tau, axis=-1)


class _Gated(nnx.Module):
    """Shared gate machinery of the supernet layers."""

    def _init_gates(self, w_rows: np.ndarray, path: str, group_sizes, choices, mode: str, gate_init: str,
                    layer_id: int, cost: np.ndarray | None, alpha0: np.ndarray | None = None):
        self.path = path
        self.group_sizes = tuple(int(g) for g in group_sizes)
        self.choices = tuple(int(c) for c in choices)
        self.mode = mode
        self.layer_id = layer_id
        G, C = len(self.group_sizes), len(self.choices)
        scales = np.stack([init_group_scales(w_rows, self.group_sizes, b, mode) for b in self.choices], axis=1)
        self.scales = QuantScale(jnp.asarray(scales))  # [G, C]
        a = np.zeros((G, C), np.float32)
        if alpha0 is not None:  # given initial logits (e.g. from a plan: `nasq.search.loop.plan_gate_logits`)
            if np.shape(alpha0) != (G, C):
                raise ValueError(f"{path}: initial gate logits have shape {np.shape(alpha0)}, need {(G, C)}")
            a = np.asarray(alpha0, np.float32).copy()
        elif gate_init == "high_bits":  # start near the largest width (a fine-tuned model is near it)
            a[:, int(np.argmax(self.choices))] = 2.0
        self.alpha = GateLogits(jnp.asarray(a))
        self.cost = CostTable(jnp.zeros((G, C), jnp.float32) if cost is None else jnp.asarray(cost, jnp.float32))
        self.context = SearchContext({"tau": jnp.float32(1.0), "price": jnp.float32(0.0),
                                      "key": jax.random.key_data(jax.random.key(0)), "gumbel": jnp.bool_(False)})

    def probs(self, noise: bool = True) -> jax.Array:
        """Gate probabilities `[G, C]` at the context's temperature and price (Gumbel noise if enabled)."""
        ctx = self.context.get_value()
        args = {"price": ctx["price"], "cost": self.cost[...]}
        clean = gate_probs(self.alpha[...], ctx["tau"], **args)
        if not noise:
            return clean
        key = jax.random.fold_in(jax.random.wrap_key_data(ctx["key"]), self.layer_id)
        return jnp.where(ctx["gumbel"], gate_probs(self.alpha[...], ctx["tau"], key, **args), clean)

    def effective_logits(self) -> jax.Array:
        """`alpha - price * cost`: the logits whose softmax the network was trained with (what finalize reads)."""
        return self.alpha[...] - self.context.get_value()["price"] * self.cost[...]

    def _composite(self, w_rows: jax.Array, rows_idx: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """Composite weight rows and the per-row keep probability (1 - p_pruned)."""
        gid = _row_groups(self.group_sizes) if rows_idx is None else rows_idx
        p = self.probs()[gid]  # [rows, C]
        s = self.scales[...][gid]  # [rows, C]
        n_per_scale = np.asarray(self.group_sizes)[gid if rows_idx is None else 0] * w_rows.shape[1]
        w_tilde = jnp.zeros_like(w_rows)
        for c, bits in enumerate(self.choices):
            if bits == 0:
                continue
            g = 1.0 / np.sqrt(np.asarray(n_per_scale, np.float64) * max(2 ** (bits - 1) - 1, 1))
            g = jnp.asarray(np.reshape(g, (-1, 1)) if np.ndim(g) else g, w_rows.dtype)
            w_tilde = w_tilde + p[:, c:c + 1] * fake_quant(w_rows, s[:, c:c + 1], bits, self.mode, grad_scale=g)
        keep = 1.0 - p[:, self.choices.index(0)] if 0 in self.choices else jnp.ones(p.shape[0], w_rows.dtype)
        return w_tilde, keep


class GatedLinear(_Gated):
    def __init__(self, lin: Linear, path: str, group_sizes, choices, *, mode: str = "symmetric",
                 gate_init: str = "uniform", layer_id: int = 0, cost: np.ndarray | None = None,
                 alpha0: np.ndarray | None = None):
        self.in_features, self.out_features = lin.in_features, lin.out_features
        self.kernel = nnx.Param(lin.kernel[...])
        self.bias = nnx.Param(lin.bias[...])
        self._init_gates(np.asarray(lin.kernel[...]).T, path, group_sizes, choices, mode, gate_init, layer_id,
                         cost, alpha0)

    def __call__(self, x: jax.Array) -> jax.Array:
        w_tilde, keep = self._composite(self.kernel[...].T)
        return fake_quant_act_int8(x) @ w_tilde.T + keep * self.bias[...]


class GatedEmbedding(_Gated):
    """Supernet embedding: only the looked-up rows are quantized (cost ~ tokens, not vocabulary)."""

    def __init__(self, emb: Embedding, path: str, group_sizes, choices, *, mode: str = "symmetric",
                 gate_init: str = "uniform", layer_id: int = 0, cost: np.ndarray | None = None,
                 alpha0: np.ndarray | None = None):
        self.num_embeddings, self.features = emb.num_embeddings, emb.features
        self.embedding = nnx.Param(emb.embedding[...])
        self._init_gates(np.asarray(emb.embedding[...]), path, group_sizes, choices, mode, gate_init, layer_id,
                         cost, alpha0)
        self.row_group = nnx.Variable(jnp.asarray(_row_groups(self.group_sizes), jnp.int32))

    def __call__(self, ids: jax.Array) -> jax.Array:
        flat = ids.reshape(-1)
        rows = jnp.take(self.embedding[...], flat, axis=0)
        w_tilde, _keep = self._composite(rows, rows_idx=self.row_group[...][flat])
        return (w_tilde).reshape(*ids.shape, self.features)


class QuantLinear(nnx.Module):
    """Fixed-plan fake-quant linear: per-group bits (static) and learned per-group steps."""

    def __init__(self, lin: Linear, path: str, group_sizes, bits, *, mode: str = "symmetric",
                 scales: np.ndarray | None = None):
        self.in_features, self.out_features = lin.in_features, lin.out_features
        self.path, self.mode = path, mode
        self.group_sizes = tuple(int(g) for g in group_sizes)
        self.bits = tuple(int(b) for b in bits)
        if scales is None:
            scales = init_plan_scales(np.asarray(lin.kernel[...]).T, self.group_sizes, self.bits, mode)
        self.scales = QuantScale(jnp.asarray(scales, jnp.float32))
        self.kernel = nnx.Param(lin.kernel[...])
        self.bias = nnx.Param(lin.bias[...])

    def rows_bits(self) -> np.ndarray:
        return np.repeat(np.asarray(self.bits), self.group_sizes)

    def quantized_weight(self) -> jax.Array:
        """`[rows, in]` fake-quant weight rows."""
        gid = _row_groups(self.group_sizes)
        return fake_quant_mixed(self.kernel[...].T, self.scales[...][gid], self.rows_bits(), self.mode)

    def __call__(self, x: jax.Array) -> jax.Array:
        keep = jnp.asarray(self.rows_bits() > 0, x.dtype)
        return fake_quant_act_int8(x) @ self.quantized_weight().T + keep * self.bias[...]


class QuantEmbedding(nnx.Module):
    def __init__(self, emb: Embedding, path: str, group_sizes, bits, *, mode: str = "symmetric",
                 scales: np.ndarray | None = None):
        self.num_embeddings, self.features = emb.num_embeddings, emb.features
        self.path, self.mode = path, mode
        self.group_sizes = tuple(int(g) for g in group_sizes)
        self.bits = tuple(int(b) for b in bits)
        if scales is None:
            scales = init_plan_scales(np.asarray(emb.embedding[...]), self.group_sizes, self.bits, mode)
        self.scales = QuantScale(jnp.asarray(scales, jnp.float32))
        self.embedding = nnx.Param(emb.embedding[...])

    def rows_bits(self) -> np.ndarray:
        return np.repeat(np.asarray(self.bits), self.group_sizes)

    def quantized_weight(self) -> jax.Array:
        gid = _row_groups(self.group_sizes)
        return fake_quant_mixed(self.embedding[...], self.scales[...][gid], self.rows_bits(), self.mode)

    def __call__(self, ids: jax.Array) -> jax.Array:
        """Quantize only the looked-up rows: `sum_b [bits(row) == b] * Q_b(W[ids]; s[group(ids)])`.

        Equals `quantized_weight()[ids]` (forward, bit for bit); cost ~ tokens, not vocabulary size. The step
        gradient uses the same per-row LSQ scale as `quantized_weight` (`1/sqrt(features * qp_b)`).
        """
        flat = ids.reshape(-1)
        rows = jnp.take(self.embedding[...], flat, axis=0)
        if len(self.group_sizes) == self.num_embeddings:
            gid = flat
        else:
            gid = jnp.take(jnp.asarray(_row_groups(self.group_sizes), jnp.int32), flat)
        s = jnp.take(self.scales[...], gid)[:, None]
        distinct = sorted(set(self.bits))
        if len(distinct) == 1:
            out = self._fq_rows(rows, s, distinct[0])
        else:
            row_bits = jnp.take(jnp.asarray(self.rows_bits(), jnp.int32), flat)[:, None]
            out = jnp.zeros_like(rows)
            for b in distinct:
                if b:
                    out = out + jnp.where(row_bits == b, self._fq_rows(rows, s, b), 0)
        return out.reshape(*ids.shape, self.features)

    def _fq_rows(self, rows: jax.Array, s: jax.Array, bits: int) -> jax.Array:
        if bits == 0:
            return jnp.zeros_like(rows)
        qp = max(2 ** (bits - 1) - 1, 1)
        return fake_quant(rows, s, bits, self.mode, grad_scale=1.0 / np.sqrt(self.features * qp))


# ----------------------------------------------------------------------------------------------- surgery
def to_supernet(model: nnx.Module, tensors, *, mode: str = "symmetric", gate_init: str = "uniform",
                costs: list[np.ndarray] | None = None,
                gate_logits: dict[str, np.ndarray] | None = None) -> nnx.Module:
    """A copy of `model` whose searched Linear/Embedding modules (`SearchedTensor`s) are gated.

    `costs[i]` is tensor i's normalised cost table `[G, C]` used by the budget price (zeros if None).
    `gate_logits[path]`, where given, is that tensor's initial gate logits `[G, C]` (instead of `gate_init`).
    """
    by_path = {t.path: t for t in tensors}
    ids = {t.path: i for i, t in enumerate(tensors)}

    def fn(path, mod):
        t = by_path.get(strip_root(path))
        if t is None:
            return None
        cls = GatedEmbedding if isinstance(mod, Embedding) else GatedLinear
        i = ids[t.path]
        return cls(mod, t.path, t.group_sizes, t.choices, mode=mode, gate_init=gate_init, layer_id=i,
                   cost=None if costs is None else costs[i],
                   alpha0=None if gate_logits is None else gate_logits.get(t.path))

    return replace_modules(model, fn)


def gated_modules(model: nnx.Module) -> list[_Gated]:
    """The supernet's gated layers in a fixed (definition) order."""
    return [m for _, m in nnx.iter_modules(model) if isinstance(m, _Gated)]


def set_search_context(state, tau, key: jax.Array, gumbel: bool, price=0.0):
    """Return `state` with every `SearchContext` set to (tau, price, key, gumbel) (pure; works under jit)."""

    def upd(v):
        if isinstance(v, SearchContext):
            return v.replace(value={"tau": jnp.asarray(tau, jnp.float32), "price": jnp.asarray(price, jnp.float32),
                                    "key": jax.random.key_data(key), "gumbel": jnp.asarray(gumbel)})
        return v

    return jax.tree.map(upd, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
