"""Measured-sensitivity bit allocation: quantize one tensor at a time, measure what it does to the output, knapsack.

The Hessian baseline (:mod:`nasq.baselines.hessian`) *estimates* the damage of quantizing a group from a
second-order Taylor expansion. This allocator *measures* it, at the granularity of whole tensors, as ZeroQ does
for CNNs (Cai et al., "ZeroQ: A Novel Zero Shot Quantization Framework", CVPR 2020: KL divergence of the output
when one layer is quantized, summed over layers under a size constraint). For searched tensor ``t`` and choice
``c``, with every other tensor left fp32::

    D_t(c) = mean over rows x of  KL( softmax(f(x)) || softmax(f_{t <- Q_c}(x)) )

where ``f`` is the fp32 (fine-tuned) model and ``f_{t <- Q_c}`` the same model with every row group of ``t`` at
``c`` bits: the MSE-initialised steps QAT starts from (:func:`quantized_rows`, exactly what ``nasq finetune
--plan`` starts from), or, for ``c == 0``, its rows and bias removed. The rows are ``n_batches`` seeded train
batches, the same rows the Hessian baseline reads. ``D_t`` is label-free and is the distillation loss QAT then
minimises (at temperature 1).

The damage is spread over a tensor's row groups in proportion to their rows, and the plan maximises

    sum_g u_{g, c_g},   u_{g,c} = - D_{t(g)}(c) * rows_g / rows_{t(g)}

within the byte budget with :func:`nasq.search.finalize.allocate`, the exact knapsack of ``nasq finalize``
(utilities divided by ``max |u|``, which does not change the optimum). The sum assumes the tensors' damages add
up, as ZeroQ and HAWQ-V3 assume; the groups of one tensor share its per-row damage, so the knapsack fills the last
bytes by giving some groups of the tensor with the best damage saved per byte one more width.

Cost: one forward of the rows per (tensor, choice); no backward (MiniLM, 36 tensors x 4 choices x 256 rows: about
as long as the Hessian baseline's 32 Hessian-vector products).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nasq.baselines.hessian import _train_batches, quantized_rows, tensor_weights
from nasq.contract.cost import size_tables
from nasq.contract.damage import damage_from_plan, group_damage
from nasq.contract.space import SearchedTensor
from nasq.models.bert import Embedding, Linear
from nasq.models.surgery import module_path, strip_root
from nasq.search.finalize import allocate, choices_to_bits

__all__ = ["damage_from_plan", "kl_rows", "measured_allocation", "measured_utilities", "tensor_damage"]


def kl_rows(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """``KL(softmax(p) || softmax(q))`` per row (float64), from logits ``[N, C]``."""
    p = np.asarray(p_logits, np.float64)
    q = np.asarray(q_logits, np.float64)
    lp = p - np.logaddexp.reduce(p, axis=1, keepdims=True)
    lq = q - np.logaddexp.reduce(q, axis=1, keepdims=True)
    return (np.exp(lp) * (lp - lq)).sum(1)


def tensor_damage(
    model: nnx.Module,
    batches: Sequence[Any],
    tensors: Sequence[SearchedTensor],
    mode: str,
    *,
    progress=None,
) -> list[np.ndarray]:
    """``D_t(c)`` (module docstring) as float64 ``[len(t.choices)]`` per tensor: the mean over the real rows of
    ``batches`` (``Batch`` objects; padding rows have weight 0) of the KL divergence of the model's output with only
    ``t`` at choice ``c`` from its fp32 output. ``progress(done, total)`` is called after each forward."""
    graphdef, state = nnx.split(model)
    flat = dict(nnx.to_flat_state(state))
    paths = {strip_root(module_path(p)): (p, m) for p, m in nnx.iter_modules(model)
             if isinstance(m, (Linear, Embedding))}
    fwd = jax.jit(lambda s, ids, tt, am: nnx.merge(graphdef, s)(ids, tt, am))

    def logits(st) -> list[np.ndarray]:
        return [np.asarray(fwd(st, b.input_ids, b.token_type_ids, b.attention_mask)) for b in batches]

    weights = [np.asarray(b.weights, np.float64) for b in batches]
    total_w = float(sum(w.sum() for w in weights))
    base = logits(state)
    out, done, total = [], 0, sum(len(t.choices) for t in tensors)
    for t, (w, b) in zip(tensors, tensor_weights(model, tensors), strict=True):
        mpath, mod = paths[t.path]
        is_linear = isinstance(mod, Linear)
        key, bias_key = mpath + ("kernel" if is_linear else "embedding",), mpath + ("bias",)
        damage = np.zeros(len(t.choices), np.float64)
        for k, c in enumerate(t.choices):
            wq, bq = quantized_rows(t, w, b, int(c), mode)
            new = dict(flat)
            new[key] = flat[key].replace(jnp.asarray(wq.T if is_linear else wq))
            if bq is not None:
                new[bias_key] = flat[bias_key].replace(jnp.asarray(bq))
            q = logits(nnx.from_flat_state(new))
            damage[k] = sum(float((kl_rows(p, qq) * wt).sum()) for p, qq, wt in zip(base, q, weights)) / total_w
            done += 1
            if progress is not None:
                progress(done, total)
        out.append(damage)
    return out


def measured_utilities(tensors: Sequence[SearchedTensor], damage: Sequence[np.ndarray]) -> list[np.ndarray]:
    """``u_{g,c} = -D_t(c) * rows_g / rows_t`` (``[G, C]`` per tensor), normalised by ``max |u|``."""
    utils = [-d for d in group_damage(tensors, damage)]
    scale = max((float(np.abs(u).max()) for u in utils if u.size), default=0.0)
    return [u / scale for u in utils] if scale > 0 else utils


def measured_allocation(
    model: nnx.Module,
    data,
    tensors: Sequence[SearchedTensor],
    budget_bytes: int,
    *,
    n_batches: int = 8,
    seed: int = 0,
    mode: str = "symmetric",
    batch_size: int = 32,
    time_limit: float = 20.0,
    info: dict | None = None,
    progress=None,
    damage: Sequence[np.ndarray] | None = None,
) -> list[tuple[int, ...]]:
    """Bits per group maximising ``sum_g u_{g,c_g}`` (module docstring) within ``budget_bytes``. ``model`` is the
    fp32 fine-tuned model, ``data`` a :class:`nasq.data.tasks.TaskData` whose ``train`` rows give ``n_batches``
    seeded batches of ``batch_size`` (the Hessian baseline's rows for the same arguments). ``damage``: damages
    measured before (:func:`damage_from_plan`; then neither ``model`` nor ``data`` is read). ``info`` (optional
    dict) receives the damages and solver statistics."""
    rows = None
    if damage is None:
        batches = _train_batches(data, n_batches, batch_size, seed)
        damage = tensor_damage(model, batches, tensors, mode, progress=progress)
        rows = int(sum(float(np.asarray(b.weights).sum()) for b in batches))
    alloc = allocate(measured_utilities(tensors, damage), size_tables(tensors), budget_bytes, time_limit=time_limit)
    if info is not None:
        if rows is not None:
            info.update({"n_batches": n_batches, "batch_size": batch_size, "train_rows": len(data.train),
                         "rows": rows})
        info.update({"solver": alloc.solver, "optimal": alloc.optimal,
                     "damage_kl_x1000": {t.path: {str(int(c)): 1000 * float(v)
                                                  for c, v in zip(t.choices, d, strict=True)}
                                         for t, d in zip(tensors, damage, strict=True)}})
    return choices_to_bits(tensors, alloc.choices)
