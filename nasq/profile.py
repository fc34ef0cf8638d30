"""`nasq profile`: measure a latency lookup table for `--latency-ms` search budgets on *this* machine.

Everything is timed on the integer path an exported artifact runs here (native kernel where built: resident
panels and the native attention core; else XLA; ``meta["kernel"]`` / ``meta["attention"]`` record which), at the
workload's shape ``[batch, seq]`` (``tokens = batch * seq``, :func:`workload_shape`).

**Per row.** For every distinct input width ``cols`` of the model's encoder linears and every bit width ``b``, the
integer linear runs on ``x [tokens, cols]`` with ``rows`` = the most common ``out_features`` among the linears
with that ``cols``. One jitted call also pays a dispatch, which a whole forward pays once, not once per linear, so
the entry is the marginal cost of one more call in a chain of ``K`` dependent calls, each with its own weights:

    ms_per_row(cols, b) = (T(K chained calls) - T(1 call)) / (K - 1) / rows

(medians of interleaved calls). A group of ``r`` rows costs ``r * ms_per_row`` in the search's latency model
(`nasq.contract.cost.latency_table`): linear in rows, which is what the search needs.

**Fixed.** ``fixed_ms`` is the rest of the forward (embeddings, activation quantization, attention core,
LayerNorm, GELU, pooler, classifier, dispatch), calibrated on a whole integer model: the model with every encoder
linear at one width ``c`` (the profiled width nearest 4) is exported and loaded as an artifact is, and

    fixed_ms = max(0, T(that artifact's forward) - sum_l rows_l * ms_per_row(cols_l, c))

so the table predicts the calibration model's own latency exactly, and another plan's by the per-row
differences of its widths. ``experiments/latency_model_check.py`` compares predictions with real artifacts'
measured forwards (experiments/results/bench.md). With ``measure_fixed=False`` it is 0 and a latency budget then
covers the searched linears only.
"""

from __future__ import annotations

import os
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
from nasq.timing import median_ms, time_interleaved

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


def kernel_ms(tokens: int, rows: int, cols: int, bits: int, repeats: int, seed: int = 0, chain: int = 4) -> float:
    """Marginal median ms of one call of the integer linear a loaded artifact runs (``measured_path``: resident
    panels on the native kernel, else ``packed_linear_apply``) on ``x [tokens, cols]``, ``rows`` rows at ``bits``:
    ``(T(chain dependent calls) - T(1 call)) / (chain - 1)``, each timed as one jitted program (one dispatch),
    each call with its own weights. At least 1e-9 ms (a difference of noisy medians can come out below 0 for the
    tiniest linears)."""
    rng = np.random.default_rng(seed)

    def weights():  # each call its own weights, as each linear of a forward has
        w = (0.05 * rng.standard_normal((rows, cols))).astype(np.float32)
        b = (0.01 * rng.standard_normal(rows)).astype(np.float32)
        p = pack_linear(w, b, [rows], [bits], np.array([0.02], np.float32))
        return PanelLinear.from_packed(p) if panels else p

    panels = native.resolve_kernel() == "native"  # what load_artifact's default (unpack="auto") runs there
    apply = panel_linear_apply if panels else packed_linear_apply
    ps = [weights() for _ in range(chain)]
    x = jnp.asarray(rng.standard_normal((tokens, cols)).astype(np.float32))

    def calls(n):
        def run(x, ps):
            for p in ps[:n]:  # each call waits for the last (as in a forward); 0 * y keeps the values
                x = x + 0.0 * apply(x, p)[:, :1]
            return x
        f = jax.jit(run)
        return lambda: f(x, ps[:n])

    t = time_interleaved({1: calls(1), chain: calls(chain)}, repeats)
    return max(1e-9, 1e3 * (t[chain] - t[1]) / (chain - 1))


def measured_path() -> str:
    """Which integer linear ``kernel_ms`` times here, for the table's metadata."""
    if native.resolve_kernel() == "native":
        return f"resident panels, {native.describe()}"
    return f"packed_linear_apply, {native.describe()}"


def workload_shape(tokens: int, seq_len: int | None, max_positions: int | None) -> tuple[int, int]:
    """``(batch, seq)`` of the workload: ``tokens / seq_len`` sequences of ``seq_len`` tokens; without
    ``seq_len`` one sequence of ``tokens`` (more than ``max_positions``: whole sequences of that length).
    ``max_positions=None`` checks what it can without the model (before loading it)."""
    limit = max_positions or max(tokens, seq_len or 1)
    if seq_len is None:
        seq = max(1, min(tokens, limit))
        if tokens % seq:
            raise NasqError(f"--tokens {tokens} is more than one sequence of the model's {limit} positions; "
                            "give --seq-len (and --tokens a multiple of it)")
        return tokens // seq, seq
    if seq_len < 1:
        raise NasqError(f"--seq-len must be >= 1, got {seq_len}")
    if max_positions is not None and seq_len > max_positions:
        raise NasqError(f"--seq-len {seq_len} is more than the model's {max_positions} positions")
    if tokens % seq_len:
        raise NasqError(f"--tokens {tokens} is not a whole number of sequences of --seq-len {seq_len}; "
                        f"use a multiple, e.g. --tokens {max(1, tokens // seq_len) * seq_len}")
    return tokens // seq_len, seq_len


