"""Baseline bit allocators. Each returns ``bits_per_group`` (one tuple per searched tensor) and
:func:`baseline_plan` turns it into the same ``plan.json`` search writes (:func:`nasq.contract.plan.make_plan`).

* ``uniform``: every group at ``bits`` (a Q-BERT-style uniform baseline). Needs no budget.
* ``rule``: a hand allocation by module type: every group of a space rule's tensors at that rule's width
  (``rule_bits``, e.g. ``{"attention_qkv": 3, "attention_output": 3}``), the other rules at ``bits``: what a
  person would write ("attention at 3 bits, the FFN at 2"). Needs no budget; a given budget must be met.
* ``random``: random utilities fed to the exact knapsack of ``nasq finalize``
  (:func:`nasq.search.finalize.allocate`) under the budget. The utilities are random *and increasing in
  bytes* and *proportional to the group's weight count* ``n_g``: ``u_{g,c} = n_g * sum_{k <= c} e_{g,k}`` with
  ``e ~ Uniform(0, 1)`` i.i.d. over (group, choice), choices in ascending bits, from
  ``numpy.random.default_rng(seed)``. Increasing utilities make the knapsack spend the budget as fully as the
  byte granularity allows, so random spends the same budget as the other methods (with i.i.d. utilities it
  would stop at the random argmax's size when the budget is loose). The ``n_g`` factor makes utility per *byte*
  independent of group size: without it a knapsack prunes the biggest groups first (measured: at a 10 MB
  whole-artifact budget it pruned all 256 word-embedding groups of MiniLM, i.e. every token embedded to zero,
  50.9% SST-2 accuracy). Which groups get the bits is random. Deterministic in ``seed``.
* ``magnitude``: magnitude pruning + uniform bits. Every kept group gets ``bits``; groups are pruned in
  ascending order of their normalised magnitude ``m_g = rms(W_g) / rms(W)`` (``rms = ||.||_2 / sqrt(n)``, so
  group size does not matter; normalised per tensor so tensors of different scales compete fairly) until the
  plan fits the budget (bytes, or under a latency budget each group's time on the table). Nothing is pruned when
  the uniform plan already fits. Only tensors whose choices contain 0 can be pruned.
* ``hessian``: Q-BERT / HAWQ-V3 sensitivity, see :mod:`nasq.baselines.hessian`.
* ``fisher``: ``hessian``'s recipe that ``nasq pipeline`` allocates with by default (``FISHER_RECIPE``): the
  Gauss-Newton curvature (exact over the rows, never negative) pooled per tensor (or, with
  ``granularity="weight"``, each weight's own diagonal times its own quantization error summed per group, Optimal
  Brain Damage's estimate), on ``FISHER_BATCHES`` train batches unless told otherwise; its plans are ``hessian``
  plans (``provenance["curvature"] == "fisher"``).
* ``measured``: measured sensitivity (ZeroQ style): the output KL divergence when one tensor at a time is
  quantized, see :mod:`nasq.baselines.measured`.

Latency budgets (``search.latency_ms`` with ``search.latency_table``, a ``nasq profile`` table): ``hessian``,
``fisher``, ``measured`` and ``random`` solve the same knapsack with each group's latency on the table in whole
nanoseconds (:func:`nasq.contract.cost.latency_knapsack`: costs rounded up, the budget down), and ``magnitude``
prunes in its order against those costs, so the plan's latency on that table is within the budget; ``uniform``
and ``rule`` allocate by bytes and refuse a latency budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from nasq.baselines.hessian import (
    CURVATURES,
    GRANULARITIES,
    checked_shrinkage,
    hessian_allocation,
    recorded_traces,
    recorded_weighted_errors,
    tensor_weights,
)
from nasq.baselines.measured import SPREADS, measured_allocation
from nasq.config import Config
from nasq.contract.cost import (
    MB,
    NS_PER_MS,
    Budget,
    LatencyBudget,
    latency_knapsack,
    latency_size_budget,
    load_latency_budget,
    plan_latency_ms,
    plan_size_bytes,
    size_budget,
    size_tables,
    uniform_plan,
)
from nasq.contract.damage import DamageSource, load_damage, load_pooled_damage
from nasq.contract.model_dir import load_model_dir, model_dir_of
from nasq.contract.plan import Plan, make_plan
from nasq.contract.space import SearchedTensor, SearchSpace, load_space, resolve
from nasq.data.glue import get_task
from nasq.data.tasks import load_task_data
from nasq.errors import NasqError
from nasq.io import finite_number
from nasq.models.loading import load_pretrained, resolve_model_dir
from nasq.models.surgery import linear_shapes, model_param_shapes
from nasq.run import Progress
from nasq.search.finalize import allocate, choices_to_bits

__all__ = [
    "DEFAULT_BATCHES",
    "FISHER_BATCHES",
    "FISHER_RECIPE",
    "LATENCY_METHODS",
    "METHODS",
    "baseline_budget",
    "baseline_latency",
    "baseline_model",
    "baseline_plan",
    "baseline_tensors",
    "check_latency_method",
    "check_measured_options",
    "default_batches",
    "group_magnitudes",
    "magnitude_allocation",
    "random_allocation",
    "random_utilities",
    "resolve_recipe",
    "rule_allocation",
    "uniform_allocation",
]

METHODS = ("uniform", "rule", "hessian", "fisher", "measured", "random", "magnitude")
LATENCY_METHODS = ("hessian", "fisher", "measured", "random", "magnitude")  # the ones that take a latency budget (docstring)
# `fisher`: the hessian baseline with these options (the protocol's `fisher_t` cells, experiments/protocol.yaml).
# Per weight (`fisher_w`) was the default for a few hours of 2026-12-05, switched back by the rule written in
# experiments/results/protocol/NOTES.md before the row that decided it: over the rows both ran it no longer had the
# higher mean at more rows than the lower.
FISHER_RECIPE = {"curvature": "fisher", "granularity": "tensor"}
FISHER_BATCHES = 16  # train batches the Fisher traces are summed over (512 rows at batch 32)
DEFAULT_BATCHES = 8  # the other data-reading baselines' (hessian per probe, measured per forward)


def default_batches(method: str) -> int:
    """The train batches ``method`` reads when ``--n-batches`` is not given."""
    return FISHER_BATCHES if method == "fisher" else DEFAULT_BATCHES


def uniform_allocation(tensors: Sequence[SearchedTensor], bits: int) -> list[tuple[int, ...]]:
    """Every group of every tensor at ``bits``; ``NasqError`` naming the first tensor whose choices lack it."""
    bits = int(bits)
    for t in tensors:
        if bits not in t.choices:
            raise NasqError(f"uniform {bits} bits: tensor {t.path} (rule {t.rule!r}) may only take bits "
                            f"{list(t.choices)} in this search space; pick one of them or use a space whose "
                            f"rules allow {bits}")
    return uniform_plan(tensors, bits)


def rule_allocation(tensors: Sequence[SearchedTensor], bits: int, rule_bits: dict[str, int]) -> list[tuple[int, ...]]:
    """Every group of a tensor at ``rule_bits[t.rule]``, ``bits`` for the rules not named; ``NasqError`` for a rule
    the space does not have or a width a tensor may not take."""
    rules = sorted({t.rule for t in tensors})
    if unknown := sorted(set(rule_bits) - set(rules)):
        raise NasqError(f"rule bits: the space has no rule {', '.join(map(repr, unknown))}; its rules are {rules}")
    out = []
    for t in tensors:
        b = int(rule_bits.get(t.rule, bits))
        if b not in t.choices:
            raise NasqError(f"rule bits: tensor {t.path} (rule {t.rule!r}) may only take bits {list(t.choices)} in "
                            f"this search space, not {b}")
        out.append((b,) * t.num_groups)
    return out


def random_utilities(tensors: Sequence[SearchedTensor], seed: int) -> list[np.ndarray]:
    """``[G, C]`` per tensor: cumulative sums of i.i.d. ``Uniform(0, 1)`` over the (ascending) choices, times
    each group's weight count (module docstring)."""
    rng = np.random.default_rng(int(seed))
    return [np.cumsum(rng.random((t.num_groups, len(t.choices))), axis=1)
            * (np.asarray(t.group_sizes, np.float64) * t.cols)[:, None] for t in tensors]


