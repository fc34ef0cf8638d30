"""Supernet search: gradients, budget convergence, insensitive groups drift to 0 bits, price solver."""

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from nasq.config import build_config
from nasq.contract.model_dir import save_model_dir
from nasq.contract.space import load_space, resolve
from nasq.errors import NasqError
from nasq.models.loading import load_pretrained
from nasq.models.surgery import linear_shapes
from nasq.quant.layers import GateLogits, QuantScale, set_search_context, to_supernet
from nasq.search.loop import normalised_costs, search, solve_price

REPO = Path(__file__).resolve().parents[1]


def _cfg(model, glue_dir, **search):
    return build_config(("test", {
        "model": {"name": str(model), "max_len": 32},
        "data": {"task": "sst2", "data_dir": str(glue_dir), "train_subset": 256, "buckets": [32]},
        "train": {"max_steps": 40, "batch_size": 16, "lr": 1e-4, "log_every": 5, "checkpoint_every": 1000},
        "search": {"space": "tiny", "gate_lr": 0.1, **search},
    }))


@pytest.fixture(scope="module")
def teacher_dir(tiny_model_dir, glue_dir, tmp_path_factory):
    """A tiny fp32 'teacher': the tiny checkpoint fine-tuned briefly on SST-2."""
    from nasq.train.finetune import finetune

    cfg = build_config(("test", {"model": {"name": str(tiny_model_dir), "max_len": 32},
                                 "data": {"task": "sst2", "data_dir": str(glue_dir), "train_subset": 256,
                                          "buckets": [32]},
                                 "train": {"max_steps": 16, "batch_size": 16, "lr": 1e-3, "log_every": 8}}))
    return finetune(cfg, tmp_path_factory.mktemp("teacher") / "run", log=lambda *a: None)


@pytest.mark.slow
def test_gradients_reach_alpha_weights_and_scales(tiny_model_dir):
    model, cfg, _ = load_pretrained(tiny_model_dir, 2)
    tensors = resolve(load_space("tiny"), linear_shapes(model.bert), cfg.num_attention_heads)
    sn = to_supernet(model, tensors)
    gd, weights, gates, rest = nnx.split(sn, nnx.Param, GateLogits, ...)
    rest = set_search_context(rest, 1.0, jax.random.key(0), False)
    ids = jnp.asarray(np.random.default_rng(0).integers(1000, 30000, (4, 12)), jnp.int32)

    def loss(w, g):
        return jnp.square(nnx.merge(gd, w, g, rest)(ids)).sum()

    gw, gg = jax.grad(loss, argnums=(0, 1))(weights, gates)
    is_var = lambda x: isinstance(x, nnx.Variable)
    scale_grads = [v[...] for v in jax.tree.leaves(gw, is_leaf=is_var) if isinstance(v, QuantScale)]
    kernel_grads = jax.tree.leaves(gw)
    alpha_grads = jax.tree.leaves(gg)
    assert len(alpha_grads) == len(tensors) and all(float(jnp.abs(a).sum()) > 0 for a in alpha_grads)
    assert len(scale_grads) == len(tensors) and all(float(jnp.abs(s).sum()) > 0 for s in scale_grads)
    assert sum(float(jnp.abs(k).sum()) > 0 for k in kernel_grads) > 0.9 * len(kernel_grads)


def test_price_solver_hits_budget():
    rng = np.random.default_rng(0)
    tables = [np.tile(np.array([0.0, 2.0, 4.0, 8.0]), (50, 1)) * (1 + rng.random((50, 1)))]
    alphas = [jnp.asarray(rng.standard_normal((50, 4)), jnp.float32)]
    for budget in (60.0, 120.0, 180.0):  # all below E at price 0 (~260)
        costs = [jnp.asarray(k, jnp.float32) for k in normalised_costs(tables, budget)]
        mu = solve_price(alphas, costs, [jnp.asarray(t, jnp.float32) for t in tables], 0.5, budget)
        p = jax.nn.softmax((alphas[0] - mu * costs[0]) / 0.5, -1)
        e = float((p * tables[0]).sum())
        assert float(mu) > 0 and e <= budget * (1 + 1e-4) and e >= budget * 0.999
    # a loose budget is not binding: price 0
    costs = [jnp.asarray(k, jnp.float32) for k in normalised_costs(tables, 1e9)]
    assert float(solve_price(alphas, costs, [jnp.asarray(t, jnp.float32) for t in tables], 0.5, 1e9)) == 0.0