def calibration_bits(widths: Sequence[int]) -> int:
    """The width of the calibration model: the profiled width nearest 4 (ties: the wider)."""
    return min(widths, key=lambda b: (abs(b - 4), -b))


def integer_forward_ms(model, model_dir: str | Path, shapes: dict[str, tuple[int, int]], bits: int, batch: int,
                       seq: int, repeats: int) -> float:
    """Median ms of the jitted forward of ``model`` with every encoder linear (``shapes``) at ``bits`` bits, one
    group each, exported and loaded as an artifact is (``load_artifact``'s default path), on ``[batch, seq]``
    tokens with a full mask. The weights' values do not change the time."""
    import tempfile

    from nasq.contract.plan import make_plan
    from nasq.contract.space import SearchedTensor, SpaceInfo
    from nasq.export.reader import load_artifact
    from nasq.export.writer import export_model
    from nasq.models.surgery import model_param_shapes
    from nasq.quant.apply import apply_plan

    tensors = [SearchedTensor(path=p, rule="profile", rows=r, cols=c, group_sizes=(r,), choices=(bits,),
                              has_bias=True, kind="linear") for p, (r, c) in shapes.items()]
    plan = make_plan(tensors, [(bits,)] * len(tensors), space=SpaceInfo(name="uniform", source="nasq.profile"),
                     budget=None, param_shapes=model_param_shapes(model),
                     provenance={"method": "uniform", "run": "nasq profile calibration"})
    with tempfile.TemporaryDirectory(prefix="nasq-profile-") as d:
        out = export_model(apply_plan(model, plan), plan, Path(d) / "calibration.nasq", task="profile",
                           num_labels=2, source_dir=model_dir)
        im = load_artifact(out)
    ids = jnp.full((batch, seq), 1000, jnp.int32).at[:, 0].set(101)
    return median_ms(im, ids, jnp.zeros_like(ids), jnp.ones_like(ids), repeats=repeats)


# the 1-minute load average at or above which a profile is warned to be running beside other work
BUSY_LOAD = 0.5


def busy_warning(load: float, cpus: int) -> str | None:
    """The warning for a profile started at 1-minute load average ``load`` on ``cpus`` CPUs, or None when the
    machine looked idle (``load < BUSY_LOAD``). A table timed beside other jobs is not a latency model: on a 2-core
    VM with two QAT runs beside it one profile put 4 bits at 2.9x 3 bits and another put 1 bit slowest
    (experiments/results/latency_budget.md)."""
    if load < BUSY_LOAD:
        return None
    return (f"warning: load average {load:.2f} on {cpus} CPU(s) as the profile started: other work is running "
            "here, and a table timed beside it is not a latency model; profile on an idle machine (the table's "
            "meta records the load before and after)")


def _load_avg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # not every platform has one
        return None


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
    in it; default: one sequence of ``tokens``, see :func:`workload_shape`); ``bits`` the widths to measure
    (default 1..8; 0 = pruned costs nothing and is never measured); ``repeats`` timed calls per entry (median).
    """
    if tokens < 1:
        raise NasqError(f"--tokens must be >= 1, got {tokens}")
    if repeats < 1:
        raise NasqError(f"--repeats must be >= 1, got {repeats}")
    widths = sorted({int(b) for b in (DEFAULT_BITS if bits is None else bits) if int(b) != 0})
    bad = [b for b in widths if not 1 <= b <= 8]
    if bad or not widths:
        raise NasqError(f"bit widths to profile must be in 1..8, got {list(bits or [])}")
    workload_shape(tokens, seq_len, None)  # a bad pair fails before any model is read
    load_before = _load_avg()
    if log and load_before is not None and (warning := busy_warning(load_before, os.cpu_count() or 1)):
        log(warning)
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
    fixed, calib = 0.0, None
    if measure_fixed:
        calib = calibration_bits(widths)
        whole = integer_forward_ms(model, report.model_dir, shapes, calib, batch, seq, repeats)
        fixed = max(0.0, whole - sum(r * table[(c, calib)] for r, c in shapes.values()))
    meta = {
        "model": str(report.model_dir), "tokens": tokens, "batch": batch, "seq_len": seq, "repeats": repeats,
        "bits": widths,
        "rows": {str(c): r for c, r in rows_for.items()}, "fixed_measured": bool(measure_fixed),
        "device": str(jax.devices()[0]), "platform": platform.platform(), "machine": platform.machine(),
        "jax_version": jax.__version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "kernel": measured_path(), "attention": native.resolve_kernel(), "calibration_bits": calib,
        "load_avg_1min": {"before": load_before, "after": _load_avg()}, "cpus": os.cpu_count(),
    }
    return LatencyTable(tokens=tokens, fixed_ms=float(fixed), ms_per_row=table, meta=meta)
