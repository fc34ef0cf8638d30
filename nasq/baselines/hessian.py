"""Hessian-sensitivity bit allocation (Q-BERT / HAWQ-V3 style), solved by the same exact knapsack as search.

References: Shen et al., "Q-BERT: Hessian Based Ultra Low Precision Quantization of BERT" (AAAI 2020);
Yao et al., "HAWQ-V3: Dyadic Neural Network Quantization" (ICML 2021) (Hessian *trace* as sensitivity, an
integer program over the per-layer bit widths); Dong et al., "HAWQ-V2" (NeurIPS 2020) for the Hutchinson trace.

For row group ``g`` (its ``n_g = rows_g * cols`` weights ``W_g``) and bit choice ``c`` the utility is the negated
second-order Taylor estimate of the loss increase when only ``W_g`` is quantized, with the group's Hessian block
replaced by its average eigenvalue (HAWQ-V2/V3)::

    u_{g,c} = - 0.5 * (Tr(H_g) / n_g) * ||W_g - Q_c(W_g)||^2

* ``H_g`` is the block of the Hessian of the fp32 model's task loss (mean over ``n_batches`` train batches)
  w.r.t. group g's weights. ``Tr(H_g)`` is Hutchinson's estimate ``E_v[v^T H v] = Tr(H)`` with Rademacher ``v``:
  one Hessian-vector product ``Hv = d/de grad L(w + e v)`` (``jax.jvp`` of ``jax.grad``) per (probe, batch) for
  *all* searched tensors at once; ``E[v * Hv] = diag(H)`` entrywise, so summing ``v * Hv`` over the group's
  entries gives every ``Tr(H_g)`` from the same products (:func:`hutchinson_diagonal`).
* ``Q_c`` is the symmetric (or signed) uniform quantizer with the group's MSE-initialised step
  (:func:`nasq.quant.quantizer.init_group_scales`), exactly how QAT starts from the plan; ``c == 1`` is binary;
  ``c == 0`` (pruned) removes the rows and their bias, so its perturbation is ``||W_g||^2 + ||b_g||^2``.
* Estimated average curvatures ``Tr(H_g)/n_g`` can come out <= 0 (non-convex loss, estimator noise); they are
  clamped to ``1e-3 * mean(max(Tr(H)/n, 0))`` over all groups, so such a group still prefers the smaller
  perturbation when bytes allow but gives up bits first. The count is reported.
* Utilities are divided by ``max |u|`` (a positive constant does not change the optimum, and keeps the MILP away
  from its absolute tolerances).
* ``curvature="fisher"``: ``H`` replaced by the Gauss-Newton matrix of the same loss,
  ``G = 1/N sum_i J_i^T Lambda_i J_i`` (``J_i``: the Jacobian of example ``i``'s logits; ``Lambda_i`` the Hessian
  of the loss in the logits: ``diag(p_i) - p_i p_i^T`` for softmax cross-entropy, which makes ``G`` the Fisher
  information of the model's own predictive distribution; ``2`` for squared error). ``G`` is positive
  semi-definite, so every trace is ``>= 0``, and its diagonal is computed exactly over the sampled examples
  (:func:`gauss_newton_diagonal`: per-example gradients, no random probes), so the only noise is which examples
  were drawn. The Hessian's trace is the Gauss-Newton trace plus a term weighted by the residuals, which is what
  comes out ``<= 0`` at a fine-tuned model (below). Used for mixed precision by e.g. FIT (Zandonati et al., 2022,
  the empirical Fisher trace per layer) and HAWQ's follow-ups.
* ``granularity="tensor"`` (HAWQ-V2/V3's layer-wise trace): every group of a tensor is scored with the tensor's
  pooled ``Tr(H_t)/n_t = sum_g Tr(H_g) / sum_g n_g`` instead of its own, so groups of one tensor differ only by
  their perturbations. A per-group estimate sums ``v * Hv`` over ``n_g`` entries whose ``Hv`` also carries the
  coupling to every other weight, and over a whole tensor that noise partly averages out: on the CoLA MiniLM
  teacher, two independent draws of 8 batches x 4 probes ranked the 4,608 group traces alike with Spearman 0.07
  (half of them <= 0 in each draw) and the 36 tensor traces with 0.51 (``experiments/hessian_reliability.py``);
  with 16 batches x 8 probes three draws ranked the tensors alike with 0.56-0.78, but the trace of the fine-tuned
  model's loss Hessian came out <= 0 for 3-13 whole tensors per draw (every tensor of the last layer in two of
  three), which then get the narrowest width, and those plans scored below uniform at CoLA avg 3 on average
  (experiments/results/protocol/NOTES.md).

* ``granularity="weight"`` (Fisher only; Optimal Brain Damage's diagonal, LeCun et al. 1990): each weight's own
  curvature times its own quantization error, summed over the group,
  ``u_{g,c} = -0.5 * sum_{i in g} G_ii * (w_i - Q_c(w_i))^2`` (:func:`weighted_perturbations`), in place of the
  group's average curvature times its summed error. The two agree when curvature and error are uncorrelated inside
  a group; they differ where the large errors fall on the sensitive weights (e.g. the columns of outlier input
  channels, whose ``G_ii`` carry ``x_j^2``). Pruned rows' biases are weighted by their rows' mean ``G_ii``. The
  Hutchinson diagonal is refused here: per weight it is mostly noise and can be negative. The plan records each
  group's weighted error at each width (``provenance["weighted_errors"]``, 6 significant digits, the values the
  knapsack was solved with), so :func:`recorded_weighted_errors` re-solves it at any budget with no data.
* ``shrinkage=s`` (with ``granularity="weight"``; 0 by default): each weight's curvature shrunk toward its
  tensor's mean, ``d_i' = (1 - s) * G_ii + s * Tr(G_t)/n_t``, so the group's damage is the blend
  ``(1 - s) * sum_{i in g} G_ii (w_i - Q_c(w_i))^2 + s * Tr(G_t)/n_t * ||W_g - Q_c(W_g)||^2`` of the per-weight and
  the per-tensor estimates (``s = 0``: per weight; ``s = 1``: per tensor), as a shrinkage estimator pulls a
  noisy per-item estimate toward its group's mean: a weight's own diagonal counts only the rows drawn (a vocabulary
  row whose token none of them holds has ``G_ii = 0``). The plan records the unshrunk errors, so a re-solve can take
  any ``s``. Under the protocol, ``s = 0.5`` landed between the two granularities at the rows tried, so it is an
  option, not the default (experiments/results/protocol/NOTES.md).

The plan maximises ``sum_g u_{g,c_g}`` subject to ``sum_g bytes(g, c_g) <= budget`` with
:func:`nasq.search.finalize.allocate` (exact MILP, Lagrangian fallback), the knapsack ``nasq finalize`` uses.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nasq.contract.cost import size_tables
from nasq.contract.plan import Plan
from nasq.contract.space import SearchedTensor
from nasq.data.batching import iterate_batches
from nasq.errors import NasqError
from nasq.io import finite_number
from nasq.models.bert import Embedding, Linear
from nasq.models.surgery import iter_named
from nasq.objectives import task_loss
from nasq.quant.quantizer import fake_quant, init_group_scales
from nasq.search.finalize import allocate, choices_to_bits
from nasq.tree import keystr as _keystr

__all__ = [
    "CURVATURES",
    "GRANULARITIES",
    "MAX_TRACE_PER_WEIGHT",
    "checked_shrinkage",
    "gauss_newton_diagonal",
    "group_traces",
    "hessian_allocation",
    "hessian_utilities",
    "hutchinson_diagonal",
    "pooled_traces",
    "quant_perturbations",
    "quantized_rows",
    "recorded_traces",
    "recorded_weighted_errors",
    "tensor_weights",
    "weight_curvatures",
    "weighted_perturbations",
]

CLAMP_FRACTION = 1e-3
RECORD_DIGITS = 6  # significant digits of the recorded per-weight errors (the knapsack solves with the same values)
GRANULARITIES = ("group", "tensor", "weight")
CURVATURES = ("hutchinson", "fisher")


# ---------------------------------------------------------------------------------------------- estimator


def hutchinson_diagonal(
    loss_fn: Callable[[Any, Any], jax.Array],
    params: Any,
    batches: Sequence[Any],
    key: jax.Array,
    n_probes: int,
) -> Any:
    """Hutchinson estimate of the Hessian diagonal of ``L(p) = mean_b loss_fn(p, batch_b)``.

    ``diag(H) ~= 1/(P*B) sum_{probe} sum_b v_probe * (H_b v_probe)`` with Rademacher ``v`` (entries +-1) and
    ``H_b v = jax.jvp(jax.grad(lambda p: loss_fn(p, batch_b)), (p,), (v,))[1]`` (forward-over-reverse HVP, one
    per (probe, batch), over the whole ``params`` pytree at once). Unbiased: ``E[v_i (Hv)_i] = H_ii`` because
    ``E[v_i v_j] = [i == j]``; the sum of the result over any set of entries is the Hutchinson estimate of the
    trace of that diagonal block. ``batches`` items are pytrees passed to ``loss_fn`` as traced arguments
    (``None`` for a loss without data). Returns a pytree like ``params`` (float32).
    """
    if n_probes < 1:
        raise NasqError(f"n_probes must be >= 1, got {n_probes}")
    if not batches:
        raise NasqError("the Hutchinson estimate needs at least one batch")

    @jax.jit
    def v_hv(p, batch, v):
        hv = jax.jvp(jax.grad(lambda q: loss_fn(q, batch)), (p,), (v,))[1]
        return jax.tree.map(lambda a, b: a * b, v, hv)

    leaves, treedef = jax.tree_util.tree_flatten(params)
    acc = [np.zeros(np.shape(x), np.float64) for x in leaves]
    n = 0
    for i in range(n_probes):
        keys = jax.random.split(jax.random.fold_in(key, i), max(len(leaves), 1))
        v = jax.tree_util.tree_unflatten(
            treedef, [jax.random.rademacher(k, np.shape(x), jnp.float32) for k, x in zip(keys, leaves)])
        for batch in batches:
            out = jax.tree_util.tree_leaves(v_hv(params, batch, v))
            for a, o in zip(acc, out, strict=True):
                a += np.asarray(o, np.float64)
            n += 1
    return jax.tree_util.tree_unflatten(treedef, [(a / n).astype(np.float32) for a in acc])


def gauss_newton_diagonal(
    output_fn: Callable[[Any, Any, Any], tuple[jax.Array, jax.Array]],
    params: Any,
    examples: Sequence[tuple[Any, np.ndarray]],
    context: Any = None,
) -> Any:
    """Exact diagonal of the Gauss-Newton matrix ``G = sum_i w_i sum_c a_ic (d z_ic / d p)^2 / sum_i w_i``.

    ``output_fn(p, context, x) -> (z [C], a [C])`` for *one* example ``x``: ``z`` the outputs whose per-example
    gradients are squared and ``a >= 0`` their weights (no gradient flows through ``a``). For softmax cross-entropy,
    ``z = log_softmax(logits)`` and ``a = softmax(logits)`` give ``sum_c p_c g_c g_c^T = J^T (diag(p) - p p^T) J``
    (``g_c = J^T (e_c - p)``): the Gauss-Newton matrix of the loss, and the Fisher information of the model's
    predictive distribution; for squared error ``(f - y)^2``, ``z = f`` and ``a = 2``. ``examples`` items are
    ``(x, w)``: ``x`` a pytree of arrays with a leading example axis (passed to ``output_fn`` one example at a
    time, ``jax.vmap`` of ``jax.jacrev``), ``w`` ``[n]`` example weights (0 for padding rows); ``context`` (e.g.
    the parameters not differentiated) is passed whole to every call. No probes: the result is exact for the given
    examples. Returns a pytree like ``params`` (float32).
    """
    if not examples:
        raise NasqError("the Gauss-Newton diagonal needs at least one example")

    def one(p, ctx, x):
        jac, a = jax.jacrev(output_fn, has_aux=True)(p, ctx, x)
        a = jax.lax.stop_gradient(a)
        return jax.tree.map(lambda j: jnp.tensordot(a, jnp.square(j), axes=1), jac)

    @jax.jit
    def chunk_sum(p, ctx, x, w):
        per = jax.vmap(one, in_axes=(None, None, 0))(p, ctx, x)
        return jax.tree.map(lambda d: jnp.tensordot(w, d, axes=1), per)

    leaves, treedef = jax.tree_util.tree_flatten(params)
    acc = [np.zeros(np.shape(x), np.float64) for x in leaves]
    total = 0.0
    for x, w in examples:
        out = jax.tree_util.tree_leaves(chunk_sum(params, context, x, jnp.asarray(w, jnp.float32)))
        for a, o in zip(acc, out, strict=True):
            a += np.asarray(o, np.float64)
        total += float(np.sum(w))
    if total <= 0:
        raise NasqError("the Gauss-Newton diagonal needs examples of positive weight; every row was padding")
    return jax.tree_util.tree_unflatten(treedef, [(a / total).astype(np.float32) for a in acc])


# ------------------------------------------------------------------------------------------- model side


def _modules(model: nnx.Module) -> dict[str, nnx.Module]:
    return dict(iter_named(model.bert, (Linear, Embedding)))


def tensor_weights(model: nnx.Module, tensors: Sequence[SearchedTensor]) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """``(w_rows [rows, cols], bias [rows] | None)`` (float32 numpy) of each searched tensor of a
    ``BertForSequenceClassification`` (linears: ``kernel.T``, the ``(out, in)`` view; embeddings: the table)."""
    mods = _modules(model)
    out = []
    for t in tensors:
        m = mods.get(t.path)
        if m is None:
            raise NasqError(f"searched tensor {t.path} is not a Linear/Embedding of the model; resolve the search "
                            "space on this model")
        if isinstance(m, Linear):
            w = np.asarray(m.kernel[...], np.float32).T
            b = np.asarray(m.bias[...], np.float32) if t.has_bias else None
        else:
            w, b = np.asarray(m.embedding[...], np.float32), None
        if w.shape != (t.rows, t.cols):
            raise NasqError(f"{t.path}: the model has {w.shape[0]}x{w.shape[1]}, the search space resolved "
                            f"{t.rows}x{t.cols}; resolve the space on this model")
        out.append((w, b))
    return out


def _starts(t: SearchedTensor) -> np.ndarray:
    return np.asarray(t.row_offsets[:-1], np.int64)


def quantized_rows(t: SearchedTensor, w: np.ndarray, b: np.ndarray | None, c: int,
                   mode: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Tensor ``t``'s rows ``w`` ``[rows, cols]`` and bias ``b`` with every row group at choice ``c``: the
    MSE-initialised steps QAT starts from (:func:`nasq.quant.quantizer.init_group_scales`), or, for ``c == 0``,
    the rows and their bias zeroed (pruned rows are absent from the model)."""
    if c == 0:
        return np.zeros_like(w), None if b is None else np.zeros_like(b)
    s = init_group_scales(w, t.group_sizes, int(c), mode)
    return np.asarray(fake_quant(w, np.repeat(s, np.asarray(t.group_sizes))[:, None], int(c), mode), np.float32), b


