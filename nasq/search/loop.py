"""`nasq search`: bi-level (first-order DARTS) mixed-precision search under a size or latency budget.

Alternating steps (weights on train batches, gates on held-out batches split off *train*):

    weight step   L_w = task(train) + beta * KD(student, teacher)            -> AdamW on weights and LSQ steps
                  (`kd.hidden_beta`, `kd.attention_beta` > 0: + the teacher's hidden states and attention maps
                  distilled, `nasq.objectives.internals_kd`; in the gate step too with `gate_loss=task_kd`)
                  (`search.train_weights=false`: none; the gates alone, on the frozen starting weights)
    gate step     L_a = task(heldout)  under the budget price mu             -> Adam on gate logits alpha
                  (`search.gate_optimizer=global_adam`: one second moment for all gates, so a larger
                  gradient moves its gate faster: `nasq.objectives.scale_by_global_adam`)
                  (`search.gate_loss=task_kd`: + beta * KD(student, teacher) on the held-out rows)
                  (after `search.warmup_steps` weight-only steps, then every `search.gate_every`-th step)
                  (`search.damage_prior=PLAN`: + w * sum_g sum_c p_{g,c} d_{g,c}, the expected measured
                  damage of the gates' widths, d from a measured plan: `nasq.contract.damage`)

The gate step size is scaled by tau (Adam's step is constant in units of alpha/tau), so annealing does not
make late gate updates jumpier. `E[size] = sum_g sum_c p_{g,c} * bytes(g, c)` (`nasq.contract.cost`, the exporter's byte function) or the
expected latency from a `nasq profile` table. `single` mode (EdMIPS style) updates both from one backward pass
of `task(train) + beta*KD` via `optax.partition`.

**Budget controller: an exact dual price** (no per-budget hand tuning, no penalty weight at all). The gates'
probabilities are `p_g(mu) = softmax((alpha_g - mu * k_g) / tau)` with `k_{g,c} = cost_{g,c} * G / B` (each
(group, choice)'s cost as a share of the per-group budget). `E[cost](mu)` is strictly decreasing in `mu`
(`dE/dmu = -sum_g Var_{p_g}(k_g) / tau * B/G`), so before every step the loop solves

    mu* = 0                      if E[cost](0) <= B
    mu* = min{mu >= 0 : E[cost](mu) <= B}   otherwise (doubling + bisection)

which is the Lagrange multiplier that makes the constraint tight: the expected cost sits *at* the budget at
every step, and the task gradient only redistributes bits between groups (groups whose choice does not matter
drift to the cheapest choices, sensitive ones buy bits). This is the dual-ascent controller taken to its
fixed point each step; `lambda` in the metrics is mu*. Temperature anneals geometrically
`tau_t = tau0 * (tau1/tau0)^(t/T)`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from nasq.config import Config, SearchConfig
from nasq.contract import cost as costlib
from nasq.contract.damage import group_damage, load_damage
from nasq.contract.model_dir import load_model_dir
from nasq.contract.plan import Plan
from nasq.contract.search_result import SearchResult
from nasq.contract.space import SearchedTensor, SpaceInfo, load_space, resolve
from nasq.data.batching import iterate_batches
from nasq.data.tasks import TaskData, load_task_data
from nasq.errors import NasqError
from nasq.evaluation import predict_logits
from nasq.models.loading import load_pretrained
from nasq.models.surgery import linear_shapes, model_param_shapes
from nasq.objectives import gate_optimizer, internals_kd, kd_loss, task_loss, total_steps, weight_optimizer
from nasq.parallel import DataParallel
from nasq.quant.layers import GateLogits, gated_modules, set_search_context, to_supernet
from nasq.run import Cadence, RunDir, TrainState, resume_state, run_finished, save_state, train_loop


def solve_price(alphas: list[jax.Array], costs: list[jax.Array], tables: list[jax.Array], tau, budget: float,
                iters: int = 40) -> jax.Array:
    """Smallest price `mu >= 0` with `sum p(mu) * table <= budget` (see module docstring); jit-friendly."""

    def expected(mu):
        return costlib.expected_cost([jax.nn.softmax((a - mu * k) / tau, axis=-1) for a, k in zip(alphas, costs)],
                                     tables)

    def grow(c):
        hi, n = c
        return hi * 2.0, n + 1

    hi, _ = jax.lax.while_loop(lambda c: (expected(c[0]) > budget) & (c[1] < 60), grow, (jnp.float32(1.0), 0))

    def bisect(_, c):
        lo, hi = c
        mid = 0.5 * (lo + hi)
        over = expected(mid) > budget
        return jnp.where(over, mid, lo), jnp.where(over, hi, mid)

    _, hi = jax.lax.fori_loop(0, iters, bisect, (jnp.float32(0.0), hi))
    return jnp.where(expected(0.0) <= budget, 0.0, hi)


def normalised_costs(tables: list[np.ndarray], budget: float) -> list[np.ndarray]:
    """`k = cost * G_total / budget`: a choice's cost as a share of the per-group budget."""
    groups = sum(t.shape[0] for t in tables)
    return [np.asarray(t, np.float64) * groups / budget for t in tables]