@pytest.mark.slow
def test_expected_size_ends_at_budget_for_two_budgets(teacher_dir, tiny_model_dir, glue_dir, tmp_path):
    ratios = {}
    for bits in (2.0, 3.0):
        cfg = _cfg(tiny_model_dir, glue_dir, avg_bits=bits)
        cfg = cfg.model_copy(update={"kd": cfg.kd.model_copy(update={"teacher": str(teacher_dir)})})
        run = search(cfg, tmp_path / f"s{bits}", log=lambda *a: None)
        info = json.loads((run / "run.json").read_text())
        ratios[bits] = info["cost_ratio"]
        recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert {"task_loss", "expected_mb", "lambda", "tau", "gate_entropy", "budget_mb"} <= set(recs[-1])
        assert set(load_file(str(run / "alphas.safetensors"))) == {t["path"] for t in json.loads(
            (run / "search_result.json").read_text())["tensors"]}
    for bits, r in ratios.items():
        assert 0.98 <= r <= 1.0 + 1e-4, (bits, r)


def test_insensitive_group_drifts_to_zero_bits(tiny_model_dir, glue_dir, tmp_path):
    """FFN rows whose outputs are never read lose all bits; rows that matter keep them."""
    model, _mcfg, _ = load_pretrained(tiny_model_dir, 2)
    out = model.bert.encoder.layer[0].output.dense
    k = np.asarray(out.kernel[...]).copy()  # (intermediate=64, hidden=32); intermediate group g = rows 16g..16g+15
    k[0:16] = 0.0  # group 0 of intermediate.dense feeds nothing
    k[16:32] *= 8.0  # group 1 strongly affects the output
    out.kernel[...] = jnp.asarray(k)
    teacher = tmp_path / "teacher"
    save_model_dir(teacher / "model", model, source_model_dir=tiny_model_dir, num_labels=2, task="sst2")
    cfg = _cfg(tiny_model_dir, glue_dir, avg_bits=2.0, tau_end=0.5)
    cfg = cfg.model_copy(update={"kd": cfg.kd.model_copy(update={"teacher": str(teacher)})})
    run = search(cfg, tmp_path / "s", log=lambda *a: None)
    alphas = load_file(str(run / "alphas.safetensors"))["encoder.layer.0.intermediate.dense"]
    choices = [0, 2, 4, 8]
    assert choices[int(alphas[0].argmax())] == 0
    assert choices[int(alphas[1].argmax())] > 0
    p = jax.nn.softmax(jnp.asarray(alphas), -1)
    assert float(p[0, 0]) > float(p[1, 0])  # the insensitive group is more pruned than the sensitive one


def test_infeasible_budget_fails_before_training(tiny_model_dir, glue_dir, tmp_path):
    for budget in ({"budget_mb": 100.0}, {"avg_bits": 1.0, "space": "per_matrix"}):  # above max / below min
        cfg = _cfg(tiny_model_dir, glue_dir, **budget)
        with pytest.raises(NasqError, match="reachable range"):
            search(cfg, tmp_path / "never", log=lambda *a: None)
        assert not (tmp_path / "never").exists()


