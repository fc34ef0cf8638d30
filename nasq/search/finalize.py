"""Finalize a search: gate logits -> a discrete plan that is guaranteed to fit the byte (or latency) budget.

Utilities. For the gate logits ``alpha_g in R^C`` of row group ``g`` the utility of choice ``c`` is its
temperature-free log-probability

    u_{g,c} = log_softmax(alpha_g)_c = alpha_{g,c} - log sum_c' exp(alpha_{g,c'})

(``argmax_c u_{g,c}`` is the argmax plan). The final plan solves the multiple-choice knapsack

    max_{c_g} sum_g u_{g,c_g}   s.t.   sum_g bytes(g, c_g) <= budget

directly: when the argmax plan fits, it is the optimum (leftover bytes stay unspent: no choice beats a group's
argmax in log-likelihood); when it does not fit, the solution is the repair that gives up the least
log-likelihood. Solvers
(:func:`allocate`):

* ``milp``: exact, ``scipy.optimize.milp`` (HiGHS) on binaries ``x_{g,c}`` with ``sum_c x_{g,c} = 1`` and
  ``sum_{g,c} (bytes_{g,c} - min_c bytes_{g,c}) x_{g,c} <= budget - sum_g min_c bytes_{g,c}``, time limit;
* ``lagrangian`` (fallback when the MILP fails, times out or rounds to an over-budget point): bisect
  ``lambda >= 0`` for the smallest value at which ``c_g(lambda) = argmax_c u_{g,c} - lambda * bytes_{g,c}``
  fits, then greedily apply the single-group change with the highest utility gain per extra byte that still
  fits, until none improves.

Spending the leftover (opt-in: ``allocate(..., spend_leftover=True)``, ``nasq finalize --spend-leftover``): an
optimal allocation can leave bytes unused (when the argmax fits, the gates preferred fewer bytes than the
budget allows). The unused bytes are spent by upgrading groups to wider choices while any fits,
each time the one that loses the least utility per extra byte, ``(u_{g,c_g} - u_{g,k}) / (bytes_{g,k} - bytes_{g,c_g})``:
the wider choices the gates find least unlikely first.

Both results are re-checked in exact integer bytes; a budget below the smallest reachable size is a
``NasqError`` stating the reachable range. :func:`allocate` is generic (any utilities, e.g. the
Hessian-sensitivity baseline's) over per-tensor ``[G, C]`` utility and non-negative integer cost tables.

A search run under a latency budget (``nasq search --latency-ms``) is finalized under that budget: the same
knapsack with each group's latency from the table the search used (recorded in the run) in whole nanoseconds,
rounded up, against the budget rounded down (:func:`nasq.contract.cost.latency_knapsack`), so the plan's
latency under that table is within the budget; a size budget given at finalize replaces it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from nasq.contract.cost import (
    MB,
    Budget,
    check_latency_budget,
    latency_knapsack,
    plan_latency_ms,
    plan_size_bytes,
    size_budget,
    size_tables,
)
from nasq.contract.plan import make_plan
from nasq.contract.search_result import SearchResult
from nasq.contract.space import SearchedTensor
from nasq.errors import NasqError

__all__ = [
    "Allocation",
    "allocate",
    "argmax_plan",
    "choices_to_bits",
    "finalize_run",
    "utilities",
]

Solver = Literal["auto", "milp", "lagrangian"]
MIP_REL_GAP = 1e-9


def utilities(alphas: Sequence[np.ndarray]) -> list[np.ndarray]:
    """``u = log_softmax(alpha)`` per row (float64), one ``[G, C]`` array per tensor."""
    out = []
    for a in alphas:
        a = np.asarray(a, np.float64)
        m = a.max(axis=-1, keepdims=True)
        out.append(a - m - np.log(np.exp(a - m).sum(axis=-1, keepdims=True)))
    return out


def choices_to_bits(tensors: Sequence[SearchedTensor], choices: Sequence[np.ndarray]) -> list[tuple[int, ...]]:
    """Choice indices -> bits per group."""
    return [tuple(int(t.choices[int(c)]) for c in cc) for t, cc in zip(tensors, choices, strict=True)]


def argmax_plan(alphas: Sequence[np.ndarray], tensors: Sequence[SearchedTensor]) -> list[tuple[int, ...]]:
    """Bits of ``argmax_c alpha_{g,c}`` for every group (ties -> the first, i.e. smallest, choice)."""
    _check_shapes(alphas, [(t.num_groups, len(t.choices)) for t in tensors], "alphas")
    return choices_to_bits(tensors, [np.argmax(np.asarray(a), axis=1) for a in alphas])


def _check_shapes(arrays: Sequence[np.ndarray], shapes: Sequence[tuple[int, int]], what: str) -> None:
    if len(arrays) != len(shapes):
        raise ValueError(f"{len(arrays)} {what} arrays for {len(shapes)} tensors")
    for i, (a, s) in enumerate(zip(arrays, shapes, strict=True)):
        if np.shape(a) != tuple(s):
            raise ValueError(f"{what}[{i}] has shape {np.shape(a)}, expected {tuple(s)}")


@dataclass(frozen=True)
class Allocation:
    """A knapsack solution: ``choices[t][g]`` (index into the tensor's choices), its total bytes and utility,
    and which solver produced it (``milp`` or ``lagrangian``)."""

    choices: list[np.ndarray]
    bytes: int
    utility: float
    solver: str
    optimal: bool


def _flatten(utils: Sequence[np.ndarray], tables: Sequence[np.ndarray]):
    """Padded ``[N, Cmax]`` utilities (-inf padding) and bytes, and the per-tensor group counts."""
    n_groups = [int(np.shape(u)[0]) for u in utils]
    cmax = max((int(np.shape(u)[1]) for u in utils), default=1)
    n = sum(n_groups)
    U = np.full((n, cmax), -np.inf)
    B = np.zeros((n, cmax), np.int64)
    o = 0
    for u, b in zip(utils, tables, strict=True):
        g, c = np.shape(u)
        U[o:o + g, :c] = u
        B[o:o + g, :c] = b
        B[o:o + g, c:] = np.iinfo(np.int64).max // (4 * max(n, 1))  # padding: never chosen
        o += g
    return U, B, n_groups


def _split(flat: np.ndarray, n_groups: Sequence[int]) -> list[np.ndarray]:
    return [a.astype(np.int64) for a in np.split(flat, np.cumsum(n_groups)[:-1])] if n_groups else []


def _dominated(U: np.ndarray, B: np.ndarray) -> np.ndarray:
    """``[N, C]`` True where another choice of the same group costs no more bytes and has no less utility
    (strictly better in one, or equal in both with a lower index): never needed in an optimal solution."""
    n, cmax = U.shape
    dom = np.zeros((n, cmax), bool)
    for c in range(cmax):
        for d in range(cmax):
            if c == d:
                continue
            no_worse = (B[:, d] <= B[:, c]) & (U[:, d] >= U[:, c]) & np.isfinite(U[:, d])
            strictly = (B[:, d] < B[:, c]) | (U[:, d] > U[:, c]) | (d < c)
            dom[:, c] |= no_worse & strictly
    return dom


def _milp(U: np.ndarray, B: np.ndarray, budget: int, time_limit: float) -> tuple[np.ndarray, bool] | None:
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import csr_matrix

    n, cmax = U.shape
    valid = np.isfinite(U) & ~_dominated(U, B)
    gi, ci = np.nonzero(valid)
    nv = gi.size
    bmin = np.where(valid, B, np.iinfo(np.int64).max).min(axis=1)
    cost = -U[gi, ci]
    extra = (B[gi, ci] - bmin[gi]).astype(np.float64)
    cap = float(budget - int(bmin.sum()))
    one = csr_matrix((np.ones(nv), (gi, np.arange(nv))), shape=(n, nv))
    knap = csr_matrix(extra.reshape(1, -1))
    try:
        res = milp(
            c=cost,
            constraints=[LinearConstraint(one, 1, 1), LinearConstraint(knap, -np.inf, cap)],
            integrality=np.ones(nv),
            bounds=Bounds(0, 1),
            options={"time_limit": float(time_limit), "mip_rel_gap": MIP_REL_GAP, "disp": False},
        )
    except Exception:  # noqa: BLE001 - any solver failure -> fallback
        return None
    if res.x is None:
        return None
    x = np.zeros((n, cmax))
    x[gi, ci] = res.x
    return np.argmax(x, axis=1), bool(res.status == 0)


def _pick(U: np.ndarray, B: np.ndarray, lam: float) -> np.ndarray:
    """``argmax_c U - lam * B`` with ties broken towards fewer bytes."""
    score = U - lam * B
    best = score.max(axis=1, keepdims=True)
    cand = np.where(score >= best - 1e-12 * (1 + np.abs(best)), B, np.iinfo(np.int64).max)
    return np.argmin(cand, axis=1)


def _lagrangian(U: np.ndarray, B: np.ndarray, budget: int) -> np.ndarray:
    rows = np.arange(U.shape[0])

    def size(c: np.ndarray) -> int:
        return int(B[rows, c].sum())

    c = _pick(U, B, 0.0)
    if size(c) > budget:
        finite = U[np.isfinite(U)]
        spread = float(finite.max() - finite.min()) if finite.size else 0.0
        hi = max(spread, 1.0)
        while size(_pick(U, B, hi)) > budget:  # at lam > spread / min byte gap the cheapest choice wins
            hi *= 2.0
            if hi > 1e300:
                break
        lo = 0.0
        for _ in range(100):
            mid = 0.5 * (lo + hi)
            if size(_pick(U, B, mid)) > budget:
                lo = mid
            else:
                hi = mid
        c = _pick(U, B, hi)
        if size(c) > budget:  # numerical corner: fall back to the cheapest choice per group
            c = np.argmin(np.where(np.isfinite(U), B, np.iinfo(np.int64).max), axis=1)
    return _greedy_moves(U, B, c, budget, only_gains=True)  # spend the leftover where utility rises


def _greedy_moves(U: np.ndarray, B: np.ndarray, c: np.ndarray, budget: int, *, only_gains: bool) -> np.ndarray:
    """Repeatedly move one group to the choice with the best utility change per extra byte that still fits.

    ``only_gains``: only moves that raise the utility (a free one, ``extra <= 0``, first); otherwise only moves
    to choices with more bytes, whatever they cost in utility (spending the leftover)."""
    rows = np.arange(U.shape[0])
    c = c.copy()
    left = budget - int(B[rows, c].sum())
    for _ in range(10 * U.size + 10):
        gain = U - U[rows, c][:, None]
        extra = B - B[rows, c][:, None]
        ok = np.isfinite(U) & (extra <= left) & ((gain > 1e-12) if only_gains else (extra > 0))
        if not ok.any():
            break
        ratio = np.where(ok, gain / np.maximum(extra, 0.5), -np.inf)
        if only_gains:
            ratio = np.where(ok & (extra <= 0), np.inf, ratio)
        g, k = np.unravel_index(int(np.argmax(ratio)), ratio.shape)
        left -= int(extra[g, k])
        c[g] = k
    return c


def allocate(
    utils: Sequence[np.ndarray],
    byte_tables: Sequence[np.ndarray],
    budget_bytes: int,
    *,
    time_limit: float = 20.0,
    solver: Solver = "auto",
    spend_leftover: bool = False,
) -> Allocation:
    """Solve ``max sum_g u_{g,c_g} s.t. sum_g bytes_{g,c_g} <= budget_bytes`` (see the module docstring);
    with ``spend_leftover`` the solution's unused bytes are then spent (module docstring; ``optimal`` and
    ``solver`` still describe the knapsack solution before spending).

    ``utils[t]`` and ``byte_tables[t]`` are ``[G_t, C_t]`` (finite utilities, non-negative integer bytes).
    ``solver="auto"`` tries the MILP and falls back to the Lagrangian-greedy one; ``"milp"`` raises
    ``RuntimeError`` if the MILP gives no feasible point. The MILP's solution is then improved by one-group moves
    that still raise the utility and fit (HiGHS stops within its tolerances, about 1e-7 of the largest utility).
    The result never exceeds ``budget_bytes``; a budget below the smallest reachable size raises ``NasqError``
    with the reachable range.
    """
    _check_shapes(utils, [np.shape(b) for b in byte_tables], "utility")
    for i, u in enumerate(utils):
        if not np.all(np.isfinite(u)):
            raise ValueError(f"utilities[{i}] has non-finite entries")
        if np.shape(u)[1] < 1:
            raise ValueError(f"utilities[{i}] has no choices")
    budget_bytes = int(budget_bytes)
    U, B, n_groups = _flatten([np.asarray(u, np.float64) for u in utils],
                              [np.asarray(b, np.int64) for b in byte_tables])
    rows = np.arange(U.shape[0])
    lo = sum(int(np.min(b, axis=1).sum()) for b in byte_tables)
    hi = sum(int(np.max(b, axis=1).sum()) for b in byte_tables)
    if budget_bytes < lo:
        raise NasqError(
            f"budget of {budget_bytes:,} bytes ({budget_bytes / MB:.4f} MB) is below the smallest reachable size; "
            f"the searched tensors can take {lo:,} .. {hi:,} bytes ({lo / MB:.4f} .. {hi / MB:.4f} MB); "
            "raise the budget or add smaller choices (e.g. 0 = prune) to the search space"
        )

    def result(c: np.ndarray, name: str, optimal: bool) -> Allocation:
        return Allocation(choices=_split(c, n_groups), bytes=int(B[rows, c].sum()),
                          utility=float(U[rows, c].sum()), solver=name, optimal=optimal)

    def solve() -> Allocation:
        if U.shape[0] == 0:
            return result(np.zeros(0, np.int64), "milp", True)
        if solver in ("auto", "milp"):
            out = _milp(U, B, budget_bytes, time_limit)
            if out is not None and int(B[rows, out[0]].sum()) <= budget_bytes:
                # HiGHS stops within its tolerances (about 1e-7 of the largest utility); one-group moves that
                # still raise the utility and fit recover what it could not resolve (never a worse plan)
                milp_res = result(_greedy_moves(U, B, out[0], budget_bytes, only_gains=True), "milp", out[1])
                if solver == "milp" or out[1]:
                    return milp_res
                lag = result(_lagrangian(U, B, budget_bytes), "lagrangian", False)
                return milp_res if milp_res.utility >= lag.utility else lag
            if solver == "milp":
                raise RuntimeError("the MILP solver found no feasible allocation")
        elif solver != "lagrangian":
            raise ValueError(f"unknown solver {solver!r}")
        return result(_lagrangian(U, B, budget_bytes), "lagrangian", False)

    best = solve()
    if not spend_leftover or U.shape[0] == 0:
        return best
    c = _greedy_moves(U, B, np.concatenate(best.choices), budget_bytes, only_gains=False)
    return result(c, best.solver, best.optimal)


def run_budget(run_dir: str | Path, *, budget_mb: float | None = None, avg_bits: float | None = None,
               ratio: float | None = None, convention: Literal["encoder", "artifact"] | None = None) -> Budget | None:
    """A budget other than the search run's own, resolved on its tensors and model (``size_budget``), for
    finalizing one search at several budgets; None when none is given. ``convention`` None: the run's own."""
    if budget_mb is None and avg_bits is None and ratio is None:
        return None
    res, _ = SearchResult.load(run_dir)
    try:
        return size_budget(res.tensors, res.space, res.param_shapes, budget_mb=budget_mb, avg_bits=avg_bits,
                           ratio=ratio, convention=convention or res.budget.convention)
    except NasqError as e:
        raise NasqError(f"{run_dir}: {e}") from None


