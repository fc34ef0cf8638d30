"""Cost model: bytes (and measured latency) of a bit allocation, the budget it must meet.

Size. A group of ``r`` rows and ``k`` columns at ``b`` bits stores
``bytes(r, k, b) = group_nbytes(r, k, b, has_bias)`` (:mod:`nasq.quant.packing`, also used by the exporter):
``0`` if ``b == 0`` else ``r * ceil(k * b / 8) + 4 (fp32 scale) + 4r (fp32 bias, linears)`` (dense packing).
For gate probabilities ``p_{g,c}`` of one tensor the expected size is

    E[size] = sum_t sum_g sum_c p_{t,g,c} * bytes(rows_{t,g}, cols_t, choice_{t,c})

which for one-hot ``p`` equals the exact plan size.

Budgets (MB = 10^6 bytes; published anchors such as Q-BERT's 81.2 MB are MiB = 2^20 bytes):

* ``budget_mb=M``: ``M * 10^6`` bytes. Convention ``"encoder"`` = the searched tensors only;
  ``"artifact"`` = every tensor of the artifact, so the searched part gets ``M*10^6 - fixed_bytes``
  (:func:`fixed_nbytes`). Manifest, config and tokenizer files are not counted.
* ``avg_bits=b``: ``floor(sum_t (n_weights_t * b / 8 + 4 * G_t + 4 * rows_t * has_bias_t))`` bytes: every weight
  at ``b`` bits plus each group's scale and the fp32 biases. For integer ``b`` in 1..8 it is exactly the uniform
  b-bit plan whenever every tensor has ``cols*b % 8 == 0`` (BERT's dims are multiples of 8); otherwise the
  uniform plan's ``ceil`` per row puts it a few bytes over.
* ``ratio=r``: ``floor(sum_t 4 * (n_weights_t + rows_t * has_bias_t) / r)``: fp32 bytes of the searched tensors
  over ``r``.

``avg_bits`` and ``ratio`` are always about the searched tensors ("encoder" convention). A budget outside the
reachable range ``[all groups at their smallest choice, all at their largest]`` is an error.

Latency. A :class:`LatencyTable` (JSON, written by ``nasq profile``) holds ``ms_per_row[(cols, bits)]``: the time
of one output row of an integer linear with ``cols`` inputs at ``bits`` bits, measured at ``tokens`` tokens,
plus ``fixed_ms`` for everything not searched. Expected latency

    E[ms] = fixed_ms + sum_t sum_g sum_c p_{t,g,c} * rows_{t,g} * ms_per_row(cols_t, choice_{t,c})

with pruned groups (bits 0) and embeddings (a gather, not a matmul) costing 0. A discrete allocation under a
latency budget is solved in integer nanoseconds (:func:`latency_ns_tables`): each group's cost rounded up, the
budget rounded down, so ``sum_g ceil(ns_g) <= floor(budget_ns)`` guarantees the plan's latency in ms is within
the budget.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple

import jax.numpy as jnp
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from nasq.contract.space import SearchedTensor, SearchSpace
from nasq.errors import NasqError, validation_problems
from nasq.io import read_json, write_atomic
from nasq.quant.packing import group_nbytes, tensor_nbytes

__all__ = [
    "Budget",
    "LatencyBudget",
    "LatencyTable",
    "avg_bits",
    "avg_bits_of_extreme",
    "budget_avg_bits_bytes",
    "check_latency_budget",
    "encoder_linear_nbytes",
    "expected_cost",
    "expected_latency_ms",
    "fixed_nbytes",
    "fixed_tensor_nbytes",
    "fp32_nbytes",
    "latency_budget_ns",
    "latency_knapsack",
    "latency_ns_tables",
    "latency_range",
    "latency_size_budget",
    "latency_table",
    "latency_table_dict",
    "latency_table_from_dict",
    "load_latency_budget",
    "load_latency_table",
    "plan_latency_ms",
    "plan_size_bytes",
    "resolve_budget",
    "save_latency_table",
    "size_budget",
    "size_range",
    "size_table",
    "size_tables",
    "uniform_plan",
]

MB = 10**6
BitsPerGroup = Sequence[Sequence[int]]  # bits[t][g] of group g of tensor t


# ----------------------------------------------------------------------------------------------------- size


def size_table(t: SearchedTensor) -> np.ndarray:
    """``[G, C]`` int64: ``table[g, c] = group_nbytes(group_sizes[g], cols, choices[c], has_bias)``."""
    return np.array(
        [[group_nbytes(r, t.cols, b, has_bias=t.has_bias) for b in t.choices] for r in t.group_sizes],
        dtype=np.int64,
    ).reshape(t.num_groups, len(t.choices))


def size_tables(tensors: Sequence[SearchedTensor]) -> list[np.ndarray]:
    """:func:`size_table` for each tensor."""
    return [size_table(t) for t in tensors]


def expected_cost(probs: Sequence[jnp.ndarray], tables: Sequence[np.ndarray]) -> jnp.ndarray:
    """THE expected cost: differentiable ``sum_t sum_{g,c} probs_t[g, c] * tables_t[g, c]`` (scalar, dtype of
    ``probs``). With byte tables (:func:`size_tables`) it is ``E[size]``, with :func:`latency_table` tables the
    searched part of ``E[ms]``; the search loop, its budget price and the reports all call it."""
    if len(probs) != len(tables):
        raise ValueError(f"{len(probs)} probability arrays for {len(tables)} size tables")
    total = jnp.zeros((), dtype=probs[0].dtype if probs else jnp.float32)
    for p, tab in zip(probs, tables, strict=True):
        if p.shape != tab.shape:
            raise ValueError(f"probs shape {p.shape} != size table shape {tab.shape}")
        total = total + jnp.sum(p * jnp.asarray(tab, dtype=p.dtype))
    return total


def _check_plan(tensors: Sequence[SearchedTensor], plan: BitsPerGroup, check_choices: bool) -> None:
    if len(plan) != len(tensors):
        raise NasqError(f"plan has {len(plan)} tensors but the search space resolves to {len(tensors)}")
    for t, bits in zip(tensors, plan, strict=True):
        if len(bits) != t.num_groups:
            raise NasqError(f"plan for {t.path} has {len(bits)} groups, expected {t.num_groups}")
        for g, b in enumerate(bits):
            if check_choices and b not in t.choices:
                raise NasqError(
                    f"plan for {t.path} group {g}: {b} bits is not one of the choices {list(t.choices)}"
                )
            if not 0 <= b <= 8:
                raise NasqError(f"plan for {t.path} group {g}: {b} bits is outside 0..8")


def plan_size_bytes(
    tensors: Sequence[SearchedTensor], bits_per_group: BitsPerGroup, *, check_choices: bool = True
) -> int:
    """Exact bytes of a discrete plan (``bits_per_group[t][g]`` = bits of group g of tensor t)."""
    _check_plan(tensors, bits_per_group, check_choices)
    return sum(tensor_nbytes(t.group_sizes, t.cols, [int(b) for b in bits], has_bias=t.has_bias)
               for t, bits in zip(tensors, bits_per_group, strict=True))


def uniform_plan(tensors: Sequence[SearchedTensor], bits: int) -> list[tuple[int, ...]]:
    """Every group of every tensor at ``bits`` (not checked against the choices)."""
    return [(bits,) * t.num_groups for t in tensors]


def size_range(tensors: Sequence[SearchedTensor]) -> tuple[int, int]:
    """``(min, max)`` reachable bytes: every group at its smallest / largest choice."""
    lo = plan_size_bytes(tensors, [(t.choices[0],) * t.num_groups for t in tensors])
    hi = plan_size_bytes(tensors, [(t.choices[-1],) * t.num_groups for t in tensors])
    return lo, hi


def avg_bits(tensors: Sequence[SearchedTensor], bits_per_group: BitsPerGroup) -> float:
    """Weight-count-weighted mean bits over the searched weights (pruned = 0)."""
    _check_plan(tensors, bits_per_group, check_choices=False)
    n = sum(t.num_weights for t in tensors)
    s = sum(
        r * t.cols * int(b)
        for t, bits in zip(tensors, bits_per_group, strict=True)
        for r, b in zip(t.group_sizes, bits, strict=True)
    )
    return s / n if n else 0.0


def encoder_linear_nbytes(
    tensors: Sequence[SearchedTensor], bits_per_group: BitsPerGroup, *, include_bias: bool = True
) -> int:
    """Bytes of the searched linears under ``encoder.`` (the AQ-BERT/Q-BERT "encoder weights" convention).

    Packed weights + group scales, plus fp32 biases if ``include_bias``.
    """
    _check_plan(tensors, bits_per_group, check_choices=False)
    total = 0
    for t, bits in zip(tensors, bits_per_group, strict=True):
        if t.kind != "linear" or not t.path.startswith("encoder."):
            continue
        for r, b in zip(t.group_sizes, bits, strict=True):
            total += group_nbytes(r, t.cols, int(b), has_bias=t.has_bias and include_bias)
    return total


def fp32_nbytes(tensors: Sequence[SearchedTensor]) -> int:
    """fp32 bytes of the searched tensors (weights + biases)."""
    return sum(4 * (t.num_weights + (t.rows if t.has_bias else 0)) for t in tensors)


# ------------------------------------------------------------------------------------------- fixed tensors


def fixed_tensor_nbytes(shape: Sequence[int], bits: int, *, rows_axis: int = 0) -> int:
    """Bytes of one unsearched tensor: fp32 (``bits=32``) = 4/param; int8 (``bits=8``) = 1/param + an fp32
    scale per row (``shape[rows_axis]`` rows: vocabulary entries or output features)."""
    n = math.prod(int(d) for d in shape)
    if bits == 32:
        return 4 * n
    if bits == 8:
        rows = int(shape[rows_axis]) if len(shape) else 1
        return n + 4 * rows
    raise ValueError(f"fixed tensors are stored at 8 or 32 bits, got {bits}")


def fixed_nbytes(
    param_shapes: Mapping[str, Sequence[int]],
    tensors: Sequence[SearchedTensor],
    space: SearchSpace,
) -> int:
    """Bytes of every parameter of the artifact that is *not* part of a searched tensor.

    ``param_shapes`` maps parameter path -> shape, e.g. ``embeddings.word_embeddings.embedding``,
    ``encoder.layer.0.attention.self.query.kernel`` / ``.weight`` / ``.bias``,
    ``embeddings.LayerNorm.scale``. A parameter belongs to a searched tensor when its path or its module path
    (path without the last component) is a searched path; its weight and (if ``has_bias``) bias are already
    in the searched bytes. The rest, by rule:

    * 2-D parameters under ``embeddings.word_embeddings`` (int8: one scale per vocabulary row): ``fixed.word_embeddings_bits``;
    * other 2-D parameters under ``embeddings.``: ``fixed.other_embeddings_bits``;
    * other 2-D ``weight`` / ``kernel`` parameters: ``fixed.unsearched_linear_bits`` (int8 with one scale per
      output row: ``shape[0]`` for HF ``weight`` ``(out, in)``, ``shape[1]`` for Flax ``kernel`` ``(in, out)``);
    * everything else (LayerNorm, biases, 1-D or >2-D): fp32.
    """
    searched = {t.path: t for t in tensors}
    total = 0
    for path, shape in param_shapes.items():
        module, _, leaf = path.rpartition(".")
        if path in searched:
            continue
        if module in searched:
            if leaf == "bias" and not searched[module].has_bias:
                total += fixed_tensor_nbytes(shape, 32)
            continue
        if len(shape) == 2 and path.startswith("embeddings."):
            bits = (
                space.fixed.word_embeddings_bits
                if path.startswith("embeddings.word_embeddings")
                else space.fixed.other_embeddings_bits
            )
            total += fixed_tensor_nbytes(shape, bits)
        elif len(shape) == 2 and leaf in ("weight", "kernel"):
            total += fixed_tensor_nbytes(
                shape, space.fixed.unsearched_linear_bits, rows_axis=1 if leaf == "kernel" else 0
            )
        else:
            total += fixed_tensor_nbytes(shape, 32)
    return total


# -------------------------------------------------------------------------------------------------- budgets


@dataclass(frozen=True)
class Budget:
    """A size budget. ``bytes`` is what the searched tensors may use (the target of ``E[size]``);
    ``fixed_bytes`` the unsearched part it was reduced by (non-zero only for convention ``"artifact"``),
    so the whole artifact is ``bytes + fixed_bytes``. ``source`` says how it was given, e.g. ``avg_bits=2``."""

    bytes: int
    convention: Literal["encoder", "artifact"]
    source: str
    fixed_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        """Bytes of the whole artifact's tensors the budget allows (searched + fixed, ``artifact`` convention)."""
        return self.bytes + self.fixed_bytes


