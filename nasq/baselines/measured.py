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

**Refinement** (``refine_rounds = R``, ``nasq baseline measured --refine-rounds R``). The sum above is a
linearisation at fp32: it misses that a tensor's damage depends on what the others do. Round ``r`` re-measures
around the previous round's plan ``P``: ``D_t(c | P)`` is the KL with every other tensor at ``P``'s widths and
``t`` at ``c``, and the knapsack is solved again on those damages (a tensor's constant ``D(P)`` share does not
change the optimum). Each round's plan is scored by its joint output KL ``KL(f || f_P)`` on the same rows, and the
plan of least joint KL is kept, so refinement never returns a plan that measures worse than round 0's *on those
rows*. Cost: one more forward per (tensor, choice) and one per plan, per round. Measured on SST-2 at avg 1.5 bits
(seed 0, experiments/results/protocol/NOTES.md) it did not help: round 1 cut the joint KL on the 256 measurement
rows by 31% but raised it on the dev set by 3% (the train rows are short phrases, dev whole sentences), and after
QAT the refined plan scored 86.70% against the unrefined one's 87.16%. Off by default.

**Spreading a tensor's damage by curvature** (``spread="hessian"``, ``nasq baseline measured --spread hessian``).
By default the groups of one tensor share its damage by rows, so the knapsack sees them as interchangeable and
tends to move whole tensors. With ``spread="hessian"`` the measured damage of each (tensor, width) is split over
the tensor's groups in proportion to the Hessian baseline's estimate for the same group and width
(:mod:`nasq.baselines.hessian`: ``h_{g,c} = Tr(H_g)/n_g * ||W_g - Q_c(W_g)||^2``, Hutchinson on the same rows)::

    d_{g,c} = D_t(c) * h_{g,c} / sum_{g' in t} h_{g',c}

The measurement still sets how much each tensor and width costs (a tensor at one width for all its groups costs
``D_t(c)``, as measured); the Hessian only says which of its groups carry that cost, so the plan can keep a
tensor's most sensitive rows at more bits, as the Hessian plans do. Motivated by SST-2 at avg 1.5 bits with
1,600 QAT steps, where the Hessian plans (mixed widths inside each tensor) scored above the measured ones (whole
tensors at one width): experiments/results/protocol/NOTES.md, nineteenth session. Costs the Hessian baseline's
Hessian-vector products on top of the forwards. ``spread="fisher"`` splits by the Gauss-Newton traces instead
(``Tr(G_g)/n_g``, :func:`nasq.baselines.hessian.gauss_newton_diagonal`: exact on the same rows, never negative;
on CoLA two draws of 512 rows ranked the group traces alike with Spearman 0.996, where two draws of the Hutchinson
estimates barely agreed, 0.07): about a minute more on MiniLM.

**What the plan is expected to buy** (:func:`predicted_damage`, :func:`uniform_reference`): the same additive sum
gives the plan's predicted output KL, ``sum_t sum_g D_t(c_g) rows_g / rows_t`` (with ``spread="hessian"``, its
shares in place of ``rows_g / rows_t``), and that of the widest uniform width that fits the budget (every tensor
at one width, the baseline a user would otherwise pick); both are recorded in the plan (``predicted_kl_x1000``)
and printed. It is a prediction before QAT, not a result; how it relates to the results after QAT:
experiments/results/protocol/NOTES.md (fifteenth session).