def quant_perturbations(model: nnx.Module, tensors: Sequence[SearchedTensor], mode: str) -> list[np.ndarray]:
    """``[G, C]`` float64 per tensor: ``||W_g - Q_c(W_g)||^2`` with MSE-initialised steps, and
    ``||W_g||^2 + ||b_g||^2`` for ``c == 0`` (pruned rows take their bias with them)."""
    out = []
    for t, (w, b) in zip(tensors, tensor_weights(model, tensors), strict=True):
        starts = _starts(t)
        pert = np.zeros((t.num_groups, len(t.choices)), np.float64)
        for k, c in enumerate(t.choices):
            q, qb = quantized_rows(t, w, b, int(c), mode)
            row_sq = np.square(w - q, dtype=np.float64).sum(axis=1)
            if b is not None:
                row_sq += np.square(b - qb, dtype=np.float64)
            pert[:, k] = np.add.reduceat(row_sq, starts)
        out.append(pert)
    return out


def weighted_perturbations(model: nnx.Module, tensors: Sequence[SearchedTensor], mode: str,
                           diagonals: Sequence[np.ndarray]) -> list[np.ndarray]:
    """``[G, C]`` float64 per tensor: ``sum_{i in g} d_i * (w_i - Q_c(w_i))^2`` with MSE-initialised steps, ``d`` the
    curvature diagonal ``[rows, cols]`` (:func:`weight_curvatures`); for ``c == 0`` the rows' weights and biases
    (a bias weighted by its row's mean ``d``). With every ``d_i`` equal to ``t`` it is ``t *``
    :func:`quant_perturbations`."""
    out = []
    for t, (w, b), d in zip(tensors, tensor_weights(model, tensors), diagonals, strict=True):
        d = np.asarray(d, np.float64)
        if d.shape != w.shape:
            raise NasqError(f"{t.path}: curvature diagonal {d.shape}, weights {w.shape}")
        starts = _starts(t)
        pert = np.zeros((t.num_groups, len(t.choices)), np.float64)
        for k, c in enumerate(t.choices):
            q, qb = quantized_rows(t, w, b, int(c), mode)
            row = (d * np.square(w - q, dtype=np.float64)).sum(axis=1)
            if b is not None:
                row += d.mean(axis=1) * np.square(b - qb, dtype=np.float64)
            pert[:, k] = np.add.reduceat(row, starts)
        out.append(pert)
    return out