def random_allocation(tensors: Sequence[SearchedTensor], budget: int, seed: int, *,
                      costs: Sequence[np.ndarray] | None = None, time_limit: float = 20.0) -> list[tuple[int, ...]]:
    """The knapsack optimum of :func:`random_utilities` with a cost within ``budget`` (module docstring): bytes, or
    the units of ``costs`` (per-tensor ``[G, C]`` integer tables, e.g. a latency budget's)."""
    tables = size_tables(tensors) if costs is None else costs
    alloc = allocate(random_utilities(tensors, seed), tables, int(budget), time_limit=time_limit)
    return choices_to_bits(tensors, alloc.choices)


def group_magnitudes(model: nnx.Module, tensors: Sequence[SearchedTensor]) -> list[np.ndarray]:
    """``[G]`` per tensor: ``rms(W_g) / rms(W)`` of the fp32 weights (biases excluded)."""
    out = []
    for t, (w, _b) in zip(tensors, tensor_weights(model, tensors), strict=True):
        row_sq = np.square(w, dtype=np.float64).sum(axis=1)
        g_rms = np.sqrt(np.add.reduceat(row_sq, np.asarray(t.row_offsets[:-1])) /
                        (np.asarray(t.group_sizes) * t.cols))
        t_rms = np.sqrt(row_sq.sum() / t.num_weights)
        out.append(g_rms / t_rms if t_rms > 0 else np.zeros_like(g_rms))
    return out


