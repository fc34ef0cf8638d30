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

both medians of single jitted calls (one dispatch each). It is an estimate (fusion across layers makes the subtraction inexact); with
``measure_fixed=False`` it is 0 and a latency budget then covers the searched linears only. The fp32 forward runs
XLA's attention core; where the native kernel runs, the integer model's attention core is native and faster
(``nasq.kernels.native.attention``), so ``fixed_ms`` over-estimates the rest there and a budget errs on the safe
side (the searched linears get less time than they could).
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
from nasq.kernels.int_bert import PanelLinear, panel_linear_apply
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


def fixed_remainder_ms(model, shapes: dict[str, tuple[int, int]], tokens: int, repeats: int) -> float:
    """``max(0, T(fp32 forward) - sum T(fp32 encoder linears))`` at ``tokens`` tokens (see module docstring)."""
    from flax import nnx

    max_pos = int(model.config.max_position_embeddings)
    seq = max(1, min(tokens, max_pos))
    batch = max(1, -(-tokens // seq))
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
    return max(0.0, full - linear_total)


def profile_latency(
    model_ref: str | Path,
    *,
    tokens: int = 128,
    bits: Sequence[int] | None = None,
    repeats: int = 20,
    measure_fixed: bool = True,
    log=None,
) -> LatencyTable:
    """Measure a :class:`~nasq.contract.cost.LatencyTable` for the model ``model_ref`` (alias, dir or hub id).

    ``tokens`` = batch * sequence length of the workload; ``bits`` the widths to measure (default 1..8; 0 =
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
    fixed = fixed_remainder_ms(model, shapes, tokens, repeats) if measure_fixed else 0.0
    meta = {
        "model": str(report.model_dir), "tokens": tokens, "repeats": repeats, "bits": widths,
        "rows": {str(c): r for c, r in rows_for.items()}, "fixed_measured": bool(measure_fixed),
        "device": str(jax.devices()[0]), "platform": platform.platform(), "machine": platform.machine(),
        "jax_version": jax.__version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "kernel": measured_path(),
    }
    return LatencyTable(tokens=tokens, fixed_ms=float(fixed), ms_per_row=table, meta=meta)