@pytest.mark.slow
def test_single_level_mode_runs(teacher_dir, tiny_model_dir, glue_dir, tmp_path):
    cfg = _cfg(tiny_model_dir, glue_dir, avg_bits=2.0, mode="single")
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_steps": 10}),
                                 "kd": cfg.kd.model_copy(update={"teacher": str(teacher_dir)})})
    run = search(cfg, tmp_path / "single", log=lambda *a: None)
    assert json.loads((run / "run.json").read_text())["cost_ratio"] <= 1.0 + 1e-4
    # one backward pass a step for weights and gates: no separate gate step (bilevel logs its gate_loss)
    logged = [m for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "task_loss" in m]
    assert logged and not any("gate_loss" in m for m in logged)


def test_gates_only_search_leaves_the_teacher_weights(teacher_dir, tiny_model_dir, glue_dir, tmp_path):
    """search.train_weights=false: a gate step every step and no weight step, so every weight and LSQ step of
    the search's checkpoint is the frozen starting point's (the teacher, MSE-initialised steps) while the gates
    move and the expected size meets the budget; the settings it cannot run with are config errors."""
    from nasq.search.restore import search_checkpoint

    def run(name, steps, train_weights):
        raw = _cfg(tiny_model_dir, glue_dir, avg_bits=2.0).model_dump(mode="json")
        raw["train"].update(max_steps=steps, log_every=1)
        raw["search"].update(train_weights=train_weights, gate_loss="task_kd")
        raw["kd"]["teacher"] = str(teacher_dir)
        return search(build_config(("test", raw)), tmp_path / name, log=lambda *a: None)

    runs = {"frozen": run("frozen", 6, False), "trained": run("trained", 6, True)}
    recs = [json.loads(x) for x in (runs["frozen"] / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 6 and all("gate_loss" in r and "task_loss" not in r for r in recs)
    assert json.loads((runs["frozen"] / "run.json").read_text())["cost_ratio"] <= 1.0 + 1e-4
    frozen, trained = search_checkpoint(runs["frozen"]), search_checkpoint(runs["trained"])
    weights = [k for k in frozen if k.startswith("w.")]
    n_opt = {name: sum(k.startswith("opt.") for k in ck) for name, ck in (("frozen", frozen), ("trained", trained))}
    assert 0 < n_opt["frozen"] < n_opt["trained"]  # the gates' optimizer state only: no AdamW state for the weights
    assert weights and any(not np.array_equal(frozen[k], trained[k]) for k in weights)  # training moves them
    start = search_checkpoint(run("one", 1, False))  # the same start after one gate step: weights untouched
    for k in weights:
        np.testing.assert_array_equal(frozen[k], start[k])
    assert any(not np.array_equal(frozen[k], start[k]) for k in frozen if k.startswith("g."))  # the gates moved
    for bad in ({"gate_every": 4}, {"mode": "single"}, {"warmup_steps": 2}, {}):  # {}: no teacher
        with pytest.raises(NasqError, match="train_weights=false"):
            _cfg(tiny_model_dir, glue_dir, avg_bits=2.0, train_weights=False, **bad)


def test_gate_every_takes_one_gate_step_per_k_weight_steps(tiny_model_dir, glue_dir, tmp_path):
    cfg = _cfg(tiny_model_dir, glue_dir, avg_bits=2.0, gate_every=3, warmup_steps=1)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_steps": 8, "log_every": 1})})
    run = search(cfg, tmp_path / "k3", log=lambda *a: None)
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    gated = [r["step"] for r in recs if "gate_loss" in r]
    assert gated == [2, 5, 8]  # steps 1, 4, 7 (0-based) after one warm-up step; `step` counts done steps
    assert all("expected_cost" in r for r in recs)  # logged on weight-only steps too
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "done" and info["cost_ratio"] <= 1.0 + 1e-4


@pytest.mark.slow  # a search variant: a tiny search with KD in the gate step
def test_gate_loss_task_kd_distils_the_teacher_in_the_gate_step(teacher_dir, tiny_model_dir, glue_dir, tmp_path):
    """search.gate_loss=task_kd: the gate step's loss is task + kd.beta * KD to the teacher's logits on the
    held-out rows (logged apart); without a teacher the config is a clear error."""
    base = _cfg(tiny_model_dir, glue_dir, avg_bits=2.0)
    raw = base.model_dump(mode="json")
    raw["train"].update(max_steps=4, log_every=1)
    raw["kd"].update(teacher=str(teacher_dir), beta=0.5)
    raw["search"]["gate_loss"] = "task_kd"
    cfg = build_config(("test", raw))
    run = search(cfg, tmp_path / "kd", log=lambda *a: None)
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 4
    for r in recs:
        assert r["gate_kd_loss"] > 0
        assert r["gate_loss"] == pytest.approx(r["gate_task_loss"] + 0.5 * r["gate_kd_loss"], rel=1e-5)
    assert json.loads((run / "run.json").read_text())["cost_ratio"] <= 1.0 + 1e-4
    with pytest.raises(NasqError, match="gate_loss=task_kd distils the teacher"):
        _cfg(tiny_model_dir, glue_dir, avg_bits=2.0, gate_loss="task_kd")


def test_search_distils_the_teachers_internals(teacher_dir, tiny_model_dir, glue_dir, tmp_path):
    """kd.hidden_beta / kd.attention_beta in the search: the weight step's loss adds the weighted hidden-state and
    attention KD to the teacher (objectives.internals_kd, as QAT does); the gate step adds them with
    gate_loss=task_kd, and not otherwise; without a teacher it is a clear error before the run directory."""
    def run(name, gate_loss):
        raw = _cfg(tiny_model_dir, glue_dir, avg_bits=2.0).model_dump(mode="json")
        raw["train"].update(max_steps=3, log_every=1)
        raw["kd"].update(teacher=str(teacher_dir), beta=0.5, hidden_beta=2.0, attention_beta=3.0)
        raw["search"]["gate_loss"] = gate_loss
        run = search(build_config(("test", raw)), tmp_path / name, log=lambda *a: None)
        return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]

    for r in run("kd", "task_kd"):
        assert r["hidden_kd_loss"] > 0 and r["attention_kd_loss"] > 0
        assert r["loss"] == pytest.approx(r["task_loss"] + 0.5 * r["kd_loss"] + 2.0 * r["hidden_kd_loss"]
                                          + 3.0 * r["attention_kd_loss"], rel=1e-5)
        assert r["gate_loss"] == pytest.approx(r["gate_task_loss"] + 0.5 * r["gate_kd_loss"]
                                               + 2.0 * r["gate_hidden_kd_loss"]
                                               + 3.0 * r["gate_attention_kd_loss"], rel=1e-5)
    recs = run("task", "task")
    assert all(r["hidden_kd_loss"] > 0 and "gate_hidden_kd_loss" not in r for r in recs)
    cfg = _cfg(tiny_model_dir, glue_dir, avg_bits=2.0)
    cfg = cfg.model_copy(update={"kd": cfg.kd.model_copy(update={"hidden_beta": 1.0})})
    with pytest.raises(NasqError, match="distil the internals of a teacher"):
        search(cfg, tmp_path / "no_teacher", log=lambda *a: None)
    assert not (tmp_path / "no_teacher").exists()


def test_global_adam_keeps_the_gradients_ratios_and_is_adam_for_one_parameter():
    """search.gate_optimizer=global_adam: one second moment for all gate logits, so a 10x larger gradient gives a
    10x larger step (per-parameter Adam gives both about the same step); with a single parameter it is Adam."""
    import optax

    from nasq.objectives import gate_optimizer, scale_by_global_adam

    grads = {"a": jnp.asarray([1.0, -10.0]), "b": jnp.asarray([[0.1]])}
    tx = scale_by_global_adam()
    state = tx.init(grads)
    for _ in range(3):
        upd, state = tx.update(grads, state)
    u = np.concatenate([np.ravel(upd["a"]), np.ravel(upd["b"])])
    np.testing.assert_allclose(u / u[0], [1.0, -10.0, 0.1], rtol=1e-5)  # the ratios of the gradients
    rms = np.sqrt(np.mean(np.square([1.0, 10.0, 0.1])))
    np.testing.assert_allclose(u, np.asarray([1.0, -10.0, 0.1]) / rms, rtol=1e-4)  # constant gradients: g / rms
    adam_upd, _ = optax.scale_by_adam().update(grads, optax.scale_by_adam().init(grads))
    assert abs(float(adam_upd["a"][1]) / float(adam_upd["a"][0])) == pytest.approx(1.0, rel=1e-4)  # Adam: equal
    rng = np.random.default_rng(0)
    one = {"x": jnp.asarray(0.3)}
    ga, gb = scale_by_global_adam(), optax.scale_by_adam()
    sa, sb = ga.init(one), gb.init(one)
    for _ in range(5):
        g = {"x": jnp.asarray(rng.normal(), jnp.float32)}
        ua, sa = ga.update(g, sa)
        ub, sb = gb.update(g, sb)
        np.testing.assert_allclose(float(ua["x"]), float(ub["x"]), rtol=1e-5)
    step, _ = gate_optimizer("global_adam", 0.05).update(grads, gate_optimizer("global_adam", 0.05).init(grads))
    assert float(step["a"][0]) < 0  # a descent step of size lr * g / rms
    with pytest.raises(ValueError, match="unknown gate optimizer"):
        gate_optimizer("sgd", 0.1)


@pytest.mark.slow  # a search variant: a tiny search with the global gate optimizer
def test_search_with_the_global_gate_optimizer_meets_its_budget(tiny_model_dir, glue_dir, tmp_path):
    cfg = _cfg(tiny_model_dir, glue_dir, avg_bits=2.0, gate_optimizer="global_adam")
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_steps": 6})})
    run = search(cfg, tmp_path / "g", log=lambda *a: None)
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "done" and info["cost_ratio"] <= 1.0 + 1e-4
    assert "gate_optimizer: global_adam" in (run / "config.yaml").read_text()


# ------------------------------------------------------------ restored search state (nasq.search.restore)
@pytest.fixture(scope="module")
def finished_search(teacher_dir, tiny_model_dir, glue_dir, tmp_path_factory):
    """(search run, its finalized plan path) on the tiny teacher."""
    from nasq.search.finalize import finalize_run

    cfg = _cfg(tiny_model_dir, glue_dir, avg_bits=3.0)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_steps": 12}),
                                 "kd": cfg.kd.model_copy(update={"teacher": str(teacher_dir)})})
    d = tmp_path_factory.mktemp("finished_search")
    run = search(cfg, d / "search", log=lambda *a: None)
    finalize_run(run, d / "plan.json", overwrite=False, budget_override=None, time_limit=20.0)
    return run, d / "plan.json"