def magnitude_allocation(model: nnx.Module, tensors: Sequence[SearchedTensor], capacity: int, bits: int,
                         costs: Sequence[np.ndarray] | None = None) -> list[tuple[int, ...]]:
    """Uniform ``bits`` with the smallest-magnitude groups pruned until the plan's cost is within ``capacity``.

    The cost is bytes (``costs`` None: :func:`nasq.contract.cost.size_tables`) or a latency budget's whole
    nanoseconds (``costs``: per-tensor ``[G, C]`` integer tables over the tensor's choices, with ``capacity``, from
    :func:`nasq.contract.cost.latency_knapsack`): ``cost = sum_{t,g} costs_t[g, c_tg]``, and pruning group g of
    tensor t saves ``costs_t[g, c(bits)] - costs_t[g, c(0)]``."""
    plan = [list(b) for b in uniform_allocation(tensors, bits)]  # every tensor offers `bits` (checked there)
    tables = size_tables(tensors) if costs is None else costs
    at = [t.choices.index(bits) for t in tensors]
    total = sum(int(tab[:, c].sum()) for tab, c in zip(tables, at, strict=True))
    if total <= capacity:
        return [tuple(b) for b in plan]
    mags = group_magnitudes(model, tensors)
    cand = [(float(m[g]), ti, g) for ti, (t, m) in enumerate(zip(tensors, mags, strict=True)) if 0 in t.choices
            for g in range(t.num_groups)]
    cand.sort(key=lambda x: x[0])  # stable: ties keep tensor / group order
    for _m, ti, g in cand:
        t, tab = tensors[ti], tables[ti]
        total -= int(tab[g, at[ti]]) - int(tab[g, t.choices.index(0)])
        plan[ti][g] = 0
        if total <= capacity:
            break
    if total > capacity:
        what = (f"{total:,} bytes ({total / MB:.4f} MB) > the budget of {capacity:,} bytes" if costs is None else
                f"{total / NS_PER_MS:.4f} ms of searched linears on the latency table > their share of the budget, "
                f"{capacity / NS_PER_MS:.4f} ms")
        raise NasqError(f"magnitude baseline at {bits} bits: even with every prunable group pruned the plan "
                        f"takes {what}; raise the budget, lower --bits, or allow 0 (prune) in more rules of the space")
    return [tuple(b) for b in plan]


# ---------------------------------------------------------------------------------------------- plans


def baseline_model(cfg: Config, log=print):
    """(fp32 model, model dir with the tokenizer, provenance) for `cfg.kd.teacher` or `cfg.model.name`."""
    num_labels = get_task(cfg.data.task).num_labels
    if cfg.kd.teacher:
        model, meta = load_model_dir(cfg.kd.teacher)
        if meta.get("quantized"):
            raise NasqError(f"--teacher {cfg.kd.teacher} is a quantized run; baselines allocate for the fp32 "
                            "fine-tune (pass the `nasq finetune` run without --plan)")
        if meta.get("num_labels") != num_labels:
            raise NasqError(f"--teacher {cfg.kd.teacher} was trained for {meta.get('task')!r} with "
                            f"{meta.get('num_labels')} labels, but --task {cfg.data.task} has {num_labels}; "
                            "pass the matching --task")
        return model, model_dir_of(cfg.kd.teacher), {"run": str(cfg.kd.teacher), "teacher_task": meta.get("task")}
    model_dir = resolve_model_dir(cfg.model.name)
    model, _, report = load_pretrained(model_dir, num_labels, seed=cfg.train.seed)
    if report.new_head:
        log("warning: allocating for a pretrained checkpoint with a fresh task head; pass --teacher RUN (an "
            "fp32 fine-tune) for a meaningful Hessian or measured baseline.")
    return model, model_dir, {"model_dir": str(model_dir)}