def temperature(step: int, total: int, tau0: float, tau1: float) -> float:
    return float(tau0 * (tau1 / tau0) ** (min(step, total) / max(total, 1)))


def base_model(cfg: Config, data: TaskData, log=print) -> nnx.Module:
    """The fp32 model the supernet starts from: the fine-tuned teacher if given, else pretrained."""
    if cfg.kd.teacher:
        model, _ = load_model_dir(cfg.kd.teacher)
        return model
    model, _, report = load_pretrained(data.model_dir, data.task.num_labels, seed=cfg.train.seed)
    if report.new_head:
        log("warning: searching from a pretrained checkpoint with a fresh task head; pass --teacher RUN "
            "(an fp32 fine-tune) for meaningful gates.")
    return model


class Problem(NamedTuple):
    """Everything static about a search: tensors, cost tables, budget."""

    tensors: list[SearchedTensor]
    budget: costlib.Budget
    cost_tables: list[np.ndarray]  # bytes (or ms) per (group, choice), tensor order
    cost_kind: str  # "size" | "latency"
    cost_budget: float  # bytes or ms
    param_shapes: dict
    latency: costlib.LatencyTable | None = None  # the table of a latency budget


def make_problem(cfg: Config, model: nnx.Module) -> Problem:
    """Resolve the search space on the model and the budget; infeasible budgets fail here, before training."""
    space = load_space(cfg.search.space)
    tensors = resolve(space, linear_shapes(model.bert), model.config.num_attention_heads)
    shapes = model_param_shapes(model)
    s = cfg.search
    if s.latency_ms is not None:
        table = costlib.load_latency_budget(tensors, s.latency_ms, s.latency_table).table
        budget = costlib.latency_size_budget(tensors, s.latency_ms)
        tables = [costlib.latency_table(t, table) for t in tensors]
        return Problem(tensors, budget, tables, "latency", float(s.latency_ms) - table.fixed_ms, shapes, table)
    budget = costlib.size_budget(tensors, space, shapes, budget_mb=s.budget_mb, avg_bits=s.avg_bits, ratio=s.ratio,
                                 convention=s.convention)
    if budget is None:
        raise NasqError("search needs a budget: one of --budget-mb, --avg-bits, --ratio, --latency-ms.")
    return Problem(tensors, budget, costlib.size_tables(tensors), "size", float(budget.bytes), shapes)


def plan_gate_logits(plan: Plan, tensors: list[SearchedTensor], logit: float) -> dict[str, np.ndarray]:
    """Initial gate logits from a plan: ``logit`` on the width the plan gives each group, 0 elsewhere.

    Every searched tensor must be in the plan with the same row groups, and each planned width must be one of
    the tensor's choices (a plan of the same model and space, e.g. `nasq baseline hessian`'s)."""
    by_path = {t.path: t for t in plan.tensors}
    out = {}
    for t in tensors:
        p = by_path.get(t.path)
        if p is None:
            raise NasqError(f"init plan {plan.source}: tensor {t.path} is searched but not in the plan; give a plan "
                            "of the same model and search space")
        if tuple(p.group_sizes) != tuple(t.group_sizes):
            raise NasqError(f"init plan {plan.source}: {t.path} has {len(p.group_sizes)} row groups of sizes "
                            f"{list(p.group_sizes)[:4]}..., the space has {len(t.group_sizes)}; give a plan of the "
                            "same search space")
        bad = sorted({b for b in p.bits if b not in t.choices})
        if bad:
            raise NasqError(f"init plan {plan.source}: {t.path} uses widths {bad}, not among the space's choices "
                            f"{list(t.choices)}")
        a = np.zeros((len(t.group_sizes), len(t.choices)), np.float32)
        a[np.arange(len(p.bits)), [t.choices.index(b) for b in p.bits]] = logit
        out[t.path] = a
    return out