def test_gate_init_from_a_plan(finished_search, teacher_dir, tiny_model_dir, glue_dir, tmp_path):
    """search.gate_init=plan: every group starts with `init_plan_logit` on the plan's width and 0 elsewhere; a plan
    of another space is a clear error, and the config needs gate_init and init_plan together; a search so
    initialised runs."""
    from nasq.contract.model_dir import load_model_dir
    from nasq.contract.plan import Plan
    from nasq.quant.layers import gated_modules
    from nasq.search.loop import make_problem, plan_gate_logits, supernet_of

    _run, plan_path = finished_search
    plan = Plan.load(plan_path)
    cfg = _cfg(tiny_model_dir, glue_dir, avg_bits=3.0, gate_init="plan", init_plan=str(plan_path),
               init_plan_logit=3.0)
    model, _ = load_model_dir(teacher_dir)
    problem = make_problem(cfg, model)
    sn = supernet_of(cfg, model, problem)
    planned = {t.path: t.bits for t in plan.tensors}
    mods = gated_modules(sn)
    assert len(mods) == len(problem.tensors) > 0
    for m in mods:
        a = np.asarray(m.alpha[...])
        want = [m.choices.index(b) for b in planned[m.path]]
        np.testing.assert_array_equal(a.argmax(-1), want)
        assert set(np.unique(a)) == {0.0, 3.0} and (a == 3.0).sum() == a.shape[0]

    def changed(**kw):
        return [dataclasses.replace(t, **kw) for t in problem.tensors]

    with pytest.raises(NasqError, match="not in the plan"):
        plan_gate_logits(plan, changed(path="encoder.layer.9.elsewhere"), 2.0)
    with pytest.raises(NasqError, match="same search space"):
        plan_gate_logits(plan, [dataclasses.replace(t, group_sizes=(t.rows,)) for t in problem.tensors], 2.0)
    with pytest.raises(NasqError, match="not among the space's choices"):
        plan_gate_logits(plan, changed(choices=(5, 6)), 2.0)
    with pytest.raises(NasqError, match="go together"):
        _cfg(tiny_model_dir, glue_dir, avg_bits=3.0, gate_init="plan")

    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_steps": 4}),
                                 "kd": cfg.kd.model_copy(update={"teacher": str(teacher_dir)})})
    run = search(cfg, tmp_path / "plan_init", log=lambda *a: None)
    assert json.loads((run / "run.json").read_text())["status"] == "done"