def baseline_tensors(cfg: Config, model: nnx.Module) -> tuple[SearchSpace, list[SearchedTensor]]:
    """The search space ``cfg.search.space`` resolved on ``model`` (as the search does)."""
    space = load_space(cfg.search.space)
    return space, resolve(space, linear_shapes(model.bert), model.config.num_attention_heads)


def baseline_budget(cfg: Config, model: nnx.Module) -> Budget | None:
    """The budget of ``cfg.search`` (``budget_mb`` / ``avg_bits`` / ``ratio``, ``convention``) on ``model``'s
    searched tensors, or None when none is given; for a latency budget the whole reachable size range
    (:func:`nasq.contract.cost.latency_size_budget`; the latency is :func:`baseline_latency`'s)."""
    s = cfg.search
    space, tensors = baseline_tensors(cfg, model)
    if s.latency_ms is not None:
        return latency_size_budget(tensors, s.latency_ms)
    return size_budget(tensors, space, model_param_shapes(model), budget_mb=s.budget_mb, avg_bits=s.avg_bits,
                       ratio=s.ratio, convention=s.convention)


def _knapsack_costs(tensors: Sequence[SearchedTensor], budget: Budget, latency: LatencyBudget | None
                    ) -> tuple[int, list[np.ndarray] | None]:
    """(capacity, cost tables) of the knapsack: ``budget``'s bytes (tables None: bytes), or under ``latency`` whole
    nanoseconds on its table (module docstring)."""
    if latency is None:
        return budget.bytes, None
    return latency_knapsack(tensors, latency.ms, latency.table)


def check_latency_method(method: str, latency: LatencyBudget | None) -> None:
    """Only :data:`LATENCY_METHODS` take a latency budget."""
    if latency is not None and method not in LATENCY_METHODS:
        raise NasqError(f"the {method} baseline allocates under a size budget; use --budget-mb, --avg-bits or "
                        f"--ratio instead of --latency-ms (latency budgets: {', '.join(LATENCY_METHODS)})")


def baseline_latency(cfg: Config, model: nnx.Module) -> LatencyBudget | None:
    """``cfg.search``'s latency budget on its table (checked against ``model``'s searched tensors), or None."""
    s = cfg.search
    if s.latency_ms is None:
        return None
    return load_latency_budget(baseline_tensors(cfg, model)[1], s.latency_ms, s.latency_table)


def measured_forwards(cfg: Config, model: nnx.Module, refine_rounds: int = 0) -> int:
    """How many forwards of its rows the measured allocation runs (one per searched tensor and width, again per
    refinement round): the length of its progress bar."""
    return (1 + refine_rounds) * sum(len(t.choices) for t in baseline_tensors(cfg, model)[1])


def check_measured_options(method: str, *, damage_from: DamageSource | None = None, refine_rounds: int = 0,
                           min_tokens: int = 0, spread: str = "rows") -> None:
    """The measured baseline's own options (``--damage-from``, ``--refine-rounds``, ``--min-tokens``,
    ``--spread``): only for ``measured``, non-negative or known, and the three that measure cannot work from
    recorded damages. ``NasqError`` else (``nasq baseline`` calls it before reading any data)."""
    if spread not in SPREADS:
        raise NasqError(f"--spread must be one of {', '.join(SPREADS)}, got {spread!r}")
    if spread != "rows" and damage_from is not None:
        raise NasqError(f"--spread {spread} reads curvature traces on the measured rows, so it cannot work from "
                        "--damage-from; drop one")
    for flag, value in (("--damage-from", damage_from is not None), ("--refine-rounds", refine_rounds),
                        ("--min-tokens", min_tokens), ("--spread", spread != "rows")):
        if value and method != "measured":
            raise NasqError(f"{flag} is for the measured baseline, not {method}")
    for flag, value in (("--min-tokens", min_tokens), ("--refine-rounds", refine_rounds)):
        if value < 0:
            raise NasqError(f"{flag} must be >= 0, got {value}")
    if min_tokens and damage_from is not None:
        raise NasqError("--min-tokens picks the rows to measure on, so it cannot work from --damage-from; drop one")
    if refine_rounds and damage_from is not None:
        raise NasqError("--refine-rounds measures around each plan, so it cannot work from --damage-from; drop one")