def _param_key(mods: dict[str, nnx.Module], path: str) -> str:
    return f"bert.{path}." + ("kernel" if isinstance(mods[path], Linear) else "embedding")


FISHER_CHUNK = 8  # examples per vmapped Jacobian: [chunk, C, weights] floats live at once (~0.7 GB for MiniLM)


def weight_curvatures(
    model: nnx.Module,
    batches: Sequence[Any],
    tensors: Sequence[SearchedTensor],
    *,
    is_regression: bool,
    n_probes: int,
    seed: int,
    curvature: str = "hutchinson",
) -> list[np.ndarray]:
    """The curvature diagonal ``H_ii`` (float64 ``[rows, cols]`` per tensor, the ``(out, in)`` view of
    :func:`tensor_weights`) of the task loss of the fp32 ``model`` (no dropout) over ``batches`` (each a ``Batch``),
    as a function of the searched weight matrices only: ``H`` the Hessian (``curvature="hutchinson"``: ``n_probes``
    Rademacher probes, :func:`hutchinson_diagonal`) or the Gauss-Newton matrix (``"fisher"``: exact over the
    batches' rows, :func:`gauss_newton_diagonal`; ``n_probes`` unused)."""
    if curvature not in CURVATURES:
        raise NasqError(f"curvature must be one of {', '.join(CURVATURES)}, got {curvature!r}")
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = [_keystr(p) for p, _ in leaves]
    mods = _modules(model)
    wanted = [_param_key(mods, t.path) for t in tensors]
    missing = [k for k in wanted if k not in keys]
    if missing:  # pragma: no cover - _param_key follows the model's own structure
        raise NasqError(f"model parameters {missing[:3]} not found")
    sub = {k: leaves[keys.index(k)][1] for k in wanted}
    others = [None if k in sub else v for k, (_, v) in zip(keys, leaves)]

    def logits_of(p, others_, b):
        vals = [p[k] if o is None else o for k, o in zip(keys, others_)]
        m = nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, vals), rest)
        return m(b["input_ids"], b["token_type_ids"], b["attention_mask"])

    fields = ("input_ids", "token_type_ids", "attention_mask", "labels", "weights")
    arrays = [{k: np.asarray(getattr(b, k)) for k in fields} for b in batches]
    if curvature == "hutchinson":
        def loss_fn(p, aux):
            others_, b = aux
            return task_loss(logits_of(p, others_, b), b["labels"], b["weights"], is_regression)

        aux = [(others, {k: jnp.asarray(v) for k, v in b.items()}) for b in arrays]
        diag = hutchinson_diagonal(loss_fn, sub, aux, jax.random.PRNGKey(seed), n_probes)
    else:
        def output_fn(p, others_, row):
            logits = logits_of(p, others_, {k: v[None] for k, v in row.items()})[0]
            if is_regression:  # task_loss: (f - y)^2, whose second derivative in f is 2
                return logits[:1], jnp.full((1,), 2.0, logits.dtype)
            return jax.nn.log_softmax(logits), jax.nn.softmax(logits)

        examples = []
        for b in arrays:
            for i in range(0, len(b["weights"]), FISHER_CHUNK):
                row = {k: jnp.asarray(b[k][i:i + FISHER_CHUNK]) for k in fields[:3]}
                examples.append((row, b["weights"][i:i + FISHER_CHUNK]))
        diag = gauss_newton_diagonal(output_fn, sub, examples, context=others)
    out = []
    for k, t in zip(wanted, tensors, strict=True):
        d = np.asarray(diag[k], np.float64)
        out.append(d.T if isinstance(mods[t.path], Linear) else d)  # a kernel is (in, out)
    return out