def _logits(model, ids):
    return np.asarray(model(ids, jnp.zeros_like(ids), jnp.ones_like(ids)))


def test_supernet_with_one_hot_gates_is_its_inherited_child(finished_search, teacher_dir):
    """Gates one-hot on the plan's widths: the restored supernet computes exactly the plan's child built from
    the search weights and steps (the two views of the checkpoint agree)."""
    from nasq.contract.model_dir import load_model_dir
    from nasq.contract.plan import Plan
    from nasq.search.restore import inherit_search_weights, restore_supernet

    run, plan_path = finished_search
    d = Plan.load(plan_path).to_dict()
    d["fixed"]["word_embeddings_bits"] = 32  # the supernet keeps unsearched tensors fp32; so does this child
    plan = Plan.from_dict(d, "fp32-embeddings plan")
    teacher, _ = load_model_dir(teacher_dir)
    sn = restore_supernet(run, teacher)
    child = inherit_search_weights(run, plan, teacher)
    by_path = {t.path: t for t in plan.tensors}
    for _, m in nnx.iter_modules(sn):
        if isinstance(getattr(m, "alpha", None), GateLogits):
            c = np.array([m.choices.index(b) for b in by_path[m.path].bits])
            m.alpha[...] = jnp.asarray(1e4 * np.eye(len(m.choices))[c], jnp.float32)
            m.cost[...] = jnp.zeros_like(m.cost[...])  # price * cost must not move the one-hot logits
    ids = jnp.asarray(np.random.default_rng(0).integers(1000, 30000, (4, 12)), jnp.int32)
    np.testing.assert_allclose(_logits(child, ids), _logits(sn, ids), atol=1e-5)
    # ... and the search did train the weights: the child is not the teacher's plan child
    from nasq.quant.apply import apply_plan

    assert np.abs(_logits(apply_plan(teacher, plan), ids) - _logits(child, ids)).max() > 1e-4