def supernet_of(cfg: Config, model: nnx.Module, problem: Problem) -> nnx.Module:
    """The untrained supernet of ``model`` for ``problem``: gated tensors at their initial gates and steps."""
    s = cfg.search
    logits = (plan_gate_logits(Plan.load(s.init_plan), problem.tensors, s.init_plan_logit)
              if s.gate_init == "plan" else None)
    return to_supernet(model, problem.tensors, mode=load_space(s.space).quant_mode, gate_init=s.gate_init,
                       costs=normalised_costs(problem.cost_tables, problem.cost_budget), gate_logits=logits)


def load_damage_prior(path: str, tensors: list[SearchedTensor], quant_mode: str) -> list[np.ndarray]:
    """``d_{g,c}`` (``[G, C]`` per searched tensor) from a measured plan (``search.damage_prior``): the damages its
    provenance records (:func:`nasq.contract.damage.load_damage`, checked as untrusted input and against the
    space's ``quant_mode``) spread over each tensor's row groups."""
    return group_damage(tensors, load_damage(path, tensors, "damage prior ", quant_mode=quant_mode))


def expected_damage(probs: list[jax.Array], damage: list[jax.Array]) -> jax.Array:
    """``sum_t sum_g sum_c p_{g,c} d_{g,c}``: the measured output damage (nats) the gates expect."""
    return sum((jnp.sum(p * d) for p, d in zip(probs, damage, strict=True)), jnp.float32(0))


def gate_entropy(probs: list[jax.Array]) -> jax.Array:
    ent = [-(p * jnp.log(p + 1e-12)).sum(-1) for p in probs]
    return jnp.concatenate(ent).mean()


class SearchSteps(NamedTuple):
    """The jitted pieces of one search iteration over the split supernet state (`build_steps`)."""

    weight: Callable   # (weights, gates, w_opt, ctx, batch, key, teacher_logits) -> (weights, w_opt, metrics)
    # (weights, gates, g_opt, ctx, held-out batch, key, tau, held-out teacher logits | None) -> (gates, g_opt, metrics)
    gate: Callable
    single: Callable   # (weights, gates, opt, ctx, batch, key, teacher_logits, tau) -> (weights, gates, opt, metrics)
    single_tx: optax.GradientTransformation  # the single-level optimizer over (weights, gates)
    expected_cost: Callable  # gate probabilities -> E[cost]
    price: Callable    # (weights, gates, ctx, tau) -> mu*, the budget's dual price