def group_traces(
    model: nnx.Module,
    batches: Sequence[Any],
    tensors: Sequence[SearchedTensor],
    *,
    is_regression: bool,
    n_probes: int,
    seed: int,
    curvature: str = "hutchinson",
    diagonals: list[np.ndarray] | None = None,
) -> list[np.ndarray]:
    """``Tr(H_g) / n_g`` (float64 ``[G]`` per tensor): :func:`weight_curvatures` (the same arguments) summed over
    each row group's weights; ``diagonals``: those curvatures already computed (the other arguments then unused)."""
    if diagonals is None:
        diagonals = weight_curvatures(model, batches, tensors, is_regression=is_regression, n_probes=n_probes,
                                      seed=seed, curvature=curvature)
    return [np.add.reduceat(d.sum(axis=1), _starts(t)) / (np.asarray(t.group_sizes) * t.cols)
            for t, d in zip(tensors, diagonals, strict=True)]


def pooled_traces(traces: Sequence[np.ndarray], tensors: Sequence[SearchedTensor]) -> list[np.ndarray]:
    """Each tensor's groups scored with the tensor's ``Tr(H_t)/n_t`` (``granularity="tensor"``): the group
    estimates ``Tr(H_g)/n_g`` pooled over the tensor by weights (every group has ``cols`` columns, so by rows)."""
    out = []
    for t, tr in zip(tensors, traces, strict=True):
        tr = np.asarray(tr, np.float64)
        out.append(np.full_like(tr, float((tr * np.asarray(t.group_sizes)).sum() / t.rows)))
    return out