def check_hessian_options(method: str, granularity: str = "group", curvature: str = "hutchinson",
                          traces_from: str | Path | None = None, shrinkage: float = 0.0) -> None:
    """The Hessian baseline's own options (``--granularity``, ``--curvature``, ``--traces-from``,
    ``--shrinkage``): known, and only for ``hessian`` (``fisher`` resolved to it first, :func:`resolve_recipe`);
    recorded traces are per tensor; a shrinkage is a number in [0, 1], per weight only."""
    for flag, value, known, default in (("granularity", granularity, GRANULARITIES, "group"),
                                        ("curvature", curvature, CURVATURES, "hutchinson")):
        if value not in known:
            raise NasqError(f"--{flag} must be one of {', '.join(known)}, got {value!r}")
        if value != default and method != "hessian":
            raise NasqError(f"--{flag} is for the hessian baseline, not {method}")
    if traces_from is not None and method != "hessian":
        raise NasqError(f"--traces-from is for the fisher and hessian baselines, not {method}")
    checked_shrinkage(shrinkage, granularity)
    if traces_from is not None and granularity == "group":
        raise NasqError("--traces-from gives one trace per tensor, so it scores groups by their tensor's: add "
                        "--granularity tensor (or use the fisher baseline; --granularity weight re-solves a "
                        "per-weight plan from the errors it recorded)")


def resolve_recipe(method: str, granularity: str | None = None,
                   curvature: str | None = None) -> tuple[str, str, str]:
    """``(method, granularity, curvature)`` with the Hessian options' defaults filled in (None: not given) and
    ``fisher`` spelled as the ``hessian`` baseline it is (``FISHER_RECIPE``: its curvature always, its granularity
    unless another is given, e.g. ``weight``); ``NasqError`` when ``fisher`` is given another curvature."""
    if method != "fisher":
        return method, granularity or "group", curvature or "hutchinson"
    if curvature is not None and curvature != FISHER_RECIPE["curvature"]:  # the recipe fixes the curvature
        raise NasqError(f"--curvature {curvature}: the fisher baseline is the hessian baseline with --curvature "
                        f"{FISHER_RECIPE['curvature']}; for another --curvature, use the hessian baseline")
    return "hessian", granularity or FISHER_RECIPE["granularity"], FISHER_RECIPE["curvature"]