def _latency_budget(res: SearchResult, run_dir: Path) -> float:
    """The whole-model latency budget (ms) of a latency-budgeted search run, checked against its table's range."""
    if res.latency is None or res.cost_budget is None:
        raise NasqError(f"cannot finalize {run_dir} under its latency budget: the run does not record the latency "
                        "table it was searched with (a run from before nasq recorded it); finalize it at a size "
                        "budget (--avg-bits / --budget-mb / --ratio) or rerun the search")
    ms = float(res.cost_budget) + res.latency.fixed_ms
    try:
        check_latency_budget(res.tensors, ms, res.latency)
    except NasqError as e:
        raise NasqError(f"cannot finalize {run_dir}: {e}") from None
    return ms


def finalize_run(
    run_dir: str | Path,
    out_path: str | Path,
    *,
    overwrite: bool = False,
    budget_override: Budget | None = None,
    time_limit: float = 20.0,
    spend_leftover: bool = False,
):
    """Turn a search run's gate logits into ``plan.json`` at ``out_path`` (within the run's budget or
    ``budget_override``) and return the :class:`nasq.contract.plan.Plan`.

    Provenance records ``argmax_bytes`` / ``argmax_within_budget`` (the plain argmax plan), ``repaired``
    (True when the final bits differ from the argmax plan), ``solver``, ``optimal``, ``utility`` and
    ``argmax_utility`` (sums of ``log_softmax(alpha)``), ``spend_leftover`` and ``unused_bytes`` (budget minus
    the plan's searched bytes). A latency-budgeted run (no ``budget_override``) is solved under its latency budget
    (module docstring); its provenance adds ``latency_budget_ms``, ``latency_ms`` and ``argmax_latency_ms`` (whole
    model, under the run's table), and ``argmax_within_budget`` is about the latency.
    """
    run_dir = Path(run_dir)
    out_path = Path(out_path)
    if out_path.exists() and not overwrite:
        raise NasqError(f"{out_path} already exists; pass --overwrite to replace it")
    res, alphas = SearchResult.load(run_dir)
    tensors = list(res.tensors)
    budget = budget_override or res.budget
    utils = utilities(alphas)
    am_bits = argmax_plan(alphas, tensors)
    am_bytes = plan_size_bytes(tensors, am_bits)
    rows_u = [u[np.arange(len(u)), np.argmax(a, axis=1)].sum() for u, a in zip(utils, alphas, strict=True)]
    latency = None
    if res.cost_kind == "latency" and budget_override is None:
        latency = _latency_budget(res, run_dir)
        cap, costs = latency_knapsack(tensors, latency, res.latency)
    else:
        costs, cap = size_tables(tensors), budget.bytes
    try:
        alloc = allocate(utils, costs, cap, time_limit=time_limit, spend_leftover=spend_leftover)
    except NasqError as e:
        raise NasqError(f"cannot finalize {run_dir}: {e}") from None
    bits = choices_to_bits(tensors, alloc.choices)
    size = plan_size_bytes(tensors, bits, check_choices=True)
    if size > budget.bytes:  # pragma: no cover - allocate guarantees this
        raise RuntimeError(f"finalized plan has {size} bytes > budget {budget.bytes}")
    extra = {}
    if latency is not None:
        ms, am_ms = plan_latency_ms(tensors, bits, res.latency), plan_latency_ms(tensors, am_bits, res.latency)
        if ms > latency * (1 + 1e-9):  # pragma: no cover - allocate guarantees this
            raise RuntimeError(f"finalized plan takes {ms} ms > budget {latency} ms")
        extra = {"latency_budget_ms": latency, "latency_ms": ms, "argmax_latency_ms": am_ms,
                 "argmax_within_budget": am_ms <= latency}
    prov = {
        "method": "nasq-search",
        "run": str(run_dir),
        "step": res.step,
        "task": res.task,
        "model_dir": res.model_dir,
        "num_labels": res.num_labels,
        "solver": alloc.solver,
        "optimal": alloc.optimal,
        "utility": alloc.utility if math.isfinite(alloc.utility) else None,
        "argmax_utility": float(sum(rows_u)),
        "argmax_bytes": am_bytes,
        "argmax_within_budget": am_bytes <= budget.bytes,
        "repaired": [tuple(b) for b in bits] != [tuple(b) for b in am_bits],
        "budget_overridden": budget_override is not None,
        "spend_leftover": spend_leftover,
        "unused_bytes": budget.bytes - size,
        **extra,
    }
    plan = make_plan(tensors, bits, space=res.space, budget=budget, param_shapes=res.param_shapes, provenance=prov)
    plan.save(out_path, overwrite=overwrite)
    return plan