def hessian_utilities(traces: Sequence[np.ndarray], perturbations: Sequence[np.ndarray]) -> tuple[list[np.ndarray], int]:
    """``u_{g,c} = -0.5 * max(t_g, floor) * pert_{g,c}``, normalised by ``max |u|`` (see the module docstring);
    returns (utilities, number of clamped groups). ``traces[t]`` is ``[G]`` (``Tr(H_g)/n_g``)."""
    flat = np.concatenate([np.asarray(t, np.float64).ravel() for t in traces]) if traces else np.zeros(0)
    pos = np.maximum(flat, 0.0)
    floor = CLAMP_FRACTION * float(pos.mean()) if pos.size and pos.mean() > 0 else 1.0
    clamped = int((flat < floor).sum())
    utils = [-0.5 * np.maximum(np.asarray(t, np.float64), floor)[:, None] * np.asarray(p, np.float64)
             for t, p in zip(traces, perturbations, strict=True)]
    scale = max((float(np.abs(u).max()) for u in utils if u.size), default=0.0)
    if scale > 0:
        utils = [u / scale for u in utils]
    return utils, clamped


def _train_batches(data, n_batches: int, batch_size: int, seed: int, min_tokens: int = 0) -> list:
    """``n_batches`` seeded train batches; with ``min_tokens``, drawn only from rows of at least that many tokens
    (SST-2's train rows are mostly short phrases, its dev rows whole sentences)."""
    if n_batches < 1:
        raise NasqError(f"n_batches must be >= 1, got {n_batches}")
    train = data.train
    if min_tokens > 0:
        train = train.select(np.flatnonzero(train.lengths >= min_tokens))
    if len(train) == 0:
        raise NasqError("the sensitivity baselines need training rows; the train split has none"
                        + (f" of at least {min_tokens} tokens (lower --min-tokens)" if min_tokens > 0 else ""))
    it = iterate_batches(train, batch_size, data.buckets, seed)
    return [next(it)[2] for _ in range(n_batches)]