Cost: one forward of the rows per (tensor, choice), from the tensor's own layer on (the layers before it are
cached: :class:`_Probe`); no backward. MiniLM, 36 tensors x 4 choices: the whole command took 0.57-0.69x the time
of full forwards, with the same damages and plan (experiments/results/measured_staged_probe.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nasq.baselines.hessian import (
    _train_batches,
    group_traces,
    hessian_utilities,
    quant_perturbations,
    quantized_rows,
    tensor_weights,
)
from nasq.contract.cost import size_tables
from nasq.contract.damage import damage_from_plan, group_damage, predicted_damage, uniform_reference
from nasq.contract.space import SearchedTensor
from nasq.errors import NasqError
from nasq.models.bert import Embedding, Linear, attention_bias
from nasq.models.surgery import module_path, strip_root
from nasq.search.finalize import allocate, choices_to_bits

__all__ = ["SPREADS", "damage_from_plan", "hessian_shares", "kl_rows", "measured_allocation", "measured_utilities",
           "predicted_damage", "tensor_damage", "uniform_reference"]

SPREADS = ("rows", "hessian", "fisher")
"""How a tensor's measured damage is split over its row groups (module docstring)."""


def kl_rows(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """``KL(softmax(p) || softmax(q))`` per row (float64), from logits ``[N, C]``."""
    p = np.asarray(p_logits, np.float64)
    q = np.asarray(q_logits, np.float64)
    lp = p - np.logaddexp.reduce(p, axis=1, keepdims=True)
    lq = q - np.logaddexp.reduce(q, axis=1, keepdims=True)
    return (np.exp(lp) * (lp - lq)).sum(1)


class _Probe:
    """The fp32 model's logits on ``batches`` and a forward of the same model with some tensors replaced: the one
    measurement every damage here is made of.

    The forward runs in stages, one compiled program each: the embeddings, one encoder layer (the same program for
    every layer), the pooler and classifier. A tensor's damage only changes the stages from its own onwards, so
    :meth:`kl` with ``changed=(start, i)`` reuses the hidden states ``start`` gave the stages before tensor ``i``'s
    (cached for the last such state) and runs only the rest: on a 6-layer MiniLM about 0.6x the forwards' work
    over all tensors, and the same numbers as running every stage (the same programs on the same inputs). The
    cache holds ``layers + 1`` hidden states per batch (MiniLM, 8 batches of 32 x 128 tokens: about 0.35 GB at
    most)."""

    def __init__(self, model: nnx.Module, batches: Sequence[Any], tensors: Sequence[SearchedTensor], mode: str):
        _, state = nnx.split(model)
        self.flat = dict(nnx.to_flat_state(state))
        paths = {strip_root(module_path(p)): (p, m) for p, m in nnx.iter_modules(model)
                 if isinstance(m, (Linear, Embedding))}
        self.keys = []  # (weight key, bias key, is_linear) per tensor
        for t in tensors:
            mpath, mod = paths[t.path]
            is_linear = isinstance(mod, Linear)
            self.keys.append((mpath + ("kernel" if is_linear else "embedding",), mpath + ("bias",), is_linear))
        self.tensors, self.mode, self.batches = list(tensors), mode, list(batches)
        self.wb = tensor_weights(model, tensors)
        n_layers = len(model.bert.encoder.layer)
        # stage s of the forward: 0 the embeddings, 1..L encoder layer s-1, L+1 the pooler and classifier; a
        # stage's weights are the flat keys under its prefixes
        self._prefixes = ([(("bert", "embeddings"),)] + [(("bert", "encoder", "layer", i),) for i in range(n_layers)]
                          + [(("bert", "pooler"), ("classifier",))])
        self.stage = [self._stage_of(k[0]) for k in self.keys]
        emb_def = nnx.graphdef(model.bert.embeddings)
        layer_def = nnx.graphdef(model.bert.encoder.layer[0])
        pool_def, cls_def = nnx.graphdef(model.bert.pooler), nnx.graphdef(model.classifier)
        self._stage_fns = [jax.jit(lambda s, ids, tt, mb: nnx.merge(emb_def, s[0])(ids, tt, None))]
        self._stage_fns += [jax.jit(lambda s, x, mb: nnx.merge(layer_def, s[0])(x, mb, None)[0])] * n_layers
        self._stage_fns += [jax.jit(lambda s, x, mb: nnx.merge(cls_def, s[1])(nnx.merge(pool_def, s[0])(x)))]
        self._bias = [attention_bias(jnp.asarray(b.attention_mask)) for b in self.batches]
        self.weights = [np.asarray(b.weights, np.float64) for b in batches]
        self.total_w = float(sum(w.sum() for w in self.weights))
        # (state, each batch's stage inputs): filled with the fp32 model's while its logits are computed, the start
        # of every damage measured from fp32
        self.base, kept = self._run(self.flat, 0, self.batches, keep=True)
        self._cached: tuple[dict, list[list[jax.Array]]] = (self.flat, kept)
        self._last_plan: tuple[tuple, dict] | None = None

    def _stage_of(self, key: tuple) -> int:
        return next(s for s, pre in enumerate(self._prefixes) if any(key[:len(p)] == p for p in pre))

    def _stage_state(self, flat: dict, s: int) -> tuple:
        return tuple(nnx.from_flat_state({k[len(p):]: v for k, v in flat.items() if k[:len(p)] == p})
                     for p in self._prefixes[s])

    def _run(self, flat: dict, first: int, inputs: Sequence[Any], keep: bool = False):
        """Stages ``first``.. on each batch, from ``inputs[b]`` (batch ``b``'s input to stage ``first``; the batch
        itself for stage 0): the logits, and with ``keep`` every stage's input per batch."""
        states = [self._stage_state(flat, s) for s in range(first, len(self._prefixes))]
        logits, kept = [], []
        for b, x, mb in zip(self.batches, inputs, self._bias, strict=True):
            seen = [x]
            for s, st in zip(range(first, len(self._prefixes)), states):
                x = self._stage_fns[0](st, b.input_ids, b.token_type_ids, mb) if s == 0 else \
                    self._stage_fns[s](st, x, mb)
                seen.append(x)
            logits.append(np.asarray(x))
            kept.append(seen[:-1])
        return (logits, kept) if keep else logits

    def _logits(self, flat: dict, changed: tuple[dict, int] | None = None) -> list[np.ndarray]:
        if changed is None:
            return self._run(flat, 0, self.batches)
        start, i = changed
        if self._cached[0] is not start:
            self._cached = (start, self._run(start, 0, self.batches, keep=True)[1])
        first = self.stage[i]
        return self._run(flat, first, [seen[first] for seen in self._cached[1]])

    def replace(self, flat: dict, i: int, wq: np.ndarray, bq: np.ndarray | None) -> None:
        """Tensor ``i``'s rows ``wq`` (and bias ``bq``) into ``flat`` (in place)."""
        key, bias_key, is_linear = self.keys[i]
        flat[key] = self.flat[key].replace(jnp.asarray(wq.T if is_linear else wq))
        if bq is not None:
            flat[bias_key] = self.flat[bias_key].replace(jnp.asarray(bq))

    def at_plan(self, bits: Sequence[Sequence[int]]) -> dict:
        """The flat state with every tensor at the plan's widths (``bits[t][g]``: group ``g`` of tensor ``t``); the
        last plan's state is kept, so a refinement round quantizes its plan once (its KL, then the damages around
        it). Callers copy it before changing it."""
        key = tuple(tuple(int(c) for c in row) for row in bits)
        if self._last_plan is None or self._last_plan[0] != key:
            flat = dict(self.flat)
            for i, (t, (w, b)) in enumerate(zip(self.tensors, self.wb, strict=True)):
                self.replace(flat, i, *plan_rows(t, w, b, bits[i], self.mode))
            self._last_plan = (key, flat)
        return self._last_plan[1]

    def kl(self, flat: dict, changed: tuple[dict, int] | None = None) -> float:
        """Mean over the real rows of ``KL(fp32 output || output of the model with state flat)``. With ``changed =
        (start, i)``, ``flat`` is ``start`` with only tensor ``i`` replaced (the stages before its own are not
        run again)."""
        q = self._logits(flat, changed)
        kl = sum(float((kl_rows(p, qq) * wt).sum()) for p, qq, wt in zip(self.base, q, self.weights)) / self.total_w
        # A KL is >= 0; float rounding of a tiny one can land just below (e.g. -2e-15), which a damage file's
        # loader would then refuse as negative. NaN stays NaN (tensor_damage names it).
        return max(kl, 0.0) if not math.isnan(kl) else kl


def plan_rows(t: SearchedTensor, w: np.ndarray, b: np.ndarray | None, bits: Sequence[int],
              mode: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Tensor ``t``'s rows ``w`` and bias ``b`` with group ``g`` at ``bits[g]`` (MSE-initialised steps per group,
    as :func:`nasq.baselines.hessian.quantized_rows`; 0 bits: rows and bias zeroed)."""
    per_row = np.repeat(np.asarray(bits, np.int64), np.asarray(t.group_sizes))
    wq = np.empty_like(w)
    bq = None if b is None else np.empty_like(b)
    for c in np.unique(per_row):
        qw, qb = quantized_rows(t, w, b, int(c), mode)
        sel = per_row == c
        wq[sel] = qw[sel]
        if bq is not None:
            bq[sel] = qb[sel]
    return wq, bq


def tensor_damage(
    model: nnx.Module,
    batches: Sequence[Any],
    tensors: Sequence[SearchedTensor],
    mode: str,
    *,
    progress=None,
    around: Sequence[Sequence[int]] | None = None,
    probe: _Probe | None = None,
) -> list[np.ndarray]:
    """``D_t(c)`` (module docstring) as float64 ``[len(t.choices)]`` per tensor: the mean over the real rows of
    ``batches`` (``Batch`` objects; padding rows have weight 0) of the KL divergence of the model's output with only
    ``t`` at choice ``c`` from its fp32 output. With ``around`` (bits per group of a plan), every other tensor is at
    the plan's widths instead of fp32: ``D_t(c | plan)``, the damage of ``t`` at ``c`` given the rest quantized.
    ``progress(done, total)`` is called after each forward."""
    probe = probe or _Probe(model, batches, tensors, mode)
    start = probe.flat if around is None else probe.at_plan(around)
    out, done, total = [], 0, sum(len(t.choices) for t in tensors)
    for i, (t, (w, b)) in enumerate(zip(tensors, probe.wb, strict=True)):
        damage = np.zeros(len(t.choices), np.float64)
        for k, c in enumerate(t.choices):
            new = dict(start)
            probe.replace(new, i, *quantized_rows(t, w, b, int(c), mode))
            damage[k] = probe.kl(new, changed=(start, i))
            if not math.isfinite(damage[k]):
                raise NasqError(f"the output KL with {t.path} at {int(c)} bits is {damage[k]} (the quantized model's "
                                "outputs overflowed); check the checkpoint's weights are finite, or leave this "
                                "width out of the search space")
            done += 1
            if progress is not None:
                progress(done, total)
        out.append(damage)
    return out


def hessian_shares(tensors: Sequence[SearchedTensor], traces: Sequence[np.ndarray],
                   perturbations: Sequence[np.ndarray]) -> list[np.ndarray]:
    """``s_{g,c} = h_{g,c} / sum_{g'} h_{g',c}`` per tensor (``[G, C]``, columns summing to 1), with ``h`` the
    Hessian baseline's group estimate ``Tr(H_g)/n_g * ||W_g - Q_c(W_g)||^2`` (its clamp of non-positive traces
    included); a width whose column is all zero falls back to the rows' shares."""
    utils, _ = hessian_utilities(traces, perturbations)
    out = []
    for t, u in zip(tensors, utils, strict=True):
        h = -np.asarray(u, np.float64)
        col = h.sum(axis=0, keepdims=True)
        rows = (np.asarray(t.group_sizes, np.float64) / t.rows)[:, None]
        out.append(np.where(col > 0, h / np.where(col > 0, col, 1.0), rows))
    return out


def measured_utilities(tensors: Sequence[SearchedTensor], damage: Sequence[np.ndarray],
                       shares: Sequence[np.ndarray] | None = None) -> list[np.ndarray]:
    """``u_{g,c} = -d_{g,c}`` (:func:`group_damage`: ``D_t(c) * rows_g / rows_t``, or ``D_t(c) * shares``;
    ``[G, C]`` per tensor), normalised by ``max |u|``."""
    utils = [-d for d in group_damage(tensors, damage, shares)]
    scale = max((float(np.abs(u).max()) for u in utils if u.size), default=0.0)
    return [u / scale for u in utils] if scale > 0 else utils


def measured_allocation(
    model: nnx.Module,
    data,
    tensors: Sequence[SearchedTensor],
    budget: int,
    *,
    costs: Sequence[np.ndarray] | None = None,
    n_batches: int = 8,
    seed: int = 0,
    mode: str = "symmetric",
    batch_size: int = 32,
    time_limit: float = 20.0,
    info: dict | None = None,
    progress=None,
    damage: Sequence[np.ndarray] | None = None,
    refine_rounds: int = 0,
    min_tokens: int = 0,
    spread: str = "rows",
    n_probes: int = 4,
) -> list[tuple[int, ...]]:
    """Bits per group maximising ``sum_g u_{g,c_g}`` (module docstring) with a cost within ``budget``: bytes, or
    the units of ``costs`` (per-tensor ``[G, C]`` integer tables, e.g. a latency budget's
    :func:`nasq.contract.cost.latency_ns_tables`; the uniform reference is then not predicted). ``model`` is the
    fp32 fine-tuned model, ``data`` a :class:`nasq.data.tasks.TaskData` whose ``train`` rows give ``n_batches``
    seeded batches of ``batch_size`` (the Hessian baseline's rows for the same arguments). ``damage``: damages
    measured before (:func:`damage_from_plan`; then neither ``model`` nor ``data`` is read). ``refine_rounds``:
    re-measure around the plan and re-solve that many times, keep the plan of least joint KL (module docstring).
    ``min_tokens``: measure on train rows of at least that many tokens only. ``spread``: ``"rows"`` or
    ``"hessian"`` (a tensor's damage split over its groups by the Hessian estimate on the same rows, ``n_probes``
    Rademacher probes; module docstring) or ``"fisher"`` (by the Gauss-Newton traces, exact on the same rows).
    ``info`` (optional dict) receives the fp32-based damages, solver statistics and the refinement rounds."""
    if refine_rounds < 0:
        raise NasqError(f"refine_rounds must be >= 0, got {refine_rounds}")
    if refine_rounds and damage is not None:
        raise NasqError("refining a measured plan needs the model and data (forwards around each plan), not "
                        "recorded damages (--damage-from)")
    if spread not in SPREADS:
        raise NasqError(f"spread must be one of {', '.join(SPREADS)}, got {spread!r}")
    if spread != "rows" and damage is not None:
        raise NasqError(f"--spread {spread} needs the model and data (Hessian traces on the measured rows), not "
                        "recorded damages (--damage-from); drop one")
    rows, probe, shares = None, None, None
    tables = size_tables(tensors) if costs is None else costs

    def solve(d):
        return allocate(measured_utilities(tensors, d, shares), tables, budget, time_limit=time_limit)

    if damage is None:
        batches = _train_batches(data, n_batches, batch_size, seed, min_tokens)
        probe = _Probe(model, batches, tensors, mode)
        damage = tensor_damage(model, batches, tensors, mode, progress=progress, probe=probe)
        rows = int(sum(float(np.asarray(b.weights).sum()) for b in batches))
        if spread != "rows":
            traces = group_traces(model, batches, tensors, is_regression=data.task.is_regression, n_probes=n_probes,
                                  seed=seed, curvature="hutchinson" if spread == "hessian" else "fisher")
            shares = hessian_shares(tensors, traces, quant_perturbations(model, tensors, mode))
    alloc = solve(damage)
    if refine_rounds:
        rounds = []
        best, best_round = alloc, 0
        bits = choices_to_bits(tensors, alloc.choices)
        best_kl = probe.kl(probe.at_plan(bits))
        rounds.append({"round": 0, "joint_kl_x1000": 1000 * best_kl})
        for r in range(1, refine_rounds + 1):
            cond = tensor_damage(model, probe.batches, tensors, mode, progress=progress, around=bits, probe=probe)
            cand = solve(cond)
            bits = choices_to_bits(tensors, cand.choices)
            kl = probe.kl(probe.at_plan(bits))
            changed = sum(int(a != b) for x, y in zip(alloc.choices, cand.choices, strict=True)
                          for a, b in zip(x, y, strict=True))
            rounds.append({"round": r, "joint_kl_x1000": 1000 * kl, "groups_changed_vs_round0": changed})
            if kl < best_kl:
                best, best_kl, best_round = cand, kl, r
        if info is not None:
            info["refine"] = {"rounds": rounds, "chosen_round": best_round}
        alloc = best
    bits = choices_to_bits(tensors, alloc.choices)
    if info is not None:
        if rows is not None:
            info.update({"n_batches": n_batches, "batch_size": batch_size, "train_rows": len(data.train),
                         "rows": rows, **({"min_tokens": int(min_tokens)} if min_tokens else {})})
        # "plan": split by rows, as `nasq inspect --damage-from` predicts any plan; with --spread hessian the
        # prediction under the shares the plan was solved with is recorded beside it (optimistic: the plan was
        # chosen to minimise exactly that sum).
        pred = {"plan": 1000 * predicted_damage(tensors, damage, bits)}
        if spread != "rows":
            info.update(spread=spread, **({"n_probes": int(n_probes)} if spread == "hessian" else {}))
            pred[f"plan_{spread}_spread"] = 1000 * predicted_damage(tensors, damage, bits, shares)
        if costs is None and (ref := uniform_reference(tensors, damage, budget)) is not None:
            pred["uniform"] = 1000 * ref[1]
            info["predicted_uniform_bits"] = ref[0]
        info.update({"solver": alloc.solver, "optimal": alloc.optimal, "predicted_kl_x1000": pred,
                     "damage_kl_x1000": {t.path: {str(int(c)): 1000 * float(v)
                                                  for c, v in zip(t.choices, d, strict=True)}
                                         for t, d in zip(tensors, damage, strict=True)}})
    return bits