def budget_avg_bits_bytes(tensors: Sequence[SearchedTensor], bits: float) -> int:
    """``floor(sum_t n_weights*bits/8 + 4*G + 4*rows*has_bias)``: the ``avg_bits`` budget in bytes."""
    exact = sum(
        t.num_weights * bits / 8 + 4 * t.num_groups + (4 * t.rows if t.has_bias else 0) for t in tensors
    )
    return math.floor(exact + 1e-9)


def resolve_budget(
    tensors: Sequence[SearchedTensor],
    *,
    budget_mb: float | None = None,
    avg_bits: float | None = None,
    ratio: float | None = None,
    convention: Literal["encoder", "artifact"] = "encoder",
    fixed_bytes: int = 0,
) -> Budget:
    """Turn exactly one of ``budget_mb`` / ``avg_bits`` / ``ratio`` into bytes for the searched tensors.

    Raises ``NasqError`` if none or several are given, if ``convention="artifact"`` is combined with
    ``avg_bits``/``ratio``, or if the budget is outside the reachable range (which the message states in MB
    and average bits).
    """
    given = {
        k: v for k, v in (("budget_mb", budget_mb), ("avg_bits", avg_bits), ("ratio", ratio)) if v is not None
    }
    if len(given) != 1:
        raise NasqError(
            f"give exactly one budget of --budget-mb / --avg-bits / --ratio (got {', '.join(given) or 'none'})"
        )
    ((kind, value),) = given.items()
    if convention not in ("encoder", "artifact"):
        raise NasqError(f"budget convention must be 'encoder' or 'artifact', got {convention!r}")
    if convention == "artifact" and kind != "budget_mb":
        raise NasqError(
            f"--{kind.replace('_', '-')} is defined on the searched tensors; the 'artifact' "
            "convention needs --budget-mb"
        )
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise NasqError(f"--{kind.replace('_', '-')} must be a positive number, got {value!r}")
    fixed = fixed_bytes if convention == "artifact" else 0
    if kind == "budget_mb":
        b = math.floor(value * MB + 1e-6) - fixed
    elif kind == "avg_bits":
        b = budget_avg_bits_bytes(tensors, value)
    else:
        b = math.floor(fp32_nbytes(tensors) / value + 1e-9)
    lo, hi = size_range(tensors)
    if not lo <= b <= hi:
        lo_bits = avg_bits_of_extreme(tensors, 0)
        hi_bits = avg_bits_of_extreme(tensors, -1)
        what = "whole artifact" if convention == "artifact" else "searched tensors"
        raise NasqError(
            f"budget {kind}={value} gives {(b + fixed) / MB:.3f} MB for the {what}, outside the reachable range "
            f"{(lo + fixed) / MB:.3f} .. {(hi + fixed) / MB:.3f} MB (average {lo_bits:.2f} .. {hi_bits:.2f} bits "
            f"over {sum(t.num_weights for t in tensors):,} searched weights"
            + (f"; {fixed / MB:.3f} MB is fixed, unsearched" if fixed else "")
            + "); choose a budget inside it or change the search space's choices"
        )
    return Budget(bytes=b, convention=convention, source=f"{kind}={value}", fixed_bytes=fixed)