def checked_shrinkage(shrinkage: Any, granularity: str) -> float:
    """``shrinkage`` as a float in [0, 1], above 0 only with ``granularity="weight"``, else ``NasqError`` (the
    message names the command-line flags)."""
    s = finite_number(shrinkage)
    if s is None or not 0.0 <= s <= 1.0:
        raise NasqError(f"--shrinkage must be a number in [0, 1] (0: per weight, 1: per tensor), got {shrinkage!r}")
    if s and granularity != "weight":
        raise NasqError("--shrinkage blends each weight's curvature with its tensor's mean: it needs --granularity "
                        f"weight (with the fisher baseline), not {granularity!r}")
    return s


def hessian_allocation(
    model: nnx.Module,
    data,
    tensors: Sequence[SearchedTensor],
    budget: int,
    *,
    costs: Sequence[np.ndarray] | None = None,
    n_batches: int = 8,
    n_probes: int = 4,
    seed: int = 0,
    mode: str = "symmetric",
    batch_size: int = 32,
    time_limit: float = 20.0,
    granularity: str = "group",
    curvature: str = "hutchinson",
    traces: Sequence[np.ndarray] | None = None,
    weighted_errors: Sequence[np.ndarray] | None = None,
    shrinkage: float = 0.0,
    info: dict | None = None,
) -> list[tuple[int, ...]]:
    """Bits per group maximising ``sum_g -0.5 * Tr(H_g)/n_g * ||W_g - Q_{c_g}(W_g)||^2`` with a cost within
    ``budget`` (module docstring; Q-BERT / HAWQ-V3). ``costs``: per-tensor ``[G, C]`` integer cost tables the
    budget is in; None: bytes (:func:`nasq.contract.cost.size_tables`; a latency budget:
    :func:`nasq.contract.cost.latency_ns_tables`). ``model`` is the fp32 (fine-tuned) model, ``data`` a
    :class:`nasq.data.tasks.TaskData` whose ``train`` rows give ``n_batches`` seeded batches of ``batch_size``;
    ``n_probes`` Rademacher probes each; ``granularity``: each group's own trace (``"group"``), its tensor's
    (``"tensor"``, :func:`pooled_traces`) or each weight's own curvature (``"weight"``, Fisher only,
    :func:`weighted_perturbations`); ``curvature``: ``H`` the loss Hessian (``"hutchinson"``) or its
    Gauss-Newton part (``"fisher"``, exact over the batches' rows; ``n_probes`` unused), see :func:`group_traces`.
    ``traces``: per-tensor traces already estimated (``granularity="tensor"``, e.g. :func:`recorded_traces`: one
    estimate, a plan at every budget; ``data`` and the batch options are then unused), and for
    ``granularity="weight"`` with them ``weighted_errors``, each group's ``[G, C]`` weighted errors
    (:func:`recorded_weighted_errors`). ``shrinkage`` (``"weight"`` only): the per-weight errors blended with the
    per-tensor ones, ``(1 - s) * weighted + s * pooled trace * error`` (module docstring). ``info`` (optional dict)
    receives solver and estimator statistics, and for ``"weight"`` the unshrunk errors (``weighted_errors``:
    ``{path: [[e_{g,c}] per group]}``)."""
    if granularity not in GRANULARITIES:
        raise NasqError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}")
    if granularity == "weight" and curvature != "fisher":
        raise NasqError("granularity 'weight' pairs each weight's curvature with its own error, which needs the "
                        "exact diagonal: use curvature 'fisher' (--curvature fisher); the Hutchinson diagonal is "
                        "mostly noise per weight and can be negative")
    shrinkage = checked_shrinkage(shrinkage, granularity)
    estimate: dict[str, Any] = {}
    diagonals = None
    if traces is None:
        batches = _train_batches(data, n_batches, batch_size, seed)
        diagonals = weight_curvatures(model, batches, tensors, is_regression=data.task.is_regression,
                                      n_probes=n_probes, seed=seed, curvature=curvature)
        group_level = group_traces(model, batches, tensors, is_regression=data.task.is_regression,
                                   n_probes=n_probes, seed=seed, curvature=curvature, diagonals=diagonals)
        pooled = pooled_traces(group_level, tensors)
        traces = pooled if granularity == "tensor" else group_level
        estimate = {"n_batches": n_batches, **({"n_probes": n_probes} if curvature == "hutchinson" else {}),
                    "batch_size": batch_size, "train_rows": len(data.train)}
    elif granularity == "group" or (granularity == "weight" and weighted_errors is None):
        raise NasqError("traces given as per-tensor values score every group by its tensor's trace: use "
                        "granularity='tensor' (--granularity tensor), or 'weight' with the weighted errors a "
                        "per-weight plan recorded")
    else:
        group_level = pooled = [np.asarray(tr, np.float64) for tr in traces]
    if granularity == "weight":  # the curvature is inside the perturbations: unit traces (nothing clamped)
        if weighted_errors is None:
            perts = [_recordable(p) for p in weighted_perturbations(model, tensors, mode, diagonals)]
        else:
            perts = [np.asarray(p, np.float64) for p in weighted_errors]
            for t, p in zip(tensors, perts, strict=True):
                if p.shape != (t.num_groups, len(t.choices)):
                    raise NasqError(f"{t.path}: weighted errors {p.shape}, expected {(t.num_groups, len(t.choices))}")
        damages = perts
        if shrinkage:
            plain = quant_perturbations(model, tensors, mode)
            damages = [(1.0 - shrinkage) * w + shrinkage * np.asarray(tr, np.float64)[:, None] * q
                       for w, tr, q in zip(perts, pooled, plain, strict=True)]
        utils, clamped = hessian_utilities([np.ones(t.num_groups) for t in tensors], damages)
    else:
        perts = quant_perturbations(model, tensors, mode)
        utils, clamped = hessian_utilities(traces, perts)
    alloc = allocate(utils, size_tables(tensors) if costs is None else costs, budget, time_limit=time_limit)
    if info is not None:
        flat = np.concatenate(group_level)
        info.update({"solver": alloc.solver, "optimal": alloc.optimal, **estimate,
                     "curvature": curvature, "granularity": granularity,
                     **({"shrinkage": shrinkage} if shrinkage else {}),
                     "clamped_groups": clamped, "groups": int(flat.size),
                     "trace_per_weight": {"min": float(flat.min()), "median": float(np.median(flat)),
                                          "max": float(flat.max())},
                     "tensor_trace_per_weight": {t.path: float(tr[0])
                                                 for t, tr in zip(tensors, pooled, strict=True)}})
        if granularity == "weight":
            info["weighted_errors"] = {t.path: p.tolist() for t, p in zip(tensors, perts, strict=True)}
    return choices_to_bits(tensors, alloc.choices)