@pytest.mark.slow
def test_finetune_init_from_search(finished_search, teacher_dir, glue_dir, tmp_path):
    """`nasq finetune --plan P --init-from SEARCH` starts from the search's weights and planned steps."""
    from nasq.cli import main
    from nasq.contract.plan import Plan
    from nasq.data.tasks import load_task_data
    from nasq.run import RunDir
    from nasq.search.restore import search_checkpoint, search_steps
    from nasq.train.finetune import build_student
    from nasq.tree import flatten

    run, plan_path = finished_search
    flags = ["--plan", str(plan_path), "--teacher", str(teacher_dir), "--task", "sst2", "--data-dir",
             str(glue_dir), "--train-subset", "64", "--max-steps", "2", "--set", "model.max_len=32",
             "--set", "data.buckets=[32]", "--set", "train.batch_size=16"]
    out = tmp_path / "qat"
    assert main(["finetune", *flags, "--init-from", str(run), "--out", str(out)]) == 0
    cfg = RunDir(out, kind="qat", config=None, resume=True, overwrite=False).config
    assert cfg.init_from == str(run)
    student, _ = build_student(cfg, load_task_data(cfg))
    ck = search_checkpoint(run)
    steps = search_steps(ck)
    plan = Plan.load(plan_path)
    params = flatten(nnx.state(student, nnx.Param), "w.")
    t = next(t for t in plan.tensors if len(set(t.bits) - {0}) > 0)
    key = "w.bert." + t.path
    np.testing.assert_array_equal(np.asarray(params[key + ".kernel"]), ck[key + ".kernel"])
    g = next(i for i, b in enumerate(t.bits) if b)
    assert float(np.asarray(params[key + ".scales"])[g]) == float(steps[t.path][g, (0, 2, 4, 8).index(t.bits[g])])
    # without --init-from the student is the teacher's
    plain, _ = build_student(cfg.model_copy(update={"init_from": None}), load_task_data(cfg))
    teacher_k = flatten(nnx.state(plain, nnx.Param), "w.")[key + ".kernel"]
    assert not np.array_equal(np.asarray(teacher_k), ck[key + ".kernel"])