def size_budget(
    tensors: Sequence[SearchedTensor],
    space,
    param_shapes: Mapping[str, Sequence[int]] | None,
    *,
    budget_mb: float | None = None,
    avg_bits: float | None = None,
    ratio: float | None = None,
    convention: Literal["encoder", "artifact"] = "encoder",
) -> Budget | None:
    """THE budget resolution of search, baselines and finalize: :func:`resolve_budget` with the unsearched
    bytes of the artifact (:func:`fixed_nbytes` of ``param_shapes`` at ``space.fixed``), or None when no size
    budget is given. ``space`` is anything with a ``fixed`` (a search space, ``SpaceInfo`` or ``Plan``)."""
    if budget_mb is None and avg_bits is None and ratio is None:
        return None
    if param_shapes is None:
        if convention == "artifact":
            raise NasqError("the 'artifact' budget convention needs the model's parameter shapes, which this "
                            "search run did not record; use the 'encoder' convention")
        fixed = 0
    else:
        fixed = fixed_nbytes(param_shapes, tensors, space)
    return resolve_budget(tensors, budget_mb=budget_mb, avg_bits=avg_bits, ratio=ratio, convention=convention,
                          fixed_bytes=fixed)


def avg_bits_of_extreme(tensors: Sequence[SearchedTensor], idx: int) -> float:
    """Average bits when every group takes ``choices[idx]`` (0: smallest, -1: largest)."""
    return avg_bits(tensors, [(t.choices[idx],) * t.num_groups for t in tensors])