def _recordable(a: np.ndarray) -> np.ndarray:
    """``a`` rounded to ``RECORD_DIGITS`` significant digits, as the plan records it (so a plan re-solved from its
    record is the plan itself)."""
    return np.array([float(f"{x:.{RECORD_DIGITS}g}") for x in np.asarray(a, np.float64).ravel()],
                    np.float64).reshape(np.shape(a))


# a recorded trace per weight beyond this is not a model's (MiniLM's Fisher traces are about 1e-6 to 1e-1)
MAX_TRACE_PER_WEIGHT = 1e12


def recorded_traces(plan: Plan, tensors: Sequence[SearchedTensor], curvature: str, source: str
                    ) -> list[np.ndarray]:
    """The per-tensor traces ``Tr(H_t)/n_t`` a ``hessian`` plan recorded (``provenance["tensor_trace_per_weight"]``,
    written whatever its granularity), each tensor's value over its groups, in the order of ``tensors``: one
    estimate gives the per-tensor plans of every budget and space of the same model. The plan file is untrusted:
    its traces must be of ``curvature``, and every searched tensor must be in it with the same shape and a
    finite trace (``>= 0`` for the Gauss-Newton curvature), else ``NasqError`` naming ``source`` and the tensor."""
    prov, table = plan.provenance, plan.provenance.get("tensor_trace_per_weight")
    if prov.get("method") != "hessian" or not isinstance(table, dict):
        raise NasqError(f"{source}: not a plan of the hessian or fisher baseline (its provenance has no "
                        "tensor_trace_per_weight); make one with `nasq baseline fisher` or `nasq baseline hessian`")
    made = prov.get("curvature", "hutchinson")
    if made != curvature:
        raise NasqError(f"{source}: its traces are of the {made!r} curvature, not {curvature!r}; give a plan made "
                        f"with --curvature {curvature}" + (" (`nasq baseline fisher`)" * (curvature == "fisher")))
    shapes = {t.path: (t.rows, t.cols) for t in plan.tensors}
    lo = 0.0 if curvature == "fisher" else -MAX_TRACE_PER_WEIGHT
    out = []
    for t in tensors:
        v = table.get(t.path)
        if v is None:
            raise NasqError(f"{source}: no trace for tensor {t.path}; give a plan of the same model")
        if t.path not in shapes:
            raise NasqError(f"{source}: it has a trace of {t.path} but not the tensor itself (its shape), so it "
                            "cannot be checked against this model; give a plan written by `nasq baseline`")
        if shapes[t.path] != (t.rows, t.cols):
            raise NasqError(f"{source}: tensor {t.path} is {shapes[t.path][0]}x{shapes[t.path][1]} there but "
                            f"{t.rows}x{t.cols} in this model; give a plan of the same model")
        f = finite_number(v)
        if f is None or not lo <= f <= MAX_TRACE_PER_WEIGHT:
            raise NasqError(f"{source}: tensor_trace_per_weight[{t.path!r}] must be a finite number in "
                            f"[{lo:g}, {MAX_TRACE_PER_WEIGHT:g}], got {str(v)[:40]}")
        out.append(np.full(t.num_groups, f, np.float64))
    return out