def baseline_plan(
    method: str,
    model: nnx.Module,
    data,
    cfg: Config,
    budget: Budget | None,
    *,
    bits: int | None = None,
    rule_bits: dict[str, int] | None = None,
    seed: int | None = None,
    n_batches: int = 8,
    n_probes: int = 4,
    time_limit: float = 20.0,
    provenance: dict[str, Any] | None = None,
    progress=None,
    damage_from: DamageSource | None = None,
    refine_rounds: int = 0,
    min_tokens: int = 0,
    spread: str = "rows",
    granularity: str | None = None,
    curvature: str | None = None,
    traces_from: str | Path | None = None,
    latency: LatencyBudget | None = None,
    shrinkage: float = 0.0,
):
    """A :class:`nasq.contract.plan.Plan` of baseline ``method`` for ``model`` in the space ``cfg.search.space``.

    ``budget`` (e.g. from :func:`baseline_budget`) is required except for ``uniform`` (which needs ``bits``; a
    given budget is recorded and must be met); ``rule`` needs ``bits`` (the width of the rules not in ``rule_bits``)
    and ``rule_bits``, and is checked against a budget like ``uniform``. ``magnitude`` needs ``bits``; ``hessian``
    (and ``fisher``, :func:`resolve_recipe`) and ``measured`` need ``data`` (:class:`nasq.data.tasks.TaskData`)
    and use ``cfg.train.batch_size`` and ``n_batches``
    (``measured`` reports ``progress(done, total)`` after each forward; with ``damage_from``, a measured plan's
    path, it re-solves from the damages recorded there and reads no data (several paths: their damages pooled,
    weighted by their measured rows, :func:`nasq.contract.damage.pooled_damage`); ``refine_rounds``: see
    :func:`nasq.baselines.measured.measured_allocation`, as ``min_tokens`` and ``spread``, which uses ``n_probes``
    too); ``granularity``: the Hessian traces per row group (the default) or per tensor, ``curvature``: of the
    Hessian (Hutchinson, the default) or of its Gauss-Newton part (the Fisher, exact), see
    :func:`nasq.baselines.hessian.hessian_allocation`; ``traces_from``: a hessian (or fisher) plan's path whose
    recorded per-tensor traces are re-solved at this budget (per tensor; no data read,
    :func:`nasq.baselines.hessian.recorded_traces`; per weight: the groups' recorded weighted errors,
    :func:`nasq.baselines.hessian.recorded_weighted_errors`); ``shrinkage`` (per weight only): each weight's
    curvature shrunk toward its tensor's mean by that fraction (0: per weight, 1: per tensor; the module docstring
    of :mod:`nasq.baselines.hessian`). ``seed`` defaults to ``cfg.train.seed``. ``provenance``
    extras (e.g. ``run``, ``task``) are merged into the plan's provenance. ``latency``
    (:func:`baseline_latency`; :data:`LATENCY_METHODS` only): allocate under that latency
    instead of ``budget``'s bytes (module docstring); the provenance records ``latency_budget_ms``,
    ``latency_ms`` (the plan's, on the table) and ``latency_table``.
    """
    if method not in METHODS:
        raise NasqError(f"unknown baseline {method!r}; choose one of {', '.join(METHODS)}")
    method, granularity, curvature = resolve_recipe(method, granularity, curvature)
    check_measured_options(method, damage_from=damage_from, refine_rounds=refine_rounds, min_tokens=min_tokens,
                           spread=spread)
    check_hessian_options(method, granularity, curvature, traces_from, shrinkage)
    check_latency_method(method, latency)
    seed = cfg.train.seed if seed is None else int(seed)
    space, tensors = baseline_tensors(cfg, model)
    if method not in ("uniform", "rule") and budget is None:
        raise NasqError(f"the {method} baseline needs a budget: one of --budget-mb, --avg-bits, --ratio")
    if method in ("uniform", "rule", "magnitude") and bits is None:
        raise NasqError(f"the {method} baseline needs --bits K (one of the space's choices, e.g. "
                        f"{sorted({b for t in tensors for b in t.choices if b})})")
    prov: dict[str, Any] = {"method": method, "run": None, "step": None, "model": cfg.model.name,
                            "space_name": space.name, **(provenance or {})}
    if method in ("uniform", "rule"):
        if method == "rule" and not rule_bits:
            raise NasqError("the rule baseline needs rule widths, e.g. --rule-bits attention_qkv=3,attention_output=3 "
                            f"(the space's rules: {sorted({t.rule for t in tensors})})")
        if method == "uniform":
            bpg, what = uniform_allocation(tensors, bits), f"uniform {bits} bits"
        else:
            rule_bits = {str(k): int(v) for k, v in rule_bits.items()}
            bpg, what = rule_allocation(tensors, bits, rule_bits), f"rule {rule_bits}, else {bits} bits"
            prov["rule_bits"] = rule_bits
        prov["bits"] = int(bits)
        size = plan_size_bytes(tensors, bpg)
        if budget is not None and size > budget.bytes:
            raise NasqError(f"{what} takes {size:,} bytes ({size / MB:.4f} MB), over the budget of "
                            f"{budget.bytes:,} bytes ({budget.source}); lower the bits or drop the budget flag")
    elif method == "random":
        cap, costs = _knapsack_costs(tensors, budget, latency)
        bpg = random_allocation(tensors, cap, seed, costs=costs, time_limit=time_limit)
        prov.update(seed=seed, utilities="cumsum of iid Uniform(0,1) over ascending choices")
    elif method == "magnitude":
        cap, costs = _knapsack_costs(tensors, budget, latency)
        bpg = magnitude_allocation(model, tensors, cap, bits, costs=costs)
        prov.update(bits=int(bits), score="rms(W_g)/rms(W)")
    else:
        pooled_rows = None
        if damage_from is None:
            damage = None
        elif isinstance(damage_from, str | Path):
            damage = load_damage(damage_from, tensors, quant_mode=space.quant_mode)
        else:  # several measured plans: their damages pooled, weighted by their measured rows
            damage, pooled_rows = load_pooled_damage(damage_from, tensors, quant_mode=space.quant_mode)
        traces = errors = None
        if traces_from is not None:
            recorded = Plan.load(traces_from)
            traces = recorded_traces(recorded, tensors, curvature, str(traces_from))
            if granularity == "weight":
                errors = recorded_weighted_errors(recorded, tensors, str(traces_from))
        if data is None and damage is None and traces is None:
            raise NasqError(f"the {method} baseline needs task data (--task / --data-dir)")
        info: dict[str, Any] = {}
        common = {"n_batches": n_batches, "seed": seed, "mode": space.quant_mode,
                  "batch_size": cfg.train.batch_size, "time_limit": time_limit, "info": info}
        cap, common["costs"] = _knapsack_costs(tensors, budget, latency)
        if method == "hessian":
            bpg = hessian_allocation(model, data, tensors, cap, n_probes=n_probes, granularity=granularity,
                                     curvature=curvature, traces=traces, weighted_errors=errors,
                                     shrinkage=shrinkage, **common)
            h = "H" if curvature == "hutchinson" else "G"
            utility = {"group": f"-0.5*Tr({h}_g)/n_g*||W_g-Q_c(W_g)||^2",
                       "tensor": f"-0.5*Tr({h}_t)/n_t*||W_g-Q_c(W_g)||^2 (t: the group's tensor)",
                       "weight": f"-0.5*sum_(i in g) {h}_ii*(w_i-Q_c(w_i))^2"}[granularity]
            if shrinkage:
                utility = (f"-0.5*sum_(i in g) ((1-s)*{h}_ii+s*Tr({h}_t)/n_t)*(w_i-Q_c(w_i))^2, s={shrinkage:g} "
                           "(t: the group's tensor)")
            if curvature == "fisher":
                utility += ", G: the loss's Gauss-Newton matrix (Fisher), exact over the rows"
        else:
            bpg = measured_allocation(model, data, tensors, cap, progress=progress, damage=damage,
                                      refine_rounds=refine_rounds, min_tokens=min_tokens, spread=spread,
                                      n_probes=n_probes, **common)
            utility = "-KL(f || f with only tensor t at c bits)*" + (
                "rows_g/rows_t" if spread == "rows" else
                "h_gc/sum_g' h_g'c, h_gc = Tr(%s_g)/n_g*||W_g-Q_c(W_g)||^2" % ("H" if spread == "hessian" else "G"))
            if refine_rounds:
                prov["refine_rounds"] = int(refine_rounds)
        prov.update(utility=utility, **info)
        if traces is not None:
            prov["traces_from"] = str(traces_from)
        elif damage is None:
            prov.update(seed=seed, task=data.task.name)
        elif pooled_rows is None:
            prov["damage_from"] = str(damage_from)
        else:
            prov.update(damage_from=[str(p) for p in damage_from], pooled_rows=pooled_rows)
    if budget is not None and plan_size_bytes(tensors, bpg) > budget.bytes:  # pragma: no cover - guarded above
        raise RuntimeError(f"{method} baseline exceeded its budget")
    if latency is not None:
        ms = plan_latency_ms(tensors, bpg, latency.table)
        if ms > latency.ms * (1 + 1e-9):  # pragma: no cover - the knapsack guarantees it
            raise RuntimeError(f"{method} baseline takes {ms} ms > its latency budget {latency.ms} ms")
        prov.update(latency_budget_ms=latency.ms, latency_ms=ms, latency_table=latency.table.source)
    return make_plan(tensors, bpg, space=space, budget=budget, param_shapes=model_param_shapes(model),
                     provenance=prov)