def test_init_from_bad_input_is_a_clear_error(finished_search, teacher_dir, tmp_path):
    from nasq.config import build_config
    from nasq.contract.model_dir import load_model_dir
    from nasq.contract.plan import Plan
    from nasq.search.restore import inherit_search_weights

    run, plan_path = finished_search
    with pytest.raises(NasqError, match="needs a plan"):
        build_config(("test", {"init_from": str(run)}))
    teacher, _ = load_model_dir(teacher_dir)
    plan = Plan.load(plan_path)
    with pytest.raises(NasqError, match="not a nasq search run"):
        inherit_search_weights(tmp_path / "nothing", plan, teacher)
    with pytest.raises(NasqError, match="finetune run, not a search run"):
        inherit_search_weights(teacher_dir, plan, teacher)
    import dataclasses

    from nasq.contract.plan import make_plan
    from nasq.contract.search_result import SearchResult
    from nasq.contract.space import SpaceInfo

    tensors = list(SearchResult.load(run)[0].tensors)  # a plan over another space: {1, 2, 4, 8}, no pruning
    other = [dataclasses.replace(t, choices=(1, 2, 4, 8)) for t in tensors]
    odd = make_plan(other, [(1,) * t.num_groups for t in other], space=SpaceInfo(name="other", source="test"),
                    budget=None, param_shapes=None, provenance={"method": "test"})
    with pytest.raises(NasqError, match=r"uses \[1\] bits, which search run .* did not train"):
        inherit_search_weights(run, odd, teacher)
    unfinished = tmp_path / "unfinished"
    import shutil

    shutil.copytree(run, unfinished)
    info = json.loads((unfinished / "run.json").read_text())
    (unfinished / "run.json").write_text(json.dumps({**info, "status": "running"}))
    with pytest.raises(NasqError, match="is not finished"):
        inherit_search_weights(unfinished, plan, teacher)
    (unfinished / "run.json").write_text("{not json")
    with pytest.raises(NasqError, match="cannot read .*run.json"):
        inherit_search_weights(unfinished, plan, teacher)