def recorded_weighted_errors(plan: Plan, tensors: Sequence[SearchedTensor], source: str) -> list[np.ndarray]:
    """Each group's weighted error ``sum_{i in g} G_ii (w_i - Q_c(w_i))^2`` at each width a per-weight Fisher plan
    recorded (``provenance["weighted_errors"]``: ``{path: [[e_{g,c} for c in the tensor's choices] per group]}``),
    as ``[G, C]`` arrays in the order of ``tensors`` and of each tensor's choices: one estimate gives the per-weight
    plans of every budget, in any space of the same model whose tensors have the recorded row groups and a subset of
    the recorded widths. The plan file is untrusted: every searched tensor must be there with the same shape and
    groups, every value a finite number in ``[0, MAX_TRACE_PER_WEIGHT]``, else ``NasqError`` naming ``source`` and
    the tensor."""
    prov, table = plan.provenance, plan.provenance.get("weighted_errors")
    if prov.get("method") != "hessian" or prov.get("granularity") != "weight" or not isinstance(table, dict):
        raise NasqError(f"{source}: not a per-weight Fisher plan (its provenance has no weighted_errors), so it "
                        "cannot give per-weight plans; give a plan made with `nasq baseline hessian --curvature "
                        "fisher --granularity weight`, or re-solve its per-tensor traces with --granularity tensor")
    if prov.get("curvature") != "fisher":
        raise NasqError(f"{source}: a per-weight plan must be of the 'fisher' curvature, not "
                        f"{str(prov.get('curvature'))[:40]!r}")
    recorded = {t.path: t for t in plan.tensors}
    out = []
    for t in tensors:
        rows, r = table.get(t.path), recorded.get(t.path)
        if rows is None or r is None:
            raise NasqError(f"{source}: no weighted errors for tensor {t.path}; give a plan of the same model")
        if (r.rows, r.cols) != (t.rows, t.cols) or list(r.group_sizes) != list(t.group_sizes):
            raise NasqError(f"{source}: tensor {t.path} is {r.rows}x{r.cols} in {len(r.group_sizes)} row groups "
                            f"there but {t.rows}x{t.cols} in {t.num_groups} here; give a plan of the same model and "
                            "group size")
        missing = sorted(set(t.choices) - set(r.choices))
        if missing:
            raise NasqError(f"{source}: tensor {t.path} has weighted errors at widths {list(r.choices)}, not at "
                            f"{missing}; give a plan made in a space with these widths")
        if not isinstance(rows, list) or len(rows) != t.num_groups or any(
                not isinstance(row, list) or len(row) != len(r.choices) for row in rows):
            raise NasqError(f"{source}: weighted_errors[{t.path!r}] must be {t.num_groups} lists of "
                            f"{len(r.choices)} numbers (one per width {list(r.choices)})")
        values = np.zeros((t.num_groups, len(t.choices)), np.float64)
        cols = [list(r.choices).index(c) for c in t.choices]
        for g, row in enumerate(rows):
            for k, j in enumerate(cols):
                f = finite_number(row[j])
                if f is None or not 0.0 <= f <= MAX_TRACE_PER_WEIGHT:
                    raise NasqError(f"{source}: weighted_errors[{t.path!r}][{g}][{j}] must be a finite number in "
                                    f"[0, {MAX_TRACE_PER_WEIGHT:g}], got {str(row[j])[:40]}")
                values[g, k] = f
        out.append(values)
    return out