def allocate_plan(method: str, cfg: Config, *, bits: int | None = None, rule_bits: dict[str, int] | None = None,
                  n_batches: int | None = None, n_probes: int = 4, time_limit: float = 20.0,
                  damage_from: DamageSource | None = None, refine_rounds: int = 0, min_tokens: int = 0,
                  spread: str = "rows", granularity: str | None = None, curvature: str | None = None,
                  traces_from: str | Path | None = None, shrinkage: float = 0.0, log=print):
    """A :class:`nasq.contract.plan.Plan` of ``method`` from a config alone, as ``nasq baseline`` and ``nasq
    pipeline`` make it: the model is ``cfg.kd.teacher`` (else the pretrained ``cfg.model.name``,
    :func:`baseline_model`), the budget ``cfg.search``'s (:func:`baseline_budget`), the rows ``cfg.data``'s task
    (read only by ``hessian``, ``fisher`` and ``measured``, and only after every option is checked); ``measured``
    shows a progress bar of its forwards. ``fisher`` is ``hessian`` with ``FISHER_RECIPE`` (another ``curvature``
    is refused; ``granularity`` None: the recipe's); ``n_batches`` None: :func:`default_batches`. The other
    arguments are :func:`baseline_plan`'s."""
    if method not in METHODS:
        raise NasqError(f"unknown baseline {method!r}; choose one of {', '.join(METHODS)}")
    if n_batches is None:
        n_batches = default_batches(method)
    check_measured_options(method, damage_from=damage_from, refine_rounds=refine_rounds, min_tokens=min_tokens,
                           spread=spread)
    if rule_bits and method != "rule":
        raise NasqError(f"--rule-bits is for the rule baseline, not {method}")
    name = method
    method, granularity, curvature = resolve_recipe(method, granularity, curvature)
    check_hessian_options(method, granularity, curvature, traces_from, shrinkage)
    model, model_dir, prov = baseline_model(cfg, log)
    latency = baseline_latency(cfg, model)
    check_latency_method(name, latency)
    budget = baseline_budget(cfg, model)
    if budget is None and method not in ("uniform", "rule"):  # before reading any data
        raise NasqError(f"the {name} baseline needs a budget: one of --budget-mb, --avg-bits, --ratio")
    measure = (method == "hessian" and traces_from is None) or (method == "measured" and damage_from is None)
    data = None
    if measure:
        data = load_task_data(cfg, model_dir=model_dir)
    prov.update(task=cfg.data.task, num_labels=model.num_labels)
    bar = None
    if method == "measured" and damage_from is None:  # one forward of the rows per (tensor, width)
        bar = Progress(measured_forwards(cfg, model, refine_rounds), desc="measured: forwards")
    try:
        plan = baseline_plan(method, model, data, cfg, budget, bits=bits, rule_bits=rule_bits, n_batches=n_batches,
                             n_probes=n_probes, time_limit=time_limit, provenance=prov,
                             progress=(lambda done, total: bar.update(1)) if bar else None, damage_from=damage_from,
                             refine_rounds=refine_rounds, min_tokens=min_tokens, spread=spread,
                             granularity=granularity, curvature=curvature, traces_from=traces_from,
                             latency=latency, shrinkage=shrinkage)
    finally:
        if bar:
            bar.close()
    for line in (predicted_line(plan.provenance), hessian_noise_warning(plan.provenance)):
        if line:
            log(line)
    return plan


