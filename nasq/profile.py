"""`nasq profile`: measure a latency lookup table for `--latency-ms` search budgets on *this* machine.

For every distinct input width ``cols`` of the model's encoder linears and every bit width ``b`` the
jitted integer linear that a loaded artifact runs (resident panels on the native kernel,
:func:`nasq.kernels.int_linear.packed_linear_apply` on XLA; ``meta["kernel"]`` records which) runs on ``x [tokens, cols]`` with ``rows`` = the most common ``out_features`` among the linears with that
``cols``; the entry is

    ms_per_row(cols, b) = median_r(wall time of one call) / rows

so a group of ``r`` rows costs ``r * ms_per_row`` in the search's latency model (`nasq.contract.cost.latency_table`).
The per-call overhead (activation quantization, scatter) is spread over the rows: the model is linear in rows,
which is what the search needs.

``fixed_ms`` estimates the unsearched rest of a forward pass (embeddings, attention scores/softmax, LayerNorm,
GELU, pooler, classifier):

    fixed_ms = max(0, T(fp32 forward at `tokens` tokens) - T(every encoder linear's fp32 x @ W_l^T + b_l))

both medians of single jitted calls (one dispatch each). The fp32 forward runs XLA's attention core; where the
native kernel runs, the integer model an artifact loads runs the native one (``nasq.kernels.native.attention``,
faster: XLA CPU runs the batched dots on one thread), so there the attention core is swapped in the estimate:

    fixed_ms = max(0, T(fp32 forward) - T(encoder linears) - T(L x XLA attention core) + T(L x native core))

with both cores timed the same way (all ``L`` layers in one jitted call, :func:`nasq.kernels.int_bert.attention_core`
at ``[batch, seq, heads, head_dim]``; ``meta["attention"]`` records which core the estimate is for). It is an
estimate (fusion across layers makes the subtraction inexact); with ``measure_fixed=False`` it is 0 and a latency
budget then covers the searched linears only.
"""

from __future__ import annotations

import platform
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from nasq.contract.cost import LatencyTable
from nasq.errors import NasqError
from nasq.kernels import native
from nasq.kernels.int_bert import PanelLinear, attention_core, panel_linear_apply
from nasq.kernels.int_linear import pack_linear, packed_linear_apply
from nasq.models.bert import Linear
from nasq.models.loading import load_pretrained
from nasq.models.surgery import iter_named
from nasq.timing import median_ms

DEFAULT_BITS = (1, 2, 3, 4, 5, 6, 7, 8)


def encoder_linear_shapes(model) -> dict[str, tuple[int, int]]:
    """``{path: (rows, cols)}`` of the model's encoder linears (the ones a search space can search)."""
    return {p: (m.out_features, m.in_features) for p, m in iter_named(model.bert, (Linear,))
            if p.startswith("encoder.")}


def typical_rows(shapes: dict[str, tuple[int, int]]) -> dict[int, int]:
    """``{cols: rows}``: the most common ``out_features`` among linears with that ``cols`` (ties: the larger)."""
    by_cols: dict[int, Counter] = {}
    for rows, cols in shapes.values():
        by_cols.setdefault(cols, Counter())[rows] += 1
    return {c: max(cnt.items(), key=lambda kv: (kv[1], kv[0]))[0] for c, cnt in sorted(by_cols.items())}


def kernel_ms(tokens: int, rows: int, cols: int, bits: int, repeats: int, seed: int = 0) -> float:
    """Median ms of one jitted call of the integer linear a loaded artifact runs (``measured_path``) on
    ``x [tokens, cols]``, ``rows`` rows at ``bits``: resident panels on the native kernel, else
    ``packed_linear_apply`` (XLA)."""
    rng = np.random.default_rng(seed)
    w = (0.05 * rng.standard_normal((rows, cols))).astype(np.float32)
    b = (0.01 * rng.standard_normal(rows)).astype(np.float32)
    p = pack_linear(w, b, [rows], [bits], np.array([0.02], np.float32))
    x = jnp.asarray(rng.standard_normal((tokens, cols)).astype(np.float32))
    if native.resolve_kernel() == "native":  # what load_artifact's default (unpack="auto") runs there
        return median_ms(jax.jit(panel_linear_apply), x, PanelLinear.from_packed(p), repeats=repeats)
    return median_ms(jax.jit(packed_linear_apply), x, p, repeats=repeats)


def measured_path() -> str:
    """Which integer linear ``kernel_ms`` times here, for the table's metadata."""
    if native.resolve_kernel() == "native":
        return f"resident panels, {native.describe()}"
    return f"packed_linear_apply, {native.describe()}"