@pytest.mark.slow  # a script over a finished search
def test_discretization_gap_script(finished_search, teacher_dir, glue_dir, tmp_path, capsys):
    """experiments/discretization_gap.py: every number is a dev metric of the right network; bad input: exit 2."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gap", REPO / "experiments" / "discretization_gap.py")
    gap = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gap)
    run, plan_path = finished_search
    assert gap.main([str(run), str(plan_path), "--data-dir", str(glue_dir), "--tau", "0.05"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["teacher_run"] == str(teacher_dir) and out["task"] == "sst2"
    assert set(out["supernet"]) == {"tau=0.2", "tau=0.05"}
    g = out["gates"]
    assert g["tau"] == 0.2 and 0.0 <= g["share_prune_prob_0.1_to_0.9"] <= g["share_max_prob_below_0.9"] <= 1.0
    assert gap.main([str(run), str(plan_path), "--data-dir", str(glue_dir), "--gates-only"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"search_run", "plan", "task", "teacher_run", "gates"}
    for r in [out["teacher"], out["plan_on_teacher"], out["child_of_search_weights"], *out["supernet"].values()]:
        assert 0.0 <= r["accuracy"] <= 1.0
    assert gap.main([str(run), str(tmp_path / "none.json"), "--data-dir", str(glue_dir)]) == 2
    assert "discretization_gap: error: plan" in capsys.readouterr().err
    assert gap.main([str(tmp_path), str(plan_path), "--data-dir", str(glue_dir)]) == 2
    assert "is not a nasq search run" in capsys.readouterr().err


def test_damage_prior_pushes_the_gates_off_measured_damage(tiny_model_dir, glue_dir, tmp_path):
    """search.damage_prior: the gate loss adds damage_weight * sum p_{g,c} d_{g,c} (logged as gate_damage), so a
    width whose measured damage is large loses probability against the same search without the prior; a plan
    without measured damages is a clear error before the run directory exists."""
    from nasq.contract.plan import make_plan
    from nasq.search.loop import load_damage_prior, make_problem

    base = _cfg(tiny_model_dir, glue_dir, avg_bits=3.0)
    model, _, _ = load_pretrained(tiny_model_dir, 2)
    problem = make_problem(base, model)
    tensors = problem.tensors
    worst = {t.path: min(c for c in t.choices if c > 0) for t in tensors}  # the narrowest non-pruned width
    damage = {t.path: {str(c): (5000.0 if c == worst[t.path] else 0.0) for c in t.choices} for t in tensors}
    space = load_space("tiny")
    bits = [[max(t.choices)] * t.num_groups for t in tensors]
    plan_path = make_plan(tensors, bits, space=space, budget=None, param_shapes=None,
                          provenance={"method": "measured", "damage_kl_x1000": damage}).save(tmp_path / "m.json")
    d = load_damage_prior(str(plan_path), tensors, "symmetric")
    assert [x.shape for x in d] == [(t.num_groups, len(t.choices)) for t in tensors]
    t0 = tensors[0]  # a tensor's groups share its damage (5 nats at the narrowest width) in proportion to rows
    np.testing.assert_allclose(d[0].sum(0)[t0.choices.index(worst[t0.path])], 5.0)

    def run(name, **search_kw):
        raw = base.model_dump(mode="json")
        raw["train"].update(max_steps=6, log_every=1)
        raw["search"].update(search_kw)
        out = search(build_config(("test", raw)), tmp_path / name, log=lambda *a: None)
        alphas = load_file(str(out / "alphas.safetensors"))
        p_worst = np.mean([jax.nn.softmax(jnp.asarray(alphas[t.path]), -1)[:, t.choices.index(worst[t.path])].mean()
                           for t in tensors])
        return out, float(p_worst)

    plain, p_plain = run("plain")
    prior, p_prior = run("prior", damage_prior=str(plan_path), damage_weight=2.0)
    recs = [json.loads(x) for x in (prior / "metrics.jsonl").read_text().splitlines()]
    assert all(r["gate_damage"] >= 0 for r in recs)
    assert recs[-1]["gate_damage"] < recs[0]["gate_damage"]
    assert all("gate_damage" not in json.loads(x) for x in (plain / "metrics.jsonl").read_text().splitlines())
    assert p_prior < p_plain

    nasq_plan = make_plan(tensors, bits, space=space, budget=None, param_shapes=None,
                          provenance={"method": "nasq-search"}).save(tmp_path / "n.json")
    raw = base.model_dump(mode="json")
    raw["search"]["damage_prior"] = str(nasq_plan)
    with pytest.raises(NasqError, match="not a measured plan"):
        search(build_config(("test", raw)), tmp_path / "bad", log=lambda *a: None)
    assert not (tmp_path / "bad").exists()