# share of row groups whose Hessian trace estimate came out <= the clamp floor above which `nasq baseline hessian`
# warns: the diagonal block's trace is positive near a minimum, so many nonpositive estimates mean noise
NOISY_TRACE_SHARE = 0.2


def hessian_noise_warning(provenance: dict) -> str | None:
    """A warning line when a Hessian plan's trace estimates look like noise: more than ``NOISY_TRACE_SHARE`` of its
    groups at or below the clamp floor (``clamped_groups`` of ``groups``); ``None`` else, and for the Gauss-Newton
    curvature (``--curvature fisher``: computed exactly and never negative, so a group near 0 barely moves the
    outputs)."""
    if provenance.get("curvature", "hutchinson") != "hutchinson":
        return None
    clamped, groups = provenance.get("clamped_groups"), provenance.get("groups")
    if not isinstance(clamped, int) or not isinstance(groups, int) or groups <= 0:
        return None
    if clamped <= NOISY_TRACE_SHARE * groups:
        return None
    head = (f"warning: {clamped:,} of {groups:,} row groups have a Hessian trace estimate of about 0 or below "
            f"(clamped to a floor, so they get the narrowest width; {provenance.get('n_batches')} batches x "
            f"{provenance.get('n_probes')} probes): ")
    if provenance.get("granularity", "group") == "group":
        return head + ("per-group estimates this noisy make a noisy plan; pool them per tensor (--granularity "
                       "tensor) with more --n-batches / --n-probes (experiments/hessian_reliability.py measures "
                       "how far two draws agree)")
    return head + ("the loss Hessian's trace of whole tensors is <= 0 (an indefinite Hessian at this model, or "
                   "noise: more --n-batches / --n-probes tell which); consider its Gauss-Newton part "
                   "(--curvature fisher, never negative) or the measured baseline")


def predicted_line(provenance: dict) -> str | None:
    """The measured plan's predicted output KL against the widest uniform plan's (``predicted_kl_x1000``: ``plan``
    and ``uniform``, at ``predicted_uniform_bits``), as a line for the user; ``None`` without a prediction."""
    pred = provenance.get("predicted_kl_x1000")
    if not isinstance(pred, dict) or finite_number(pred.get("plan")) is None:
        return None
    line = f"measured: predicted output KL before QAT (additive) {pred['plan'] / 1000:.4f} nats"
    if finite_number(pred.get("uniform")) is not None and pred["uniform"] > 0:
        width = provenance.get("predicted_uniform_bits", "?")
        line += (f", uniform {width}-bit (widest that fits) {pred['uniform'] / 1000:.4f}: the plan removes "
                 f"{100 * (1 - pred['plan'] / pred['uniform']):.0f}% of uniform's predicted damage")
    if provenance.get("optimal") is False:
        line += ("; the solver did not prove this plan optimal within its time limit (a busy machine can give "
                 "another plan on a rerun)")
    return line