def workload_shape(tokens: int, seq_len: int | None, max_positions: int) -> tuple[int, int]:
    """``(batch, seq)`` of the workload: ``tokens / seq_len`` sequences of ``seq_len`` tokens; without
    ``seq_len`` one sequence of ``tokens`` (at most ``max_positions``; more tokens: whole sequences of that length)."""
    if seq_len is None:
        seq = max(1, min(tokens, max_positions))
        return max(1, -(-tokens // seq)), seq
    if not 1 <= seq_len <= max_positions:
        raise NasqError(f"--seq-len must be in [1, {max_positions}] (the model's positions), got {seq_len}")
    if tokens % seq_len:
        raise NasqError(f"--tokens {tokens} is not a whole number of sequences of --seq-len {seq_len}; "
                        f"use a multiple, e.g. --tokens {max(1, tokens // seq_len) * seq_len}")
    return tokens // seq_len, seq_len


def fixed_remainder_ms(model, shapes: dict[str, tuple[int, int]], tokens: int, repeats: int,
                       seq_len: int | None = None) -> float:
    """``max(0, T(fp32 forward) - sum T(fp32 encoder linears))`` at ``tokens`` tokens in sequences of ``seq_len``
    (see module docstring and :func:`workload_shape`)."""
    from flax import nnx

    batch, seq = workload_shape(tokens, seq_len, int(model.config.max_position_embeddings))
    ids = jnp.full((batch, seq), 1000, jnp.int32).at[:, 0].set(101)
    tt = jnp.zeros_like(ids)
    am = jnp.ones_like(ids)
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, ids, tt, am):
        return nnx.merge(graphdef, state)(ids, tt, am)

    full = median_ms(forward, state, ids, tt, am, repeats=repeats)
    # All encoder linears in one jitted program (one dispatch, like the forward pass).
    rng = np.random.default_rng(0)
    xs, ws, bs = [], [], []
    for rows, cols in shapes.values():
        xs.append(jnp.asarray(rng.standard_normal((batch * seq, cols)).astype(np.float32)))
        ws.append(jnp.asarray(rng.standard_normal((rows, cols)).astype(np.float32)))
        bs.append(jnp.zeros((rows,), jnp.float32))
    linears = jax.jit(lambda xs, ws, bs: [x @ w.T + b for x, w, b in zip(xs, ws, bs)])
    linear_total = median_ms(linears, xs, ws, bs, repeats=repeats)
    swap = 0.0
    if attention_path() == "native":
        cfg = model.config
        layers, shape = cfg.num_hidden_layers, (batch, seq, cfg.num_attention_heads, cfg.head_dim)
        swap = attention_ms("native", shape, layers, repeats) - attention_ms("xla", shape, layers, repeats)
    return max(0.0, full - linear_total + swap)


def attention_path() -> str:
    """The attention core an integer model loaded here runs (``IntBertMeta.attention=None``: the GEMM's path)."""
    return native.resolve_kernel()


def attention_ms(core: str, shape: tuple[int, int, int, int], layers: int, repeats: int) -> float:
    """Median ms of ``layers`` attention cores (:func:`~nasq.kernels.int_bert.attention_core`, ``core``) on
    ``q, k, v`` of ``shape = (batch, seq, heads, head_dim)``, all in one jitted call, keys unmasked."""
    rng = np.random.default_rng(1)
    qkv = [tuple(jnp.asarray(rng.standard_normal(shape).astype(np.float32)) for _ in range(3)) for _ in range(layers)]
    bias = jnp.zeros((shape[0], 1, 1, shape[1]), jnp.float32)
    cores = jax.jit(lambda qkv, bias: [attention_core(q, k, v, bias, core) for q, k, v in qkv])
    return median_ms(cores, qkv, bias, repeats=repeats)


def profile_latency(
    model_ref: str | Path,
    *,
    tokens: int = 128,
    seq_len: int | None = None,
    bits: Sequence[int] | None = None,
    repeats: int = 20,
    measure_fixed: bool = True,
    log=None,
) -> LatencyTable:
    """Measure a :class:`~nasq.contract.cost.LatencyTable` for the model ``model_ref`` (alias, dir or hub id).

    ``tokens`` = batch * sequence length of the workload, ``seq_len`` its sequence length (attention is quadratic
    in it; default: one sequence of ``tokens``, see :func:`workload_shape`); ``bits`` the widths to measure (default 1..8; 0 =
    pruned costs nothing and is never measured); ``repeats`` timed calls per entry (median).
    """
    if tokens < 1:
        raise NasqError(f"--tokens must be >= 1, got {tokens}")
    if repeats < 1:
        raise NasqError(f"--repeats must be >= 1, got {repeats}")
    widths = sorted({int(b) for b in (DEFAULT_BITS if bits is None else bits) if int(b) != 0})
    bad = [b for b in widths if not 1 <= b <= 8]
    if bad or not widths:
        raise NasqError(f"bit widths to profile must be in 1..8, got {list(bits or [])}")
    model, _cfg, report = load_pretrained(model_ref, 2)
    batch, seq = workload_shape(tokens, seq_len, int(model.config.max_position_embeddings))
    shapes = encoder_linear_shapes(model)
    if not shapes:
        raise NasqError(f"model {model_ref}: no encoder linears found to profile")
    rows_for = typical_rows(shapes)
    table: dict[tuple[int, int], float] = {}
    for cols, rows in rows_for.items():
        for b in widths:
            table[(cols, b)] = kernel_ms(tokens, rows, cols, b, repeats) / rows
            if log:
                log(f"cols={cols} rows={rows} bits={b}: {table[(cols, b)] * rows:.4f} ms "
                    f"({table[(cols, b)]:.3g} ms/row)")
    fixed = fixed_remainder_ms(model, shapes, tokens, repeats, seq) if measure_fixed else 0.0
    meta = {
        "model": str(report.model_dir), "tokens": tokens, "batch": batch, "seq_len": seq, "repeats": repeats, "bits": widths,
        "rows": {str(c): r for c, r in rows_for.items()}, "fixed_measured": bool(measure_fixed),
        "device": str(jax.devices()[0]), "platform": platform.platform(), "machine": platform.machine(),
        "jax_version": jax.__version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "kernel": measured_path(), "attention": attention_path() if measure_fixed else None,
    }
    return LatencyTable(tokens=tokens, fixed_ms=float(fixed), ms_per_row=table, meta=meta)