def build_steps(graphdef, rest, problem: Problem, w_tx, g_tx, *, is_regression: bool, kd_beta: float,
                kd_temperature: float, damage: list[np.ndarray] | None = None,
                damage_weight: float = 1.0, hidden_beta: float = 0.0, attention_beta: float = 0.0,
                teacher_graphdef=None) -> SearchSteps:
    """Jitted weight / gate / single-level steps over the split supernet state. ``damage`` (``[G, C]`` per tensor,
    :func:`load_damage_prior`): the gate loss adds ``damage_weight * expected_damage(probs)``. A step given a
    ``teacher_state`` (the frozen teacher split with ``teacher_graphdef``) adds the internals' distillation
    (``objectives.internals_kd``: ``hidden_beta`` x hidden states, ``attention_beta`` x attention maps)."""
    tables = [jnp.asarray(t, jnp.float32) for t in problem.cost_tables]
    dmg = None if damage is None else [jnp.asarray(d, jnp.float32) for d in damage]

    def gate_objective(lt, lkd, probs):
        """The gates' loss and its metrics: task (+ KD) on the batch, + the expected measured damage."""
        loss = lt + kd_beta * lkd
        aux = {"expected_cost": expected_cost(probs), "gate_entropy": gate_entropy(probs)}
        if dmg is not None:
            aux["gate_damage"] = expected_damage(probs, dmg)
            loss = loss + damage_weight * aux["gate_damage"]
        return loss, aux

    def forward(weights, gates, ctx_rest, batch, key, teacher_state=None):
        """Logits, the gates' probabilities, and the internals' KD term and its parts (0 and {} without a
        teacher state)."""
        model = nnx.merge(graphdef, weights, gates, ctx_rest)
        ids, tt, am = batch.input_ids, batch.token_type_ids, batch.attention_mask
        probs = [m.probs() for m in gated_modules(model)]
        if teacher_state is None:
            return model(ids, tt, am, key=key), probs, jnp.float32(0), {}
        logits, internals = model(ids, tt, am, key=key, return_internals=True)
        _, t_int = nnx.merge(teacher_graphdef, teacher_state)(ids, tt, am, return_internals=True)
        extra, parts = internals_kd(internals, t_int, am, batch.weights, hidden_beta=hidden_beta,
                                    attention_beta=attention_beta)
        return logits, probs, extra, parts

    def expected_cost(probs):
        return costlib.expected_cost(probs, tables)

    def supervised(logits, batch, teacher_logits):
        lt = task_loss(logits, batch.labels, batch.weights, is_regression)
        lkd = jnp.float32(0)
        if teacher_logits is not None:
            lkd = kd_loss(logits, teacher_logits, batch.weights, kd_temperature, is_regression)
        return lt, lkd

    @jax.jit
    def weight_step(weights, gates, w_opt, ctx_rest, batch, key, teacher_logits, teacher_state=None):
        def loss_fn(w):
            logits, _, extra, parts = forward(w, gates, ctx_rest, batch, key, teacher_state)
            lt, lkd = supervised(logits, batch, teacher_logits)
            return lt + kd_beta * lkd + extra, (lt, lkd, parts)

        (loss, (lt, lkd, parts)), grads = jax.value_and_grad(loss_fn, has_aux=True)(weights)
        upd, w_opt = w_tx.update(grads, w_opt, weights)
        return optax.apply_updates(weights, upd), w_opt, {"loss": loss, "task_loss": lt, "kd_loss": lkd, **parts}

    costs = [jnp.asarray(k, jnp.float32) for k in normalised_costs(problem.cost_tables, problem.cost_budget)]

    @jax.jit
    def price(weights, gates, ctx_rest, tau):
        alphas = [m.alpha[...] for m in gated_modules(nnx.merge(graphdef, weights, gates, ctx_rest))]
        return solve_price(alphas, costs, tables, tau, problem.cost_budget)

    @jax.jit
    def gate_step(weights, gates, g_opt, ctx_rest, batch, key, tau, teacher_logits=None, teacher_state=None):
        def loss_fn(g):
            logits, probs, extra, parts = forward(weights, g, ctx_rest, batch, None, teacher_state)
            lt, lkd = supervised(logits, batch, teacher_logits)
            loss, aux = gate_objective(lt, lkd, probs)
            return loss + extra, (lt, lkd, aux, parts)

        (loss, (lt, lkd, aux, parts)), grads = jax.value_and_grad(loss_fn, has_aux=True)(gates)
        upd, g_opt = g_tx.update(grads, g_opt, gates)
        upd = jax.tree.map(lambda u: u * tau, upd)  # constant step size in alpha/tau units
        m = {"gate_loss": loss, **aux, **{f"gate_{k}": v for k, v in parts.items()}}
        if teacher_logits is not None:
            m.update(gate_task_loss=lt, gate_kd_loss=lkd)
        return optax.apply_updates(gates, upd), g_opt, m

    @jax.jit
    def single_step(weights, gates, opt, ctx_rest, batch, key, teacher_logits, tau, teacher_state=None):
        def loss_fn(wg):
            w, g = wg
            logits, probs, extra, parts = forward(w, g, ctx_rest, batch, key, teacher_state)
            lt, lkd = supervised(logits, batch, teacher_logits)
            loss, aux = gate_objective(lt, lkd, probs)
            return loss + extra, (lt, lkd, aux, parts)

        (loss, (lt, lkd, aux, parts)), grads = jax.value_and_grad(loss_fn, has_aux=True)((weights, gates))
        upd, opt = single_tx.update(grads, opt, (weights, gates))
        upd = (upd[0], jax.tree.map(lambda u: u * tau, upd[1]))  # constant step size in alpha/tau units
        w, g = optax.apply_updates((weights, gates), upd)
        return w, g, opt, {"loss": loss, "task_loss": lt, "kd_loss": lkd, **aux, **parts}

    # single-level: one optimizer over (weights, gates), partitioned by label
    single_tx = optax.partition(
        {"weights": w_tx, "gates": g_tx},
        lambda wg: (jax.tree.map(lambda _: "weights", wg[0]), jax.tree.map(lambda _: "gates", wg[1])))
    return SearchSteps(weight_step, gate_step, single_step, single_tx, expected_cost, price)