# -------------------------------------------------------------------------------------------------- latency

LATENCY_FORMAT = "nasq-latency/1"


# bounds on a loaded table (untrusted): a second per output row, a day for the rest, 2^24 tokens (MiniLM's rows
# measure about 1e-3 ms; finite bounds also keep the integer-nanosecond costs far inside int64)
MAX_MS_PER_ROW = 1e3
MAX_FIXED_MS = 8.64e7
MAX_TOKENS = 2**24


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    cols: int = Field(ge=1, le=2**20)
    bits: int = Field(ge=1, le=8)
    ms_per_row: float = Field(ge=0, le=MAX_MS_PER_ROW, allow_inf_nan=False)


class _TableFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: Literal["nasq-latency/1"]
    tokens: int = Field(ge=1, le=MAX_TOKENS)
    fixed_ms: float = Field(ge=0, le=MAX_FIXED_MS, allow_inf_nan=False)
    entries: list[_Entry]
    meta: dict = {}


@dataclass(frozen=True)
class LatencyTable:
    """Measured per-row latency of integer linears: ``ms_per_row[(cols, bits)]`` at ``tokens`` tokens, plus
    ``fixed_ms`` for the unsearched rest of the model (embeddings, attention, LayerNorm, ...).

    JSON: ``{"format": "nasq-latency/1", "tokens": 128, "fixed_ms": 3.1,
    "entries": [{"cols": 384, "bits": 8, "ms_per_row": 0.0012}, ...], "meta": {...}}``.
    """

    tokens: int
    fixed_ms: float
    ms_per_row: dict[tuple[int, int], float]
    meta: dict = field(default_factory=dict)
    source: str = "<inline>"

    def lookup(self, cols: int, bits: int) -> float:
        """ms per output row; 0 for pruned (``bits == 0``)."""
        if bits == 0:
            return 0.0
        try:
            return self.ms_per_row[(cols, bits)]
        except KeyError:
            raise NasqError(
                f"latency table {self.source} has no entry for cols={cols}, bits={bits}; run `nasq profile` "
                "on this machine with the same model and search space to rebuild it"
            ) from None

    def check(self, tensors: Sequence[SearchedTensor]) -> None:
        """Raise ``NasqError`` naming the first (cols, bits) the search needs and the table lacks."""
        for t in tensors:
            if t.kind == "linear":
                for b in t.choices:
                    self.lookup(t.cols, b)