def search_iteration(fns: SearchSteps, s: SearchConfig, state: TrainState, step: int, total: int, batch, hbatch,
                     key: jax.Array, rest, teacher_logits=None, heldout_teacher_logits=None, teacher_state=None
                     ) -> tuple[TrainState, dict, Any]:
    """One search step on ``state = {"w.": weights, "g.": gates, "opt.": optimizer state}``: ``(state, metrics,
    the step's search context)``. The temperature ``tau_t`` and the price ``mu*`` are set first (the context the
    step trains under); bi-level mode then takes a weight step on ``batch`` and, after ``s.warmup_steps`` and every
    ``s.gate_every``-th step, a gate step on the held-out ``hbatch`` (distilling ``heldout_teacher_logits``
    when given; ``s.train_weights=False``: the gate step only, the weights stay as they started); single-level
    mode one joint step. ``teacher_state`` (the frozen teacher, when ``kd.hidden_beta`` or ``kd.attention_beta``
    is > 0): the weight and single-level steps distil its internals, the gate step too with
    ``search.gate_loss=task_kd``."""
    weights, gates, opt = state["w."], state["g."], state["opt."]
    tau = temperature(step, total, s.tau_start, s.tau_end)
    mu = fns.price(weights, gates, rest, jnp.float32(tau))
    ctx = set_search_context(rest, tau, jax.random.fold_in(key, 1), s.gumbel, mu)
    if s.mode == "bilevel":
        w_opt, g_opt = opt
        m = {}
        if s.train_weights:
            weights, w_opt, m = fns.weight(weights, gates, w_opt, ctx, batch, key, teacher_logits, teacher_state)
        if step >= s.warmup_steps and (step - s.warmup_steps) % s.gate_every == 0:
            gates, g_opt, mg = fns.gate(weights, gates, g_opt, ctx, hbatch, key, jnp.float32(tau),
                                        heldout_teacher_logits, teacher_state if s.gate_loss == "task_kd" else None)
            m = {**m, **mg}
        opt = (w_opt, g_opt)
    else:
        weights, gates, opt, m = fns.single(weights, gates, opt, ctx, batch, key, teacher_logits, jnp.float32(tau),
                                            teacher_state)
    return {"w.": weights, "g.": gates, "opt.": opt}, {"tau": tau, "lambda": mu, **m}, ctx


def search_optimizers(cfg: Config, steps: int):
    """Weights and LSQ steps: the fine-tuning optimizer (`weight_optimizer`); gate logits: `gate_optimizer`
    (`search.gate_optimizer`: Adam, or Adam with one second moment for all gates)."""
    return weight_optimizer(cfg.train, steps), gate_optimizer(cfg.search.gate_optimizer, cfg.search.gate_lr)