def latency_table_from_dict(data: object, source: str) -> LatencyTable:
    """Validate a latency table's JSON object (the file format above; also embedded in a search run's
    ``search_result.json``); errors name ``source``."""
    try:
        f = _TableFile.model_validate(data)
    except ValidationError as e:
        probs = "; ".join(validation_problems(e))
        raise NasqError(f"invalid latency table {source}: {probs}; run `nasq profile` to rebuild it") from None
    table: dict[tuple[int, int], float] = {}
    for i, e in enumerate(f.entries):
        if (e.cols, e.bits) in table:
            raise NasqError(
                f"invalid latency table {source}: entries[{i}] repeats cols={e.cols}, bits={e.bits}"
            )
        table[(e.cols, e.bits)] = e.ms_per_row
    return LatencyTable(tokens=f.tokens, fixed_ms=f.fixed_ms, ms_per_row=table, meta=f.meta, source=source)


def latency_table_dict(table: LatencyTable) -> dict:
    """The JSON object of ``table`` (:func:`latency_table_from_dict` reads it back)."""
    return {
        "format": LATENCY_FORMAT,
        "tokens": table.tokens,
        "fixed_ms": table.fixed_ms,
        "entries": [
            {"cols": c, "bits": b, "ms_per_row": v} for (c, b), v in sorted(table.ms_per_row.items())
        ],
        "meta": table.meta,
    }