def write_result(run: RunDir, problem: Problem, cfg: Config, data: TaskData, model, step: int) -> None:
    """`search_result.json` + `alphas.safetensors` + `scales.safetensors`: what `nasq finalize` reads."""
    mods = gated_modules(model)
    space = load_space(cfg.search.space)
    result = SearchResult(
        space=SpaceInfo.of(space),
        budget=problem.budget,  # fixed_bytes as size_budget set it: non-zero for the artifact convention only
        tensors=tuple(problem.tensors), param_shapes=problem.param_shapes, step=step,
        cost_kind=problem.cost_kind, cost_budget=problem.cost_budget, num_labels=data.task.num_labels,
        task=data.task.name, model_dir=str(data.model_dir), teacher=cfg.kd.teacher, latency=problem.latency)
    # Effective logits (alpha - mu*k): the distribution the network was trained with, at the current price.
    result.save(run.path, alphas={m.path: np.asarray(m.effective_logits()) for m in mods},
                scales={m.path: np.asarray(m.scales[...]) for m in mods})


def search(cfg: Config, out: str | Path, *, resume: bool = False, overwrite: bool = False, log=print) -> Path:
    """Run the search into `out`; returns the run directory."""
    if resume and run_finished(out):
        log(f"{out} is finished (run.json status done); nothing to resume.")
        return Path(out)
    # Validate the budget before touching the run directory (nothing is created for an infeasible budget).
    dp = DataParallel.from_config(cfg, batch_sizes={"train.batch_size": cfg.train.batch_size,
                                                    "data.eval_batch_size": cfg.data.eval_batch_size})
    data = load_task_data(cfg, with_heldout=True)
    if note := data.truncation_note(cfg.model.max_len):
        log(note)
    model = base_model(cfg, data, log=log)
    distil_internals = cfg.kd.hidden_beta > 0 or cfg.kd.attention_beta > 0
    if distil_internals and not cfg.kd.teacher:
        raise NasqError("kd.hidden_beta / kd.attention_beta > 0 distil the internals of a teacher: set --teacher "
                        "(kd.teacher), or set both to 0")
    problem = make_problem(cfg, model)
    damage = None if cfg.search.damage_prior is None else load_damage_prior(
        cfg.search.damage_prior, problem.tensors, load_space(cfg.search.space).quant_mode)
    run = RunDir(out, kind="search", config=cfg, resume=resume, overwrite=overwrite)
    s = cfg.search
    sn = supernet_of(cfg, model, problem)
    graphdef, weights, gates, rest = nnx.split(sn, nnx.Param, GateLogits, ...)
    steps = total_steps(cfg.train, data)
    w_tx, g_tx = search_optimizers(cfg, steps)
    # the frozen teacher (the model the supernet was made from), run on every step to distil its internals
    t_graphdef, t_state = nnx.split(model) if distil_internals else (None, None)
    fns = build_steps(graphdef, rest, problem, w_tx, g_tx, is_regression=data.task.is_regression,
                      kd_beta=cfg.kd.beta, kd_temperature=cfg.kd.temperature, damage=damage,
                      damage_weight=s.damage_weight, hidden_beta=cfg.kd.hidden_beta,
                      attention_beta=cfg.kd.attention_beta, teacher_graphdef=t_graphdef)
    fns = fns._replace(**{k: dp.wrap(getattr(fns, k)) for k in ("weight", "gate", "single", "price")})
    if s.mode == "bilevel":  # a gates-only search takes no weight step: no optimizer state for the weights
        opt = (w_tx.init(weights) if s.train_weights else optax.EmptyState(), g_tx.init(gates))
    else:
        opt = fns.single_tx.init((weights, gates))
    state, start = {"w.": weights, "g.": gates, "opt.": opt}, 0
    if resume:
        state, start = resume_state(run, state, steps, log)
    state = dp.replicate(state)  # identity unless data_parallel > 1
    t_state = None if t_state is None else dp.replicate(t_state)
    teacher = held_teacher = None
    if cfg.kd.teacher and cfg.kd.beta > 0:
        if s.train_weights:  # the weight step's KD targets (a gates-only search takes no weight step)
            teacher = predict_logits(model, data.train, cfg.data.eval_batch_size, data.buckets, dp.shard)
        if s.gate_loss == "task_kd":
            held_teacher = predict_logits(model, data.heldout, cfg.data.eval_batch_size, data.buckets, dp.shard)
    run.write_info(task=data.task.name, total_steps=steps, train_rows=len(data.train), devices=dp.size,
                   heldout_rows=len(data.heldout), budget=problem.budget.source, budget_bytes=problem.budget.bytes,
                   cost_kind=problem.cost_kind, status="running")
    log(f"search: {len(problem.tensors)} tensors, {sum(t.num_groups for t in problem.tensors)} groups; "
        f"budget {problem.budget.source} = {problem.cost_budget:.6g} {'bytes' if problem.cost_kind == 'size' else 'ms'}; "
        f"{steps} steps on {len(data.train)} train / {len(data.heldout)} held-out rows")
    base_key = jax.random.key(cfg.train.seed)
    bs = cfg.train.batch_size
    train_it = iterate_batches(data.train, bs, data.buckets, cfg.train.seed, start_step=start)
    held_it = iterate_batches(data.heldout, bs, data.buckets, cfg.train.seed + 1, start_step=start)
    batches = ((step, epoch, (batch, hbatch)) for (step, epoch, batch), (_, _, hbatch) in zip(train_it, held_it))
    unit = 1e6 if problem.cost_kind == "size" else 1.0
    last_ctx = [rest]  # the search context (temperature, noise, price) of the latest step

    def step_fn(state, step, batches):
        batch, hbatch = batches
        tl = None if teacher is None else jnp.asarray(teacher[np.maximum(batch.index, 0)])
        htl = None if held_teacher is None else jnp.asarray(held_teacher[np.maximum(hbatch.index, 0)])
        batch, hbatch, tl, htl = dp.shard((batch, hbatch, tl, htl))
        state, m, last_ctx[0] = search_iteration(fns, s, state, step, steps, batch, hbatch,
                                                 jax.random.fold_in(base_key, step), rest, tl, htl, t_state)
        return state, m

    def record(state, done, m):
        if "expected_cost" not in m:  # no gate step this step (warm-up, or between gate_every steps)
            m["expected_cost"] = float(fns.expected_cost([g.probs(noise=False) for g in gated_modules(
                nnx.merge(graphdef, state["w."], state["g."], last_ctx[0]))]))
        e = m["expected_cost"]
        fields = {**m, "cost_ratio": e / problem.cost_budget}
        if problem.cost_kind == "size":
            fields.update(expected_mb=e / 1e6, budget_mb=problem.cost_budget / 1e6)
        return fields, {"loss": m.get("task_loss", m.get("gate_loss")), "E": f"{e / unit:.4g}",
                        "budget": f"{problem.cost_budget / unit:.4g}",
                        "mu": m["lambda"], "tau": m["tau"]}

    def on_checkpoint(state, done):
        write_result(run, problem, cfg, data, nnx.merge(graphdef, state["w."], state["g."], last_ctx[0]), done)

    state, wall = train_loop(run, state, batches, step_fn, total=steps, start=start, desc="search", record=record,
                             on_checkpoint=on_checkpoint,
                             cadence=Cadence(steps, cfg.train.log_every, cfg.train.checkpoint_every,
                                             last_checkpoint=start))
    # Final state at the final temperature and its price, no noise.
    tau = jnp.float32(temperature(steps, steps, s.tau_start, s.tau_end))
    mu = fns.price(state["w."], state["g."], rest, tau)
    final = nnx.merge(graphdef, state["w."], state["g."], set_search_context(rest, tau, base_key, False, mu))
    save_state(run, state, steps)
    write_result(run, problem, cfg, data, final, steps)
    e_final = float(fns.expected_cost([g.probs(noise=False) for g in gated_modules(final)]))
    run.write_info(status="done", wall_s=round(wall, 1), s_per_step=round(wall / max(steps - start, 1), 4),
                   expected_cost=e_final, final_price=float(mu), cost_budget=problem.cost_budget,
                   cost_ratio=e_final / problem.cost_budget)
    log(f"search done: E[{problem.cost_kind}] = {e_final / unit:.4f} vs budget {problem.cost_budget / unit:.4f} "
        f"({'MB' if problem.cost_kind == 'size' else 'ms'}), {wall:.0f}s -> {run.path}")
    return run.path