def load_latency_table(path: str | Path) -> LatencyTable:
    """Read and validate a latency table written by :func:`save_latency_table`."""
    path = Path(path)
    if not path.exists():
        raise NasqError(f"latency table {path} not found; run `nasq profile --out {path}` first")
    try:
        data = read_json(path, what="latency table", max_bytes=2**26)
    except NasqError as e:
        raise NasqError(f"cannot read latency table: {e}; run `nasq profile` to rebuild it") from None
    return latency_table_from_dict(data, str(path))


def save_latency_table(table: LatencyTable, path: str | Path, *, overwrite: bool = False) -> None:
    """Write ``table`` as JSON atomically (temp file + ``os.replace``)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise NasqError(f"{path} exists; pass --overwrite to replace it")
    write_atomic(path, json.dumps(latency_table_dict(table), indent=1))


def latency_table(t: SearchedTensor, table: LatencyTable) -> np.ndarray:
    """``[G, C]`` float64 ms: ``rows_g * ms_per_row(cols, choice_c)`` (0 for pruned groups and embeddings)."""
    if t.kind != "linear":
        return np.zeros((t.num_groups, len(t.choices)))
    per_row = np.array([table.lookup(t.cols, b) for b in t.choices])
    return np.asarray(t.group_sizes, dtype=np.float64)[:, None] * per_row[None, :]


def expected_latency_ms(
    probs: Sequence[jnp.ndarray], tensors: Sequence[SearchedTensor], table: LatencyTable
) -> jnp.ndarray:
    """Differentiable ``fixed_ms + sum_t sum_{g,c} p * rows_g * ms_per_row(cols_t, c)``."""
    tabs = [latency_table(t, table) for t in tensors]
    return expected_cost(probs, tabs) + table.fixed_ms


def plan_latency_ms(tensors: Sequence[SearchedTensor], bits_per_group: BitsPerGroup, table: LatencyTable) -> float:
    """Latency of a discrete plan under ``table``."""
    _check_plan(tensors, bits_per_group, check_choices=False)
    total = table.fixed_ms
    for t, bits in zip(tensors, bits_per_group, strict=True):
        if t.kind == "linear":
            total += sum(r * table.lookup(t.cols, int(b)) for r, b in zip(t.group_sizes, bits, strict=True))
    return float(total)


def latency_range(tensors: Sequence[SearchedTensor], table: LatencyTable) -> tuple[float, float]:
    """``(min, max)`` reachable latency (each group at its fastest / slowest choice)."""
    tabs = [latency_table(t, table) for t in tensors]
    lo = table.fixed_ms + sum(float(x.min(axis=1).sum()) for x in tabs)
    hi = table.fixed_ms + sum(float(x.max(axis=1).sum()) for x in tabs)
    return lo, hi


NS_PER_MS = 1_000_000


def latency_ns_tables(tensors: Sequence[SearchedTensor], table: LatencyTable) -> list[np.ndarray]:
    """:func:`latency_table` in whole nanoseconds, rounded up per (group, choice): ``[G, C]`` int64 per tensor,
    the integer costs a discrete allocation is solved with (module docstring)."""
    return [np.ceil(latency_table(t, table) * NS_PER_MS).astype(np.int64) for t in tensors]


def latency_budget_ns(latency_ms: float, table: LatencyTable) -> int:
    """The searched linears' share of a whole-model latency budget, ``latency_ms - fixed_ms``, in whole
    nanoseconds rounded down (module docstring)."""
    return math.floor((float(latency_ms) - table.fixed_ms) * NS_PER_MS)


def latency_knapsack(tensors: Sequence[SearchedTensor], latency_ms: float, table: LatencyTable
                     ) -> tuple[int, list[np.ndarray]]:
    """(capacity, per-tensor cost tables) of the knapsack a latency budget is solved as, both in whole nanoseconds:
    :func:`latency_budget_ns` (rounded down) and :func:`latency_ns_tables` (rounded up), so a plan within the
    capacity is within ``latency_ms`` on ``table`` (module docstring)."""
    return latency_budget_ns(latency_ms, table), latency_ns_tables(tensors, table)


class LatencyBudget(NamedTuple):
    """A whole-model latency budget in ms and the table it is measured on."""

    ms: float
    table: LatencyTable


def load_latency_budget(tensors: Sequence[SearchedTensor], latency_ms: float, table_path: str | Path | None
                        ) -> LatencyBudget:
    """A ``latency_ms`` budget on the table at ``table_path`` (``search.latency_table``), checked to cover every
    choice of ``tensors`` and to reach the budget; ``NasqError`` saying what to do otherwise."""
    if not table_path:
        raise NasqError("--latency-ms needs a latency table: run `nasq profile --out lat.json` on the target "
                        "machine, then pass --set search.latency_table=lat.json.")
    table = load_latency_table(table_path)
    check_latency_budget(tensors, latency_ms, table)
    return LatencyBudget(float(latency_ms), table)


def check_latency_budget(tensors: Sequence[SearchedTensor], latency_ms: float, table: LatencyTable) -> None:
    """``NasqError`` unless ``table`` covers every choice of ``tensors`` and ``latency_ms`` is within their reachable
    range, its lower end in the whole nanoseconds the allocation is solved in (:func:`latency_ns_tables`)."""
    table.check(tensors)
    lo, hi = latency_range(tensors, table)
    cap, tables = latency_knapsack(tensors, latency_ms, table)
    if not (lo <= latency_ms <= hi and cap >= sum(int(x.min(axis=1).sum()) for x in tables)):
        raise NasqError(f"latency budget {latency_ms} ms is infeasible: the search space reaches "
                        f"{lo:.3f}..{hi:.3f} ms on this table ({table.source}).")


def latency_size_budget(tensors: Sequence[SearchedTensor], latency_ms: float) -> Budget:
    """The size budget recorded beside a latency budget: the whole reachable range (every plan fits it; the
    latency is the constraint), its source naming the latency budget."""
    return Budget(bytes=size_range(tensors)[1], convention="encoder", source=f"latency_ms={latency_ms}")
