import dataclasses
import json
from pathlib import Path

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

import nasq.cli
from nasq.baselines.allocators import (
    baseline_budget,
    baseline_latency,
    baseline_plan,
    baseline_tensors,
    default_batches,
    group_magnitudes,
    magnitude_allocation,
    random_allocation,
    resolve_recipe,
    rule_allocation,
    uniform_allocation,
)
from nasq.baselines.hessian import (
    gauss_newton_diagonal,
    group_traces,
    hessian_utilities,
    hutchinson_diagonal,
    quant_perturbations,
    recorded_weighted_errors,
    tensor_weights,
)
from nasq.config import build_config
from nasq.contract.cost import Budget, plan_size_bytes, resolve_budget, size_tables
from nasq.contract.plan import Plan
from nasq.contract.space import SearchedTensor, group_sizes
from nasq.errors import NasqError
from nasq.models.loading import load_pretrained
from nasq.quant.packing import group_nbytes
from nasq.search.finalize import allocate, choices_to_bits


def _cfg(model_dir, glue=None, **search):
    layers = {"model": {"name": str(model_dir), "max_len": 32}, "train": {"batch_size": 8, "seed": 0},
              "search": {"space": "tiny", **search}}
    if glue is not None:
        layers["data"] = {"task": "mrpc", "data_dir": str(glue), "train_subset": 32, "buckets": [16, 32]}
    return build_config(("test", layers))


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_pretrained(tiny_model_dir, 2)[0]


@pytest.fixture(scope="module")
def tensors(model, tiny_model_dir):
    return baseline_tensors(_cfg(tiny_model_dir), model)[1]


@pytest.fixture(scope="module")
def task_data(glue_dir, tiny_model_dir):
    from nasq.data.tasks import load_task_data

    return load_task_data(_cfg(tiny_model_dir, glue_dir))


def _t(path, rows, cols, g, choices=(0, 2, 4, 8)):
    return SearchedTensor(path=path, rule="r", rows=rows, cols=cols, group_sizes=group_sizes(rows, g),
                          choices=tuple(choices), has_bias=True, kind="linear")


# ------------------------------------------------------------------------------------------------ Hutchinson


def test_hutchinson_exact_for_diagonal_hessian_and_batch_mean():
    # diagonal H: v * Hv = diag(H) exactly for every Rademacher v; batches are averaged
    d = jnp.arange(1.0, 7.0)

    def loss(p, c):
        return 0.5 * c * jnp.sum(d * p["x"] ** 2)

    out = hutchinson_diagonal(loss, {"x": jnp.ones(6)}, [jnp.float32(1.0), jnp.float32(3.0)],
                              jax.random.PRNGKey(0), 1)
    np.testing.assert_allclose(out["x"], 2.0 * np.arange(1.0, 7.0), rtol=1e-6)


def test_hutchinson_block_traces_match_exact_quadratic():
    rng = np.random.default_rng(0)
    n = 22
    m = rng.normal(size=(n, n))
    h = np.diag(rng.uniform(1, 5, n)) + 0.1 * (m + m.T)  # a known, non-diagonal Hessian
    hj = jnp.asarray(h, jnp.float32)

    def loss(p, _):
        x = jnp.concatenate([p["a"], p["b"].ravel()])
        return 0.5 * x @ hj @ x

    params = {"a": jnp.zeros(10), "b": jnp.zeros((3, 4))}
    out = hutchinson_diagonal(loss, params, [None], jax.random.PRNGKey(1), 300)
    assert out["b"].shape == (3, 4)
    est_a, est_b = float(out["a"].sum()), float(out["b"].sum())
    exact_a, exact_b = np.trace(h[:10, :10]), np.trace(h[10:, 10:])
    assert est_a == pytest.approx(exact_a, rel=0.05)
    assert est_b == pytest.approx(exact_b, rel=0.05)
    assert est_a + est_b == pytest.approx(np.trace(h), rel=0.05)


def test_hutchinson_rejects_bad_arguments():
    with pytest.raises(NasqError, match="n_probes"):
        hutchinson_diagonal(lambda p, b: jnp.sum(p), jnp.ones(2), [None], jax.random.PRNGKey(0), 0)
    with pytest.raises(NasqError, match="batch"):
        hutchinson_diagonal(lambda p, b: jnp.sum(p), jnp.ones(2), [], jax.random.PRNGKey(0), 1)


def test_gauss_newton_diagonal_is_the_hessian_of_a_linear_softmax_model():
    """For logits linear in the weights the cross-entropy's Hessian *is* its Gauss-Newton matrix, so the exact GN
    diagonal (per-example Jacobians, weighted by softmax; padding rows of weight 0 ignored) equals jax.hessian's
    diagonal of the weighted mean loss; for squared error (f - y)^2 with f linear, 2 x^2 averaged."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 3, 6))
    w = np.array([1, 1, 1, 1, 1, 0], np.float32)
    params = {"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32), "b": jnp.zeros(3)}

    def mean_loss(p):
        logits = x @ p["w"] + p["b"]
        per = -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1)[:, 0]
        return (per * w).sum() / w.sum()

    def out(p, ctx, xi):
        logits = xi @ p["w"] * ctx + p["b"]
        return jax.nn.log_softmax(logits), jax.nn.softmax(logits)

    flat, unravel = jax.flatten_util.ravel_pytree(params)
    exact = unravel(jnp.diag(jax.hessian(lambda f: mean_loss(unravel(f)))(flat)))
    got = gauss_newton_diagonal(out, params, [(x[:4], w[:4]), (x[4:], w[4:])], context=jnp.float32(1.0))
    for k in params:
        np.testing.assert_allclose(got[k], exact[k], rtol=1e-4, atol=1e-6)
    assert all((np.asarray(v) >= 0).all() for v in got.values())

    v = jnp.asarray(rng.normal(size=4), jnp.float32)
    sq = gauss_newton_diagonal(lambda p, _, xi: ((xi @ p)[None], jnp.full((1,), 2.0)), v, [(x, w)])
    np.testing.assert_allclose(sq, 2 * (np.asarray(x) ** 2 * w[:, None]).sum(0) / w.sum(), rtol=1e-5)
    with pytest.raises(NasqError, match="at least one example"):
        gauss_newton_diagonal(out, params, [])
    with pytest.raises(NasqError, match="positive weight"):
        gauss_newton_diagonal(out, params, [(x[5:], w[5:])], context=jnp.float32(1.0))


# ------------------------------------------------------------------------------------------------ uniform


@pytest.mark.parametrize("b", [2, 4, 8])
def test_uniform_size_equals_avg_bits_budget(tensors, b):
    bits = uniform_allocation(tensors, b)
    assert all(set(x) == {b} for x in bits)
    assert plan_size_bytes(tensors, bits) == resolve_budget(tensors, avg_bits=b).bytes


def test_uniform_bits_must_be_a_choice(tensors):
    with pytest.raises(NasqError, match=r"tensor encoder\.layer\.0\..*\[0, 2, 4, 8\]"):
        uniform_allocation(tensors, 3)
    t3 = [_t("encoder.a", 8, 16, 2, (0, 3, 4)), _t("encoder.b", 4, 8, 4, (3,))]
    assert uniform_allocation(t3, 3) == [(3, 3), (3, 3, 3, 3)]


def test_rule_puts_each_rule_at_its_width(tensors):
    rules = sorted({t.rule for t in tensors})
    assert rules == ["attention", "ffn"]
    bits = rule_allocation(tensors, 2, {"attention": 4})
    assert all(set(b) == {4 if t.rule == "attention" else 2} for t, b in zip(tensors, bits))
    size = plan_size_bytes(tensors, bits)
    assert plan_size_bytes(tensors, uniform_allocation(tensors, 2)) < size < plan_size_bytes(
        tensors, uniform_allocation(tensors, 4))
    assert rule_allocation(tensors, 4, {"attention": 4, "ffn": 4}) == uniform_allocation(tensors, 4)
    with pytest.raises(NasqError, match=r"no rule 'mlp'.*\['attention', 'ffn'\]"):
        rule_allocation(tensors, 2, {"mlp": 4})
    with pytest.raises(NasqError, match=r"rule 'attention'.*\[0, 2, 4, 8\].*not 3"):
        rule_allocation(tensors, 2, {"attention": 3})


# ------------------------------------------------------------------------------------------------ random


def test_random_is_seed_deterministic_and_spends_the_budget(tensors):
    budget = resolve_budget(tensors, avg_bits=3).bytes
    a = random_allocation(tensors, budget, seed=1)
    assert a == random_allocation(tensors, budget, seed=1)
    assert a != random_allocation(tensors, budget, seed=2)
    size = plan_size_bytes(tensors, a)
    assert size <= budget
    # increasing utilities: at the optimum no single group can move to a larger choice within the budget
    for t, bits in zip(tensors, a):
        for r, b in zip(t.group_sizes, bits):
            bigger = [c for c in t.choices if c > b]
            if bigger:
                extra = group_nbytes(r, t.cols, bigger[0], t.has_bias) - group_nbytes(r, t.cols, b, t.has_bias)
                assert size + extra > budget


def test_random_does_not_favour_small_groups():
    """One tensor in 2 big groups, one of the same size in 64 small ones, budget = half the 8-bit bytes: over
    seeds, both tensors get about the same share of bits (before the n_g factor the big groups were pruned)."""
    big = SearchedTensor(path="big", rule="r", rows=128, cols=64, group_sizes=group_sizes(128, 2),
                         choices=(0, 2, 4, 8), has_bias=False, kind="linear")
    small = SearchedTensor(path="small", rule="r", rows=128, cols=64, group_sizes=group_sizes(128, 64),
                           choices=(0, 2, 4, 8), has_bias=False, kind="linear")
    budget = resolve_budget([big, small], avg_bits=4).bytes
    share = []
    for seed in range(40):
        bits = random_allocation([big, small], budget, seed=seed)
        b, s = (sum(r * x for r, x in zip(t.group_sizes, bb)) for t, bb in zip((big, small), bits))
        share.append(b / (b + s))
    assert 0.35 < np.mean(share) < 0.65, np.mean(share)


# ------------------------------------------------------------------------------------------------ magnitude


def test_magnitude_prunes_smallest_groups_first(model, tensors):
    from nasq.models.surgery import iter_named

    m = nnx_clone(model)
    mods = dict(iter_named(m.bert))
    k = mods["encoder.layer.1.intermediate.dense"].kernel  # (in, out): rows are columns here
    k[...] = k[...].at[:, 16:32].multiply(0.01)  # group 1 of 4 (64 rows) becomes tiny
    mags = group_magnitudes(m, tensors)
    idx = [t.path for t in tensors].index("encoder.layer.1.intermediate.dense")
    assert mags[idx][1] == pytest.approx(min(float(x.min()) for x in mags))

    uni = uniform_allocation(tensors, 8)
    full = plan_size_bytes(tensors, uni)
    assert magnitude_allocation(m, tensors, full, 8) == uni  # fits: nothing pruned
    out = magnitude_allocation(m, tensors, full - 1, 8)
    assert out[idx][1] == 0 and sum(b.count(0) for b in out) == 1
    budget = resolve_budget(tensors, avg_bits=4).bytes
    out = magnitude_allocation(m, tensors, budget, 8)
    assert plan_size_bytes(tensors, out) <= budget
    flat_m = np.concatenate(mags)
    flat_b = np.concatenate([np.asarray(b) for b in out])
    assert set(np.unique(flat_b)) == {0, 8}
    assert flat_m[flat_b == 0].max() <= flat_m[flat_b == 8].min()  # pruned = the smallest magnitudes


def test_magnitude_infeasible_budget_names_the_numbers(model):
    t = [_t("encoder.layer.0.attention.self.query", 32, 32, 4, (2, 8))]  # no 0: cannot prune
    with pytest.raises(NasqError, match="prunable"):
        magnitude_allocation(model, t, 10, 8)
    # under a latency budget (costs in whole ns): the same error in ms
    n = t[0].num_groups
    costs = [np.full((n, 2), 1_000_000, dtype=np.int64)]  # every group 1 ms at either width
    with pytest.raises(NasqError, match=rf"prunable.*{n}\.0000 ms of searched linears.*budget, {n - 1}\.5000 ms"):
        magnitude_allocation(model, t, (n - 1) * 1_000_000 + 500_000, 8, costs=costs)


def nnx_clone(model):
    from flax import nnx

    return nnx.clone(model)


# ------------------------------------------------------------------------------------------------ hessian


def test_larger_curvature_times_perturbation_gets_more_bits():
    ts = [_t("encoder.a", 8, 16, 4)]
    tabs = size_tables(ts)
    budget = int(tabs[0][:, 2].sum() + tabs[0][0, 3] - tabs[0][0, 2])  # room for exactly one group at 8 bits
    pert = np.tile(np.array([[10.0, 1.0, 0.1, 0.001]]), (4, 1))
    for traces, perts, winner in [
        ([np.array([1.0, 1.0, 50.0, 1.0])], [pert], 2),  # curvature decides
        ([np.ones(4)], [pert * np.array([[1.0], [30.0], [1.0], [1.0]])], 1),  # perturbation decides
    ]:
        u, clamped = hessian_utilities(traces, perts)
        assert clamped == 0 and np.abs(np.concatenate(u)).max() == pytest.approx(1.0)
        bits = choices_to_bits(ts, allocate(u, tabs, budget).choices)[0]
        assert bits[winner] == 8 and all(b == 4 for g, b in enumerate(bits) if g != winner)


def test_nonpositive_traces_are_clamped():
    u, clamped = hessian_utilities([np.array([2.0, -1.0, 0.0])], [np.ones((3, 2))])
    assert clamped == 2
    assert np.all(u[0] < 0)  # still prefers the smaller perturbation


def test_hessian_noise_warning():
    """More than a fifth of the groups clamped: a warning naming the count and what to do, by granularity; none
    for other plans or few clamped groups."""
    from nasq.baselines.allocators import hessian_noise_warning

    prov = {"clamped_groups": 2271, "groups": 4608, "n_batches": 8, "n_probes": 4, "granularity": "group"}
    line = hessian_noise_warning(prov)
    assert line.startswith("warning: 2,271 of 4,608 row groups") and "8 batches x 4 probes" in line
    assert "--granularity tensor" in line
    assert "indefinite" in hessian_noise_warning({**prov, "granularity": "tensor"})
    assert hessian_noise_warning({**prov, "clamped_groups": 900}) is None  # under a fifth
    assert hessian_noise_warning({"method": "measured"}) is None and hessian_noise_warning({"groups": 0}) is None
    assert hessian_noise_warning({**prov, "curvature": "fisher"}) is None  # exact and >= 0: near 0 is real
    assert "--curvature fisher" in hessian_noise_warning({**prov, "granularity": "tensor"})


def test_pooled_traces_score_every_group_with_its_tensors_trace():
    """granularity=tensor: Tr(H_t)/n_t = sum_g Tr(H_g) / sum_g n_g, i.e. the group traces per weight averaged by
    rows (every group has the tensor's columns), for every group of the tensor."""
    from nasq.baselines.hessian import pooled_traces

    ts = [_t("encoder.a", 8, 16, 4), _t("encoder.b", 4, 16, 4)]
    ts[0] = dataclasses.replace(ts[0], group_sizes=(1, 1, 2, 4))
    out = pooled_traces([np.array([8.0, 0.0, 1.0, 2.0]), np.array([3.0, 3.0, -3.0, 1.0])], ts)
    assert np.allclose(out[0], (8 * 1 + 0 * 1 + 1 * 2 + 2 * 4) / 8) and out[0].shape == (4,)
    assert np.allclose(out[1], 1.0)


def test_tensor_granularity_moves_whole_tensors():
    """Per-group traces that disagree inside a tensor split it; pooled per tensor, the tensor of larger
    curvature keeps its bits and the other gives them up (equal perturbations)."""
    from nasq.baselines.hessian import pooled_traces

    ts = [_t("encoder.a", 8, 16, 4, choices=(2, 4)), _t("encoder.b", 8, 16, 4, choices=(2, 4))]
    tabs = size_tables(ts)
    budget = int(tabs[0][:, 1].sum() + tabs[1][:, 0].sum())  # room for half the groups at 4 bits
    perts = [np.tile(np.array([[1.0, 0.1]]), (4, 1))] * 2
    traces = [np.array([9.0, 0.1, 9.0, 0.1]), np.array([1.0, 1.0, 1.0, 1.0])]  # a: 4.55 per weight > b: 1
    split = choices_to_bits(ts, allocate(hessian_utilities(traces, perts)[0], tabs, budget).choices)
    assert split[0] == (4, 2, 4, 2)  # a's noisy-looking groups split it
    whole = choices_to_bits(ts, allocate(hessian_utilities(pooled_traces(traces, ts), perts)[0], tabs,
                                         budget).choices)
    assert whole == [(4, 4, 4, 4), (2, 2, 2, 2)]


def test_quant_perturbations(model, tensors):
    perts = quant_perturbations(model, tensors, "symmetric")
    (w, b), t = tensor_weights(model, tensors)[0], tensors[0]
    assert perts[0].shape == (t.num_groups, len(t.choices))
    g0 = t.group_sizes[0]
    assert perts[0][0, 0] == pytest.approx(float((w[:g0] ** 2).sum() + (b[:g0] ** 2).sum()), rel=1e-5)
    for p in perts:  # pruned > 2 bits > 4 bits > 8 bits
        assert np.all(np.diff(p, axis=1) < 0)


def test_group_traces_on_tiny_model(model, tensors, task_data):
    from nasq.baselines.hessian import _train_batches

    batches = _train_batches(task_data, 1, 8, 0)
    tr = group_traces(model, batches, tensors, is_regression=False, n_probes=1, seed=0)
    assert [x.shape for x in tr] == [(t.num_groups,) for t in tensors]
    assert all(np.isfinite(x).all() for x in tr)
    assert any(np.abs(x).max() > 0 for x in tr)
    gn = group_traces(model, batches, tensors, is_regression=False, n_probes=1, seed=0, curvature="fisher")
    assert [x.shape for x in gn] == [(t.num_groups,) for t in tensors]
    assert all(np.isfinite(x).all() and (x >= 0).all() for x in gn) and any(x.max() > 0 for x in gn)
    again = group_traces(model, batches, tensors, is_regression=True, n_probes=7, seed=3, curvature="fisher")
    assert all(np.isfinite(x).all() and (x >= 0).all() for x in again)  # squared error's GN: J^T J
    with pytest.raises(NasqError, match="curvature must be one of hutchinson, fisher"):
        group_traces(model, batches, tensors, is_regression=False, n_probes=1, seed=0, curvature="exact")


def test_weighted_perturbations_pair_each_weights_curvature_with_its_error(model, tensors):
    """granularity "weight": sum_i d_i * (w_i - Q_c(w_i))^2 over the group, pruned biases weighted by their row's
    mean d; a constant d is that constant times the unweighted perturbations."""
    from nasq.baselines.hessian import quantized_rows, weighted_perturbations

    rng = np.random.default_rng(0)
    diags = [rng.uniform(0.0, 2.0, (t.rows, t.cols)) for t in tensors]
    perts = weighted_perturbations(model, tensors, "symmetric", diags)
    (w, b), t, d = tensor_weights(model, tensors)[0], tensors[0], diags[0]
    g0 = t.group_sizes[0]
    for k, c in enumerate(t.choices):
        q, qb = quantized_rows(t, w, b, int(c), "symmetric")
        want = (d[:g0] * (w[:g0] - q[:g0]) ** 2).sum() + (d[:g0].mean(1) * (b[:g0] - qb[:g0]) ** 2).sum()
        assert perts[0][0, k] == pytest.approx(float(want), rel=1e-6)
    flat = weighted_perturbations(model, tensors, "symmetric", [np.full((t.rows, t.cols), 3.0) for t in tensors])
    for a, p in zip(flat, quant_perturbations(model, tensors, "symmetric"), strict=True):
        assert np.allclose(a, 3.0 * p)
    with pytest.raises(NasqError, match="curvature diagonal"):
        weighted_perturbations(model, tensors[:1], "symmetric", [np.ones((1, 1))])


def test_weight_granularity_allocation(model, tensors, task_data):
    """The per-weight curvatures sum to the group traces; the per-weight allocation runs end to end within its
    budget, and only with the Fisher curvature."""
    from nasq.baselines.hessian import _train_batches, hessian_allocation, weight_curvatures

    batches = _train_batches(task_data, 1, 8, 0)
    diags = weight_curvatures(model, batches, tensors, is_regression=False, n_probes=1, seed=0, curvature="fisher")
    assert [d.shape for d in diags] == [(t.rows, t.cols) for t in tensors]
    assert np.allclose(np.concatenate(group_traces(model, batches, tensors, is_regression=False, n_probes=1, seed=0,
                                                   curvature="fisher")),
                       np.concatenate(group_traces(None, None, tensors, is_regression=False, n_probes=0, seed=0,
                                                   diagonals=diags)))
    budget = int(sum(tab[:, 1:].min(axis=1).sum() for tab in size_tables(tensors)) * 1.3)
    info = {}
    bits = hessian_allocation(model, task_data, tensors, budget, n_batches=1, batch_size=8, curvature="fisher",
                              granularity="weight", info=info)
    assert [len(b) for b in bits] == [t.num_groups for t in tensors] and info["granularity"] == "weight"
    assert info["clamped_groups"] == 0
    used = sum(int(tab[g, list(t.choices).index(c)]) for t, tab, bb in zip(tensors, size_tables(tensors), bits)
               for g, c in enumerate(bb))
    assert used <= budget
    with pytest.raises(NasqError, match="granularity 'weight' .* use curvature 'fisher'"):
        hessian_allocation(model, task_data, tensors, budget, n_batches=1, batch_size=8, granularity="weight")


def test_shrinkage_blends_per_weight_and_per_tensor(model, tensors, task_data):
    """shrinkage s: each weight's curvature shrunk toward its tensor's mean, so s = 0 is the per-weight plan and
    s = 1 the per-tensor plan of the same rows; a blend in between solves a blended damage (a bigger s moves it
    toward the per-tensor plan's choices); re-solved from the recorded (unshrunk) errors and traces at the same s it
    is the same plan; s outside [0, 1], not a number, or without granularity 'weight' is refused."""
    from nasq.baselines.hessian import hessian_allocation

    # tight enough that the plans differ: 1.15 x the narrowest widths' bytes
    budget = int(sum(tab[:, 1:].min(axis=1).sum() for tab in size_tables(tensors)) * 1.15)
    kw = {"n_batches": 2, "batch_size": 8, "curvature": "fisher"}

    def plan(granularity, s=0.0, **extra):
        info = {}
        bits = hessian_allocation(model, task_data, tensors, budget, granularity=granularity, shrinkage=s,
                                  info=info, **kw, **extra)
        return np.concatenate(bits), info

    per_weight, w_info = plan("weight")
    per_tensor, _ = plan("tensor")
    assert (per_weight != per_tensor).any(), "the test needs plans that differ"
    assert (plan("weight", 0.0)[0] == per_weight).all()
    assert (plan("weight", 1.0)[0] == per_tensor).all()
    half, h_info = plan("weight", 0.5)
    assert h_info["shrinkage"] == 0.5 and "shrinkage" not in w_info
    assert h_info["weighted_errors"] == w_info["weighted_errors"]  # the unshrunk errors are recorded
    errors = [np.asarray(h_info["weighted_errors"][t.path]) for t in tensors]
    traces = [np.full(t.num_groups, h_info["tensor_trace_per_weight"][t.path]) for t in tensors]
    again = hessian_allocation(model, None, tensors, budget, granularity="weight", shrinkage=0.5, traces=traces,
                               weighted_errors=errors, curvature="fisher")
    assert (np.concatenate(again) == half).all()
    for bad, message in ((1.5, "in \\[0, 1\\]"), (-0.1, "in \\[0, 1\\]"), (float("nan"), "a number"),
                         ("0.5", "a number")):
        with pytest.raises(NasqError, match=message):
            plan("weight", bad)
    with pytest.raises(NasqError, match="needs --granularity weight"):
        plan("tensor", 0.5)


# ------------------------------------------------------------------------------------------------ measured


def test_kl_rows():
    from nasq.baselines.measured import kl_rows

    p = np.array([[0.0, 1.0, -1.0], [2.0, 0.0, 0.0]])
    assert np.allclose(kl_rows(p, p), 0.0) and np.allclose(kl_rows(p, p + 5.0), 0.0)  # shift-invariant
    q = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 2.0]])
    sp, sq = np.exp(p) / np.exp(p).sum(1, keepdims=True), np.exp(q) / np.exp(q).sum(1, keepdims=True)
    assert np.allclose(kl_rows(p, q), (sp * np.log(sp / sq)).sum(1)) and np.all(kl_rows(p, q) > 0)


def test_tensor_damage_is_the_kl_of_the_model_with_that_tensor_quantized(model, tensors, task_data):
    """Each D_t(c) equals the KL measured on a copy of the model whose module t holds the quantized rows (the
    kernel / bias swap inside tensor_damage puts them where the model reads them)."""
    from flax import nnx

    from nasq.baselines.hessian import _train_batches, quantized_rows
    from nasq.baselines.measured import kl_rows, tensor_damage
    from nasq.models.surgery import iter_named

    batches = _train_batches(task_data, 2, 8, 0)
    calls = []
    damage = tensor_damage(model, batches, tensors, "symmetric", progress=lambda d, n: calls.append((d, n)))
    total = sum(len(t.choices) for t in tensors)
    assert calls[-1] == (total, total) and len(calls) == total
    assert [d.shape for d in damage] == [(len(t.choices),) for t in tensors]
    assert all(np.all(d >= -1e-9) for d in damage)
    for t, d in zip(tensors, damage):  # 8 bits is close to fp32; removing every row is not
        assert d[t.choices.index(8)] < d[t.choices.index(0)]

    def logits(m):
        return [np.asarray(m(b.input_ids, b.token_type_ids, b.attention_mask)) for b in batches]

    base = logits(model)
    n = sum(float(b.weights.sum()) for b in batches)
    for ti in (0, len(tensors) - 1):
        t = tensors[ti]
        (w, b), = tensor_weights(model, [t])
        c = 2 if 2 in t.choices else t.choices[1]
        wq, _ = quantized_rows(t, w, b, c, "symmetric")
        m2 = nnx.clone(model)
        mod = dict(iter_named(m2.bert))[t.path]
        mod.kernel[...] = jnp.asarray(wq.T)
        want = sum(float((kl_rows(p, q) * bt.weights).sum()) for p, q, bt in zip(base, logits(m2), batches)) / n
        assert damage[ti][t.choices.index(c)] == pytest.approx(want, rel=1e-4, abs=1e-9)


def test_damage_from_plan_checks_the_untrusted_file(tensors):
    from nasq.baselines.measured import damage_from_plan

    good = {t.path: {str(c): 1.0 + c for c in t.choices} for t in tensors}
    got = damage_from_plan({"method": "measured", "damage_kl_x1000": good}, tensors, "p.json")
    assert [d.tolist() for d in got] == [[(1.0 + c) / 1000 for c in t.choices] for t in tensors]
    t0 = tensors[0].path
    c0 = str(tensors[0].choices[0])
    for prov, msg in [({"method": "hessian"}, "not a measured plan"),
                      ({"method": "measured", "damage_kl_x1000": []}, "not a measured plan"),
                      ({"method": "measured", "damage_kl_x1000": {}}, f"no measured damage for tensor {t0}"),
                      ({"method": "measured", "damage_kl_x1000": {**good, t0: {**good[t0], c0: -1.0}}}, r"in \[0, "),
                      ({"method": "measured", "damage_kl_x1000": {**good, t0: {**good[t0], c0: "x"}}}, "finite"),
                      ({"method": "measured", "damage_kl_x1000": {**good, t0: {**good[t0], c0: float("nan")}}},
                       "finite"),
                      ({"method": "measured", "damage_kl_x1000": {**good, t0: {c0: 1.0}}}, "every width of this one"),
                      # integers beyond float64 (json reads them exactly) and absurd finite values: clear errors
                      ({"method": "measured", "damage_kl_x1000": {**good, t0: {**good[t0], c0: 10**400}}}, "finite"),
                      ({"method": "measured", "damage_kl_x1000": {**good, t0: {**good[t0], c0: 2**64}}}, "finite"),
                      ({"method": "measured", "damage_kl_x1000": {**good, t0: {**good[t0], c0: 1e308}}}, "finite")]:
        with pytest.raises(NasqError, match=msg):
            damage_from_plan(prov, tensors, "p.json")
    # a KL rounded just below 0 (plans measured before damages were clamped at 0) reads as 0
    got = damage_from_plan({"method": "measured", "damage_kl_x1000": {**good, t0: {**good[t0], c0: -2e-12}}},
                           tensors, "p.json")
    assert got[0][0] == 0.0


def test_tensor_damage_clamps_rounding_and_names_a_non_finite_kl(model, tensors, task_data, monkeypatch):
    """A KL is >= 0: a rounding just below 0 is recorded as 0 (so the plan's own loader accepts it); a NaN
    (overflowed outputs) is a NasqError naming the tensor and width, not a NaN in the plan."""
    from nasq.baselines import measured
    from nasq.baselines.hessian import _train_batches

    batches = _train_batches(task_data, 1, 8, 0, 0)
    one = [tensors[0]]
    monkeypatch.setattr(measured, "kl_rows", lambda p, q: np.full(p.shape[0], -1e-15))
    assert measured.tensor_damage(model, batches, one, "symmetric")[0].tolist() == [0.0] * len(one[0].choices)
    monkeypatch.setattr(measured, "kl_rows", lambda p, q: np.full(p.shape[0], np.nan))
    with pytest.raises(NasqError, match=rf"{one[0].path} at {one[0].choices[0]} bits is nan"):
        measured.tensor_damage(model, batches, one, "symmetric")


def test_one_measurement_serves_every_space_with_its_widths(cli, tiny_model_dir, glue_dir, tmp_path, capsys):
    """D_t(c) belongs to the tensor, the width, the quantizer and the row groups, not to the other widths of a
    space: damages measured in a space re-solve in any space of the same model, quantizer and groups whose widths
    are among the measured ones, and equal a fresh measurement there; another quantizer, other row groups,
    another model or an unmeasured width is refused."""
    tiny = (Path(__file__).parents[1] / "search_spaces" / "tiny.yaml").read_text()

    def space(name, text):
        (tmp_path / f"{name}.yaml").write_text(text.replace("name: tiny", f"name: {name}"))
        return str(tmp_path / f"{name}.yaml")

    sub = space("sub", tiny.replace("choices: [0, 2, 4, 8]", "choices: [2, 8]"))
    common = ["baseline", "measured", "--model", str(tiny_model_dir), "--task", "mrpc", "--avg-bits", "5"]
    measure = ["--data-dir", str(glue_dir), "--train-subset", "16", "--set", "train.batch_size=8",
               "--set", "model.max_len=32", "--n-batches", "1"]
    full, fresh, again = tmp_path / "full.json", tmp_path / "fresh.json", tmp_path / "again.json"
    assert cli([*common, "--space", "tiny", *measure, "--out", str(full)]) == 0
    assert cli([*common, "--space", sub, *measure, "--out", str(fresh)]) == 0
    assert cli([*common, "--space", sub, "--damage-from", str(full), "--out", str(again)]) == 0
    f, a = Plan.load(fresh), Plan.load(again)
    assert [t.bits for t in a.tensors] == [t.bits for t in f.tensors] and a.totals["within_budget"]
    measured = Plan.load(full).provenance["damage_kl_x1000"]
    for path, row in f.provenance["damage_kl_x1000"].items():
        assert set(row) == {"2", "8"}
        for c, v in row.items():
            assert v == pytest.approx(measured[path][c], rel=1e-5, abs=1e-9)
    for bad, msg in [(space("signed", tiny.replace("quant_mode: symmetric", "quant_mode: signed")), "quant_mode"),
                     (space("w3", tiny.replace("choices: [0, 2, 4, 8]", "choices: [2, 3, 8]")), "at 3 bits"),
                     (space("g2", tiny.replace("groups: 4", "groups: 2")), "row groups")]:
        assert cli([*common, "--space", bad, "--damage-from", str(full), "--out", str(tmp_path / "x.json")]) == 2
        assert msg in capsys.readouterr().err and not (tmp_path / "x.json").exists()
    from nasq.contract.damage import check_measured_plan

    p = Plan.load(full)
    t0 = p.tensors[0].searched()
    check_measured_plan(p, [t0], "symmetric", "full.json")
    with pytest.raises(NasqError, match=f"full.json: tensor {t0.path} is .* in this model; give a measured plan of "
                                        "the same model"):
        check_measured_plan(p, [dataclasses.replace(t0, cols=t0.cols + 1)], "symmetric", "full.json")


def test_predicted_damage_and_the_uniform_reference(tensors):
    """The additive prediction sums each group's share of its tensor's damage at the group's width; the reference
    is the widest uniform width every tensor offers that fits the budget."""
    from nasq.baselines.allocators import predicted_line
    from nasq.baselines.measured import predicted_damage, uniform_reference
    from nasq.contract.cost import uniform_plan

    damage = [np.asarray([10.0 * (len(t.choices) - k) for k in range(len(t.choices))]) for t in tensors]
    widths = sorted({c for t in tensors for c in t.choices if c})
    for w in widths:  # a uniform plan's prediction: the damage at w of every tensor, once
        want = sum(float(d[t.choices.index(w)]) for t, d in zip(tensors, damage, strict=True))
        assert predicted_damage(tensors, damage, uniform_plan(tensors, w)) == pytest.approx(want)
    mixed = [tuple(t.choices[-1] if g == 0 else t.choices[1] for g in range(t.num_groups)) for t in tensors]
    want = sum(float(d[-1]) * t.group_sizes[0] / t.rows + float(d[1]) * (t.rows - t.group_sizes[0]) / t.rows
               for t, d in zip(tensors, damage, strict=True))
    assert predicted_damage(tensors, damage, mixed) == pytest.approx(want)
    sizes = {w: plan_size_bytes(tensors, uniform_plan(tensors, w)) for w in widths}
    assert uniform_reference(tensors, damage, sizes[widths[-1]])[0] == widths[-1]
    assert uniform_reference(tensors, damage, sizes[widths[-1]] - 1)[0] == widths[-2]
    assert uniform_reference(tensors, damage, sizes[widths[0]] - 1) is None
    line = predicted_line({"predicted_kl_x1000": {"plan": 50.0, "uniform": 200.0}, "predicted_uniform_bits": 2})
    assert "0.0500 nats" in line and "uniform 2-bit (widest that fits) 0.2000" in line and "removes 75%" in line
    assert predicted_line({}) is None and predicted_line({"predicted_kl_x1000": {"plan": 1.0}}).endswith("nats")
    # a provenance from a file: values that are not numbers (an overflow stored as null) print nothing, no crash
    assert predicted_line({"predicted_kl_x1000": {"plan": None, "uniform": 2.0}}) is None
    assert predicted_line({"predicted_kl_x1000": {"plan": 1.0, "uniform": None}}).endswith("nats")
    assert "did not prove this plan optimal" in predicted_line({"predicted_kl_x1000": {"plan": 1.0}, "optimal": False})


def test_pooled_damage_weights_each_plan_by_its_rows(tensors):
    """Damages measured on different rows pool into their row-weighted mean; a plan without a measured row count
    (e.g. one re-solved with --damage-from) cannot be pooled, nor can an empty list."""
    from nasq.contract.damage import pooled_damage

    def prov(scale, rows):
        return {"method": "measured", "rows": rows,
                "damage_kl_x1000": {t.path: {str(c): scale * (1.0 + c) for c in t.choices} for t in tensors}}

    got, rows = pooled_damage([(prov(1.0, 100), "a.json"), (prov(4.0, 300), "b.json")], tensors)
    assert rows == 400
    for t, d in zip(tensors, got, strict=True):
        np.testing.assert_allclose(d, [(0.25 * 1.0 + 0.75 * 4.0) * (1.0 + c) / 1000 for c in t.choices])
    for bad in (None, 0, 2.5, True):
        with pytest.raises(NasqError, match="b.json: its provenance has no measured row count"):
            pooled_damage([(prov(1.0, 100), "a.json"), (prov(1.0, bad), "b.json")], tensors)
    with pytest.raises(NasqError, match="at least one"):
        pooled_damage([], tensors)
    with pytest.raises(NasqError, match="b.json: its provenance has no measured row count"):  # no overflow
        pooled_damage([(prov(1.0, 100), "a.json"), (prov(1.0, 10**400), "b.json")], tensors)


def test_measured_utilities_give_bits_where_damage_is_measured():
    from nasq.baselines.measured import measured_utilities

    ts = [_t("encoder.a", 8, 16, 4), _t("encoder.b", 8, 16, 4)]
    tabs = size_tables(ts)
    budget = int(sum(t[:, 2].sum() for t in tabs) + 4 * (tabs[0][0, 3] - tabs[0][0, 2]))  # 4 groups at 8 bits
    u = measured_utilities(ts, [np.array([9.0, 3.0, 1.0, 0.0]), np.array([9.0, 3.0, 0.2, 0.0])])
    assert np.abs(np.concatenate(u)).max() == pytest.approx(1.0)
    assert u[0].shape == (4, 4) and np.allclose(u[0][0], u[0][1])  # a tensor's damage is shared by its rows
    bits = choices_to_bits(ts, allocate(u, tabs, budget).choices)
    assert bits == [(8, 8, 8, 8), (4, 4, 4, 4)]  # a: 4 -> 8 saves 1.0, b only 0.2


def test_plan_rows_put_each_group_at_its_width(model, tensors):
    from nasq.baselines.hessian import quantized_rows
    from nasq.baselines.measured import plan_rows

    t = next(t for t in tensors if t.num_groups > 1 and t.has_bias)
    (w, b), = tensor_weights(model, [t])
    bits = [t.choices[g % len(t.choices)] for g in range(t.num_groups)]
    wq, bq = plan_rows(t, w, b, bits, "symmetric")
    for g, (lo, hi) in enumerate(zip(t.row_offsets[:-1], t.row_offsets[1:])):
        qw, qb = quantized_rows(t, w, b, bits[g], "symmetric")
        np.testing.assert_array_equal(wq[lo:hi], qw[lo:hi])
        np.testing.assert_array_equal(bq[lo:hi], qb[lo:hi])  # pruned groups lose their bias, kept ones keep it


def test_refined_damage_is_measured_around_the_plan(model, tensors, task_data):
    """D_t(c | P): the KL of the model with every tensor at plan P's widths and t at c (not the fp32-based D_t(c));
    the plan of least joint KL is the one refinement keeps; bad arguments are clear errors."""
    from nasq.baselines.hessian import _train_batches
    from nasq.baselines.measured import _Probe, measured_allocation, plan_rows, tensor_damage
    from nasq.contract.cost import plan_size_bytes

    batches = _train_batches(task_data, 2, 8, 0)
    probe = _Probe(model, batches, tensors, "symmetric")
    plan = [tuple(t.choices[-1] if i % 2 else t.choices[1] for _ in range(t.num_groups))
            for i, t in enumerate(tensors)]
    cond = tensor_damage(model, batches, tensors, "symmetric", around=plan, probe=probe)
    ti = 1
    t = tensors[ti]
    flat = probe.at_plan(plan)
    (w, b), = tensor_weights(model, [t])
    c = t.choices[0]
    probe.replace(flat, ti, *plan_rows(t, w, b, [c] * t.num_groups, "symmetric"))
    assert cond[ti][0] == pytest.approx(probe.kl(flat), rel=1e-6, abs=1e-12)
    fp32 = tensor_damage(model, batches, tensors, "symmetric", probe=probe)
    assert not np.allclose(np.concatenate(cond), np.concatenate(fp32))  # the rest quantized changes the damages

    budget = int(0.5 * sum(plan_size_bytes([t], [(max(t.choices),) * t.num_groups]) for t in tensors))
    info = {}
    bits = measured_allocation(model, task_data, tensors, budget, n_batches=2, batch_size=8, info=info,
                               refine_rounds=2)
    rounds = info["refine"]["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2] and all(r["joint_kl_x1000"] >= 0 for r in rounds)
    chosen = rounds[info["refine"]["chosen_round"]]
    assert chosen["joint_kl_x1000"] == min(r["joint_kl_x1000"] for r in rounds)
    assert probe.kl(probe.at_plan(bits)) * 1000 == pytest.approx(chosen["joint_kl_x1000"], rel=1e-6, abs=1e-9)
    assert plan_size_bytes(tensors, bits) <= budget
    with pytest.raises(NasqError, match="refine_rounds must be >= 0"):
        measured_allocation(model, task_data, tensors, budget, refine_rounds=-1)
    with pytest.raises(NasqError, match="not recorded damages"):
        measured_allocation(model, task_data, tensors, budget, damage=fp32, refine_rounds=1)


def test_train_batches_of_long_rows_only(task_data):
    """min_tokens: the measured rows all have at least that many tokens; none that long is a clear error."""
    from nasq.baselines.hessian import _train_batches

    lengths = task_data.train.lengths
    cut = int(np.percentile(lengths, 75))
    for b in _train_batches(task_data, 3, 4, 0, min_tokens=cut):
        real = np.asarray(b.attention_mask).sum(1)[np.asarray(b.weights) > 0]
        assert real.size and (real >= cut).all()
    assert any((np.asarray(b.attention_mask).sum(1) < cut).any() for b in _train_batches(task_data, 8, 4, 0))
    with pytest.raises(NasqError, match="of at least"):
        _train_batches(task_data, 1, 4, 0, min_tokens=int(lengths.max()) + 1)


# ------------------------------------------------------------------------------------------------ plans


@pytest.mark.parametrize("method", ["uniform", "rule", "random", "magnitude", "hessian", "measured"])
def test_every_baseline_plan_fits_and_loads(method, model, tiny_model_dir, glue_dir, task_data, tmp_path):
    cfg = _cfg(tiny_model_dir, glue_dir, avg_bits=3)
    budget = baseline_budget(cfg, model)
    plan = baseline_plan(method, model, task_data if method in ("hessian", "measured") else None, cfg, budget,
                         bits=2 if method in ("uniform", "rule") else 8, rule_bits={"attention": 4},
                         n_batches=1, n_probes=1)
    plan.save(tmp_path / "plan.json")
    p = Plan.load(tmp_path / "plan.json")
    assert p.provenance["method"] == method
    assert p.totals["within_budget"] is True
    assert p.totals["searched_bytes"] <= budget.bytes == p.budget["bytes"]
    if method == "rule":
        assert p.provenance["rule_bits"] == {"attention": 4} and p.provenance["bits"] == 2
    if method not in ("uniform", "rule"):  # the knapsack / pruning uses most of the budget
        assert p.totals["searched_bytes"] > 0.9 * budget.bytes


def test_fisher_is_the_hessian_baseline_with_its_recipe():
    """`fisher` names `hessian --curvature fisher --granularity tensor` on 16 batches; its curvature is fixed, its
    granularity a default (per weight on request); the other methods get the Hessian options' defaults where none
    are given."""
    assert resolve_recipe("fisher") == ("hessian", "tensor", "fisher")
    assert resolve_recipe("fisher", "tensor", "fisher") == ("hessian", "tensor", "fisher")
    assert resolve_recipe("fisher", "weight") == ("hessian", "weight", "fisher")
    assert resolve_recipe("hessian") == ("hessian", "group", "hutchinson")
    assert resolve_recipe("hessian", "tensor", "fisher") == ("hessian", "tensor", "fisher")
    assert resolve_recipe("measured") == ("measured", "group", "hutchinson")
    with pytest.raises(NasqError, match="--curvature hutchinson: the fisher baseline is the hessian baseline with "
                                        "--curvature fisher; for another --curvature, use the hessian baseline"):
        resolve_recipe("fisher", curvature="hutchinson")
    assert (default_batches("fisher"), default_batches("hessian"), default_batches("measured")) == (16, 8, 8)


def test_baseline_plan_errors(model, tiny_model_dir):
    cfg = _cfg(tiny_model_dir)
    with pytest.raises(NasqError, match="needs a budget"):
        baseline_plan("random", model, None, cfg, None)
    with pytest.raises(NasqError, match="--bits"):
        baseline_plan("uniform", model, None, cfg, None)
    with pytest.raises(NasqError, match="over the budget"):
        baseline_plan("uniform", model, None, cfg, Budget(1000, "encoder", "test"), bits=8)
    with pytest.raises(NasqError, match="rule widths"):
        baseline_plan("rule", model, None, cfg, None, bits=2)
    with pytest.raises(NasqError, match=r"rule \{'attention': 8\}, else 8 bits takes .* over the budget"):
        baseline_plan("rule", model, None, cfg, Budget(1000, "encoder", "test"), bits=8, rule_bits={"attention": 8})
    with pytest.raises(NasqError, match="unknown baseline"):
        baseline_plan("foo", model, None, cfg, None)
    with pytest.raises(NasqError, match="--damage-from is for the measured baseline"):
        baseline_plan("hessian", model, None, cfg, Budget(10**6, "encoder", "test"), damage_from="p.json")
    with pytest.raises(NasqError, match="--refine-rounds is for the measured baseline"):
        baseline_plan("hessian", model, None, cfg, Budget(10**6, "encoder", "test"), refine_rounds=1)
    with pytest.raises(NasqError, match="--min-tokens is for the measured baseline"):
        baseline_plan("hessian", model, None, cfg, Budget(10**6, "encoder", "test"), min_tokens=8)
    with pytest.raises(NasqError, match="--granularity is for the hessian baseline, not measured"):
        baseline_plan("measured", model, None, cfg, Budget(10**6, "encoder", "test"), granularity="tensor")
    with pytest.raises(NasqError, match="--granularity must be one of group, tensor, weight, got 'row'"):
        baseline_plan("hessian", model, None, cfg, Budget(10**6, "encoder", "test"), granularity="row")
    with pytest.raises(NasqError, match="--curvature is for the hessian baseline, not measured"):
        baseline_plan("measured", model, None, cfg, Budget(10**6, "encoder", "test"), curvature="fisher")
    with pytest.raises(NasqError, match="--curvature must be one of hutchinson, fisher, got 'exact'"):
        baseline_plan("hessian", model, None, cfg, Budget(10**6, "encoder", "test"), curvature="exact")
    with pytest.raises(NasqError, match="the hessian baseline needs task data"):  # fisher is hessian's recipe
        baseline_plan("fisher", model, None, cfg, Budget(10**6, "encoder", "test"), curvature="fisher")
    with pytest.raises(NasqError, match="--shrinkage blends .* needs --granularity weight .* not 'tensor'"):
        baseline_plan("fisher", model, None, cfg, Budget(10**6, "encoder", "test"), shrinkage=0.5)
    with pytest.raises(NasqError, match=r"--shrinkage must be a number in \[0, 1\]"):
        baseline_plan("fisher", model, None, cfg, Budget(10**6, "encoder", "test"), granularity="weight",
                      shrinkage=2.0)
    assert baseline_budget(cfg, model) is None
    with pytest.raises(NasqError, match="needs a latency table"):
        baseline_latency(_cfg(tiny_model_dir, latency_ms=1.0), model)


def _latency_file(tensors, path):
    """A latency table where a row costs cols * bits ns, plus 0.5 ms for the rest of the model."""
    from nasq.contract.cost import LatencyTable, save_latency_table

    save_latency_table(LatencyTable(tokens=16, fixed_ms=0.5, ms_per_row={
        (t.cols, b): t.cols * b * 1e-6 for t in tensors for b in t.choices if b}), path)
    return path


def test_latency_budgets_for_the_sensitivity_allocators(tiny_model_dir, glue_dir, tensors, tmp_path):
    """fisher / hessian / measured allocate under a latency budget: the plan's latency on the table is within it
    (the size budget recorded beside it is the whole range, which the 8-bit plan would meet), close to it, and the
    provenance says so; a tighter budget gives a plan no slower. The others refuse a latency budget."""
    from nasq.baselines.allocators import allocate_plan
    from nasq.contract.cost import latency_range, load_latency_table, plan_latency_ms

    lat = _latency_file(tensors, tmp_path / "lat.json")
    table = load_latency_table(lat)
    lo, hi = latency_range(tensors, table)
    ms = {f: lo + f * (hi - lo) for f in (0.3, 0.6)}
    for method in ("fisher", "measured", "random"):
        got = {}
        for f, budget_ms in ms.items():
            cfg = _cfg(tiny_model_dir, glue_dir, latency_ms=budget_ms, latency_table=str(lat))
            plan = allocate_plan(method, cfg, n_batches=1, log=lambda *a: None)
            got[f] = plan_latency_ms(tensors, plan.bits_per_group(), table)
            p = plan.provenance
            assert got[f] <= budget_ms and got[f] > budget_ms - 0.1 * (hi - lo), (method, f, got[f], budget_ms)
            assert p["latency_budget_ms"] == budget_ms and p["latency_ms"] == pytest.approx(got[f])
            assert p["latency_table"] == str(lat) and plan.budget["source"] == f"latency_ms={budget_ms}"
        assert got[0.3] < got[0.6]
    cfg = _cfg(tiny_model_dir, glue_dir, latency_ms=ms[0.3], latency_table=str(lat))
    for method, kw in (("uniform", {"bits": 2}), ("rule", {"bits": 2, "rule_bits": {"ffn_in": 4}})):
        with pytest.raises(NasqError, match=f"the {method} baseline allocates under a size budget.*fisher"):
            allocate_plan(method, cfg, log=lambda *a: None, **kw)
    with pytest.raises(NasqError, match="infeasible"):
        allocate_plan("fisher", _cfg(tiny_model_dir, glue_dir, latency_ms=lo / 2, latency_table=str(lat)))


def test_magnitude_under_a_latency_budget(tiny_model_dir, glue_dir, tensors, tmp_path):
    """magnitude prunes, in ascending order of magnitude, until the plan's latency on the table is within the
    budget: within it, less than one group's time under it, only 0 and its bits, the pruned groups the smallest
    magnitudes of the prunable tensors, and the provenance records the latency; the byte path is the same
    greedy order (`costs` None)."""
    from nasq.baselines.allocators import allocate_plan, baseline_model
    from nasq.contract.cost import latency_ns_tables, latency_range, load_latency_table, plan_latency_ms

    lat = _latency_file(tensors, tmp_path / "lat.json")
    table = load_latency_table(lat)
    lo, hi = latency_range(tensors, table)
    budget_ms = lo + 0.8 * (hi - lo)
    cfg = _cfg(tiny_model_dir, glue_dir, latency_ms=budget_ms, latency_table=str(lat))
    plan = allocate_plan("magnitude", cfg, bits=8, log=lambda *a: None)
    bpg = plan.bits_per_group()
    got = plan_latency_ms(tensors, bpg, table)
    group_ms = max(float(tab.max()) for tab in latency_ns_tables(tensors, table)) / 1e6
    assert budget_ms - group_ms < got <= budget_ms
    assert plan.provenance["latency_ms"] == pytest.approx(got) and plan.provenance["latency_budget_ms"] == budget_ms
    assert set(np.unique(np.concatenate([np.asarray(b) for b in bpg]))) == {0, 8}
    model = baseline_model(cfg, log=lambda *a: None)[0]
    prunable = [i for i, t in enumerate(tensors) if 0 in t.choices]
    mags = group_magnitudes(model, tensors)
    flat_m = np.concatenate([mags[i] for i in prunable])
    flat_b = np.concatenate([np.asarray(bpg[i]) for i in prunable])
    assert flat_m[flat_b == 0].max() <= flat_m[flat_b == 8].min()
    # the byte path is the same order: with the byte budget of this plan's bytes, the same plan
    assert magnitude_allocation(model, tensors, plan_size_bytes(tensors, bpg), 8) == [tuple(b) for b in bpg]


def test_cli_fisher_under_a_latency_budget(cli, tiny_model_dir, glue_dir, tensors, tmp_path, capsys):
    from nasq.contract.cost import latency_range, load_latency_table

    lat = _latency_file(tensors, tmp_path / "lat.json")
    lo, hi = latency_range(tensors, load_latency_table(lat))
    x = lo + 0.5 * (hi - lo)
    out = tmp_path / "f.json"
    assert cli(["baseline", "fisher", "--model", str(tiny_model_dir), "--space", "tiny", "--task", "mrpc",
                "--data-dir", str(glue_dir), "--train-subset", "16", "--set", "train.batch_size=8",
                "--set", "model.max_len=32", "--n-batches", "1", "--latency-ms", repr(x),
                "--set", f"search.latency_table={lat}", "--out", str(out)]) == 0
    assert f"ms / budget {x:.4f} ms ({lat})" in capsys.readouterr().out
    assert Plan.load(out).provenance["latency_ms"] <= x
    assert cli(["inspect", str(out)]) == 0  # the inspection shows the latency against its budget
    assert f"latency budget on {lat}: " in (text := capsys.readouterr().out) and f"of {x:.4f} ms  (within)" in text


# ------------------------------------------------------------------------------------------------ CLI


@pytest.fixture
def cli():
    return nasq.cli.main


def test_cli_uniform_and_random(cli, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "u.json"
    common = ["--model", str(tiny_model_dir), "--space", "tiny"]
    assert cli(["baseline", "uniform", *common, "--bits", "4", "--out", str(out)]) == 0
    p = Plan.load(out)
    assert p.budget is None and {b for t in p.tensors for b in t.bits} == {4}
    assert p.provenance["bits"] == 4 and p.provenance["model_dir"] == str(tiny_model_dir)
    assert cli(["baseline", "uniform", *common, "--bits", "4", "--out", str(out)]) == 2  # no --overwrite
    assert "already exists" in capsys.readouterr().err
    assert cli(["baseline", "random", *common, "--out", str(tmp_path / "r.json")]) == 2
    assert "needs a budget" in capsys.readouterr().err
    assert cli(["baseline", "random", *common, "--avg-bits", "2", "--seed", "3", "--out",
                str(tmp_path / "r.json")]) == 0
    r = Plan.load(tmp_path / "r.json")
    assert r.provenance["seed"] == 3 and r.totals["within_budget"]
    assert cli(["baseline", "rule", *common, "--bits", "2", "--rule-bits", "attention=4", "--avg-bits", "4",
                "--out", str(tmp_path / "h.json")]) == 0
    h = Plan.load(tmp_path / "h.json")
    assert {(t.path.split(".")[3], b) for t in h.tensors for b in t.bits} >= {("attention", 4), ("intermediate", 2)}
    assert h.totals["within_budget"] and h.provenance["rule_bits"] == {"attention": 4}
    for bad in ("attention", "attention=x", ","):
        with pytest.raises(SystemExit) as e:
            cli(["baseline", "rule", *common, "--bits", "2", "--rule-bits", bad, "--out", str(tmp_path / "x.json")])
        assert e.value.code == 2
    assert "RULE=BITS" in capsys.readouterr().err
    assert cli(["baseline", "uniform", *common, "--bits", "2", "--rule-bits", "attention=4",
                "--out", str(tmp_path / "x.json")]) == 2
    assert "--rule-bits is for the rule baseline" in capsys.readouterr().err


def test_cli_per_weight_plan_re_solves_from_its_recorded_errors(cli, tensors, tiny_model_dir, glue_dir, tmp_path,
                                                                capsys):
    """A per-weight Fisher plan records each group's weighted error at each width; --traces-from re-solves it at
    any budget with no data (the same plan at its own budget), and refuses a record that does not fit."""
    common = ["--model", str(tiny_model_dir), "--space", "tiny"]
    measure = ["--task", "mrpc", "--data-dir", str(glue_dir), "--train-subset", "16", "--set", "train.batch_size=8",
               "--set", "model.max_len=32", "--n-batches", "1"]
    weight = ["--curvature", "fisher", "--granularity", "weight"]
    first = tmp_path / "w8.json"
    assert cli(["baseline", "hessian", *common, *measure, *weight, "--ratio", "8", "--out", str(first)]) == 0
    w8 = Plan.load(first)
    errors = w8.provenance["weighted_errors"]
    assert set(errors) == {t.path for t in w8.tensors}
    assert all(len(errors[t.path]) == t.num_groups and all(len(r) == len(t.choices) and min(r) >= 0
                                                            for r in errors[t.path]) for t in w8.tensors)
    for method, ratio, name in ((["hessian", *weight], "8", "again.json"),
                                (["fisher", "--granularity", "weight"], "4", "wider.json")):  # the same recipe
        assert cli(["baseline", *method, *common, "--traces-from", str(first), "--ratio", ratio,
                    "--out", str(tmp_path / name)]) == 0  # no --task / --data-dir: nothing read
    again, wider = Plan.load(tmp_path / "again.json"), Plan.load(tmp_path / "wider.json")
    assert again.bits_per_group() == w8.bits_per_group() and again.provenance["traces_from"] == str(first)
    assert again.provenance["weighted_errors"] == errors  # a re-solved plan records them too: it chains
    assert wider.totals["avg_bits"] > w8.totals["avg_bits"] and wider.totals["within_budget"]
    # the per-tensor traces are recorded beside them: the per-tensor plan of the same estimate
    assert cli(["baseline", "fisher", *common, "--granularity", "tensor", "--traces-from", str(first), "--ratio", "8",
                "--out", str(tmp_path / "t8.json")]) == 0
    per_tensor = tmp_path / "t8.json"
    # shrunk all the way toward the tensor's mean, the per-weight record re-solves to the per-tensor plan
    assert cli(["baseline", "fisher", *common, "--granularity", "weight", "--shrinkage", "1", "--traces-from",
                str(first), "--ratio", "8", "--out", str(tmp_path / "s1.json")]) == 0
    shrunk = Plan.load(tmp_path / "s1.json")
    assert shrunk.bits_per_group() == Plan.load(per_tensor).bits_per_group()
    assert shrunk.provenance["shrinkage"] == 1.0 and "s=1" in shrunk.provenance["utility"]
    assert cli(["baseline", "fisher", *common, "--shrinkage", "0.5", "--traces-from", str(first), "--ratio", "8",
                "--out", str(tmp_path / "x.json")]) == 2
    assert "--shrinkage blends each weight's curvature" in capsys.readouterr().err
    assert cli(["baseline", "hessian", *common, *weight, "--traces-from", str(per_tensor), "--ratio", "8",
                "--out", str(tmp_path / "x.json")]) == 2
    assert "not a per-weight Fisher plan" in capsys.readouterr().err
    raw = json.loads(first.read_text())  # the plan file is untrusted
    path = next(iter(raw["provenance"]["weighted_errors"]))
    for edit, message in (
            (lambda e: e[path][0].__setitem__(0, -1.0), f"weighted_errors['{path}'][0][0] must be a finite number"),
            (lambda e: e[path][0].__setitem__(1, "1"), "got 1"),
            (lambda e: e[path][0].__setitem__(1, 1e300), "must be a finite number in [0, 1e+12]"),
            (lambda e: e[path].pop(), f"weighted_errors['{path}'] must be"),
            (lambda e: e[path].__setitem__(0, 3.0), f"weighted_errors['{path}'] must be"),
            (lambda e: e.pop(path), f"no weighted errors for tensor {path}"),
    ):
        edited = json.loads(json.dumps(raw))
        edit(edited["provenance"]["weighted_errors"])
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps(edited))
        assert cli(["baseline", "hessian", *common, *weight, "--traces-from", str(bad), "--ratio", "8",
                    "--out", str(tmp_path / "x.json")]) == 2
        assert message in capsys.readouterr().err
    # a space with fewer widths takes their columns; a width never recorded is refused
    fewer = [dataclasses.replace(t, choices=t.choices[1:]) for t in tensors]
    picked = recorded_weighted_errors(w8, fewer, "w8.json")
    assert [p.tolist() for p in picked] == [[r[1:] for r in errors[t.path]] for t in tensors]
    with pytest.raises(NasqError, match=r"w8.json: tensor .* has weighted errors at widths .*, not at \[3\]"):
        recorded_weighted_errors(w8, [dataclasses.replace(tensors[0], choices=(2, 3))], "w8.json")
    with pytest.raises(NasqError, match="in 4 row groups there but 32x32 in 1 here"):
        recorded_weighted_errors(w8, [dataclasses.replace(tensors[0], group_sizes=(tensors[0].rows,))], "w8.json")
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("method", ["hessian", "measured"])
def test_cli_sensitivity_baselines(method, cli, tiny_model_dir, glue_dir, tmp_path, capsys):
    out = tmp_path / "h.json"
    assert cli(["baseline", method, "--model", str(tiny_model_dir), "--space", "tiny", "--task", "mrpc",
                "--data-dir", str(glue_dir), "--train-subset", "16", "--set", "train.batch_size=8",
                "--set", "model.max_len=32", "--n-batches", "1", "--n-probes", "1", "--ratio", "8",
                "--out", str(out)]) == 0
    p = Plan.load(out)
    assert p.provenance["method"] == method and p.provenance["n_batches"] == 1
    assert p.totals["within_budget"] and p.budget["source"] == "ratio=8.0"
    if method == "hessian":  # the same draws pooled per tensor (HAWQ's per-layer trace)
        assert p.provenance["granularity"] == "group" and "Tr(H_g)" in p.provenance["utility"]
        per_tensor = tmp_path / "ht.json"
        assert cli(["baseline", "hessian", "--model", str(tiny_model_dir), "--space", "tiny", "--task", "mrpc",
                    "--data-dir", str(glue_dir), "--train-subset", "16", "--set", "train.batch_size=8",
                    "--set", "model.max_len=32", "--n-batches", "1", "--n-probes", "1", "--ratio", "8",
                    "--granularity", "tensor", "--out", str(per_tensor)]) == 0
        t = Plan.load(per_tensor)
        assert t.provenance["granularity"] == "tensor" and "Tr(H_t)" in t.provenance["utility"]
        assert t.provenance["tensor_trace_per_weight"] == p.provenance["tensor_trace_per_weight"]
        assert t.totals["within_budget"]
        fisher = tmp_path / "hf.json"  # the Gauss-Newton curvature: exact, no probes, never negative
        assert cli(["baseline", "hessian", "--model", str(tiny_model_dir), "--space", "tiny", "--task", "mrpc",
                    "--data-dir", str(glue_dir), "--train-subset", "16", "--set", "train.batch_size=8",
                    "--set", "model.max_len=32", "--n-batches", "1", "--ratio", "8", "--granularity", "tensor",
                    "--curvature", "fisher", "--out", str(fisher)]) == 0
        f = Plan.load(fisher)
        assert f.provenance["curvature"] == "fisher" and "n_probes" not in f.provenance
        assert "Tr(G_t)" in f.provenance["utility"] and f.totals["within_budget"]
        assert min(f.provenance["tensor_trace_per_weight"].values()) >= 0
        assert p.provenance["curvature"] == "hutchinson"
        named = tmp_path / "fisher.json"  # `fisher`: the same recipe under one name, 16 batches unless told
        fisher_args = ["--model", str(tiny_model_dir), "--space", "tiny", "--task", "mrpc", "--data-dir",
                       str(glue_dir), "--train-subset", "16", "--set", "train.batch_size=8", "--set",
                       "model.max_len=32", "--n-batches", "1", "--ratio", "8"]
        assert cli(["baseline", "fisher", *fisher_args, "--granularity", "tensor", "--out", str(named)]) == 0
        n = Plan.load(named)
        assert n.bits_per_group() == f.bits_per_group()
        assert {k: n.provenance[k] for k in ("method", "curvature", "granularity", "n_batches")} == {
            "method": "hessian", "curvature": "fisher", "granularity": "tensor", "n_batches": 1}
        # per tensor unless told (the default), per weight on request
        assert cli(["baseline", "fisher", *fisher_args, "--out", str(tmp_path / "ft.json")]) == 0
        assert Plan.load(tmp_path / "ft.json").bits_per_group() == n.bits_per_group()
        assert cli(["baseline", "fisher", *fisher_args, "--granularity", "weight",
                    "--out", str(tmp_path / "fw.json")]) == 0
        fw = Plan.load(tmp_path / "fw.json")
        assert fw.provenance["granularity"] == "weight" and "weighted_errors" in fw.provenance
        assert cli(["baseline", "fisher", "--model", str(tiny_model_dir), "--space", "tiny", "--task", "mrpc",
                    "--data-dir", str(glue_dir), "--ratio", "8", "--curvature", "hutchinson",
                    "--out", str(tmp_path / "x.json")]) == 2
        assert "the fisher baseline is the hessian baseline with --curvature fisher" in capsys.readouterr().err
        # one estimate, a plan at every budget: re-solved from the traces a plan recorded, no data read
        resolve = ["--model", str(tiny_model_dir), "--space", "tiny", "--task", "mrpc"]
        assert cli(["baseline", "fisher", *resolve, "--granularity", "tensor", "--traces-from", str(named),
                    "--ratio", "8", "--out", str(tmp_path / "again.json")]) == 0
        again = Plan.load(tmp_path / "again.json")
        assert again.bits_per_group() == n.bits_per_group() and again.provenance["traces_from"] == str(named)
        assert again.provenance["tensor_trace_per_weight"] == n.provenance["tensor_trace_per_weight"]
        assert cli(["baseline", "fisher", *resolve, "--granularity", "tensor", "--traces-from", str(named),
                    "--ratio", "4", "--out", str(tmp_path / "wider.json")]) == 0
        wider = Plan.load(tmp_path / "wider.json")
        assert wider.totals["avg_bits"] > n.totals["avg_bits"] and wider.totals["within_budget"]
        # a per-group Hutchinson plan records its tensors' pooled traces too: the per-tensor plan of its draws
        assert cli(["baseline", "hessian", *resolve, "--granularity", "tensor", "--traces-from", str(out),
                    "--ratio", "8", "--out", str(tmp_path / "ht_again.json")]) == 0
        assert Plan.load(tmp_path / "ht_again.json").bits_per_group() == t.bits_per_group()
        for extra, message in (
                (["fisher", "--granularity", "tensor", "--traces-from", str(out)],
                 "its traces are of the 'hutchinson' curvature, not 'fisher'"),
                (["fisher", "--granularity", "weight", "--traces-from", str(named)], "not a per-weight Fisher plan"),
                (["hessian", "--traces-from", str(named)], "add --granularity tensor"),
                (["measured", "--traces-from", str(named)], "--traces-from is for the fisher and hessian baselines"),
                (["fisher", "--traces-from", str(tmp_path / "missing.json")], "missing.json"),
        ):
            assert cli(["baseline", extra[0], *resolve, *extra[1:], "--ratio", "8",
                        "--out", str(tmp_path / "x.json")]) == 2
            assert message in capsys.readouterr().err
        assert not (tmp_path / "x.json").exists()
        raw = json.loads(named.read_text())  # the plan file is untrusted
        path = next(iter(raw["provenance"]["tensor_trace_per_weight"]))
        for value, message in ((float("nan"), "not valid JSON (NaN is not allowed"),
                               (1e300, "must be a finite number in [0, 1e+12]"),
                               (-1.0, "must be a finite number in [0, 1e+12]"), ("0.5", "got 0.5"),
                               (True, "got True"), (None, f"no trace for tensor {path}")):
            bad = tmp_path / "bad.json"
            edited = json.loads(json.dumps(raw))
            edited["provenance"]["tensor_trace_per_weight"][path] = value
            if value is None:
                del edited["provenance"]["tensor_trace_per_weight"][path]
            bad.write_text(json.dumps(edited))
            assert cli(["baseline", "fisher", *resolve, "--granularity", "tensor", "--traces-from", str(bad),
                        "--ratio", "8", "--out", str(tmp_path / "x.json")]) == 2
            assert message in capsys.readouterr().err
        edited = json.loads(json.dumps(raw))
        edited["provenance"]["method"] = "measured"
        bad.write_text(json.dumps(edited))
        assert cli(["baseline", "fisher", *resolve, "--granularity", "tensor", "--traces-from", str(bad),
                    "--ratio", "8", "--out", str(tmp_path / "x.json")]) == 2
        assert "not a plan of the hessian or fisher baseline" in capsys.readouterr().err
        assert cli(["baseline", "measured", "--model", str(tiny_model_dir), "--space", "tiny", "--task", "mrpc",
                    "--data-dir", str(glue_dir), "--ratio", "8", "--curvature", "fisher",
                    "--out", str(tmp_path / "x.json")]) == 2
        assert "--curvature is for the hessian baseline" in capsys.readouterr().err
    if method == "measured":  # the measurements behind the plan travel with it, and re-solve at other budgets
        dmg = p.provenance["damage_kl_x1000"]
        assert set(dmg) == {t.path for t in p.tensors} and p.provenance["rows"] == 8
        pred = p.provenance["predicted_kl_x1000"]  # the knapsack's optimum is no worse than a uniform plan that fits
        assert 0 <= pred["plan"] <= pred["uniform"] * (1 + 1e-9)
        assert p.provenance["predicted_uniform_bits"] in set.intersection(*(set(t.choices) for t in p.tensors)) - {0}
        assert "predicted output KL before QAT" in capsys.readouterr().out
        common = ["baseline", "measured", "--model", str(tiny_model_dir), "--space", "tiny", "--task", "mrpc",
                  "--damage-from", str(out)]
        again = tmp_path / "again.json"  # no --data-dir: no data is read
        assert cli([*common, "--ratio", "8", "--out", str(again)]) == 0
        a = Plan.load(again)
        assert [t.bits for t in a.tensors] == [t.bits for t in p.tensors]  # same damages, same budget, same plan
        assert a.provenance["damage_from"] == str(out) and a.provenance["damage_kl_x1000"] == dmg
        assert cli([*common, "--ratio", "4", "--out", str(tmp_path / "wider.json")]) == 0
        wider = Plan.load(tmp_path / "wider.json")
        assert wider.totals["avg_bits"] > a.totals["avg_bits"] and wider.totals["within_budget"]
        other = tmp_path / "seed1.json"  # the same measurement on other rows, then both pooled
        assert cli(["baseline", "measured", "--model", str(tiny_model_dir), "--space", "tiny", "--task", "mrpc",
                    "--data-dir", str(glue_dir), "--train-subset", "16", "--set", "train.batch_size=8",
                    "--set", "model.max_len=32", "--n-batches", "1", "--ratio", "8", "--seed", "1",
                    "--out", str(other)]) == 0
        o = Plan.load(other)
        pooled = tmp_path / "pooled.json"
        assert cli([*common[:-1], f"{out},{other}", "--ratio", "8", "--out", str(pooled)]) == 0
        pl = Plan.load(pooled)
        assert pl.provenance["damage_from"] == [str(out), str(other)] and pl.provenance["pooled_rows"] == 16
        od = o.provenance["damage_kl_x1000"]
        for path, row in pl.provenance["damage_kl_x1000"].items():
            for c, v in row.items():
                assert v == pytest.approx((dmg[path][c] + od[path][c]) / 2, rel=1e-9)
        assert pl.totals["within_budget"]
        assert cli([*common[:-1], f"{out},{again}", "--ratio", "8", "--out", str(tmp_path / "x.json")]) == 2
        refined = tmp_path / "refined.json"  # refinement and long rows: recorded in the provenance
        assert cli([*common[:-2], "--data-dir", str(glue_dir), "--train-subset", "16", "--set", "train.batch_size=8",
                    "--set", "model.max_len=32", "--n-batches", "1", "--ratio", "8", "--refine-rounds", "1",
                    "--min-tokens", "2", "--out", str(refined)]) == 0
        r = Plan.load(refined)
        assert r.provenance["refine_rounds"] == 1 and r.provenance["min_tokens"] == 2
        assert [x["round"] for x in r.provenance["refine"]["rounds"]] == [0, 1] and r.totals["within_budget"]
        assert cli([*common, "--ratio", "8", "--refine-rounds", "1", "--out", str(tmp_path / "x.json")]) == 2
        assert cli([*common, "--ratio", "8", "--min-tokens", "4", "--out", str(tmp_path / "x.json")]) == 2
        assert not (tmp_path / "x.json").exists()


def test_hessian_shares_split_each_tensors_damage_by_curvature():
    """--spread hessian: a tensor's damage at each width goes to its groups in proportion to the Hessian estimate
    (the columns sum to 1, so a tensor at one width still costs what was measured), and the knapsack then gives
    the sensitive group of a tensor more bits than the others; with rows the groups are interchangeable."""
    from nasq.baselines.measured import hessian_shares, measured_utilities, predicted_damage
    from nasq.contract.cost import uniform_plan

    ts = [_t("encoder.a", 8, 16, 4), _t("encoder.b", 8, 16, 4)]
    traces = [np.array([8.0, 1.0, 1.0, 0.0]), np.array([1.0, 1.0, 1.0, 1.0])]  # a's group 0 sharp, group 3 flat
    perts = [np.tile([10.0, 4.0, 1.0, 0.0], (4, 1)), np.tile([10.0, 4.0, 1.0, 0.0], (4, 1))]
    shares = hessian_shares(ts, traces, perts)
    for s in shares:
        np.testing.assert_allclose(s.sum(axis=0), 1.0)  # the 8-bit column (no perturbation) falls back to rows
    np.testing.assert_allclose(shares[1][:, 0], 0.25)
    assert shares[0][0, 0] > 0.7 and shares[0][3, 0] < 1e-2  # the clamp keeps a flat group's share small, > 0
    damage = [np.array([9.0, 3.0, 1.0, 0.0]), np.array([9.0, 3.0, 1.0, 0.0])]
    for w in (0, 2, 4, 8):
        assert predicted_damage(ts, damage, uniform_plan(ts, w), shares) == pytest.approx(
            predicted_damage(ts, damage, uniform_plan(ts, w)))
    tabs = size_tables(ts)
    budget = int(sum(t[:, 2].sum() for t in tabs) + (tabs[0][0, 3] - tabs[0][0, 2]))  # one group 4 -> 8 bits
    by_rows = choices_to_bits(ts, allocate(measured_utilities(ts, damage), tabs, budget).choices)
    by_hess = choices_to_bits(ts, allocate(measured_utilities(ts, damage, shares), tabs, budget).choices)
    # the sharp group of a gets 8 bits, the flat one (its share of every width's damage near 0) the fewest:
    # pruned, its bytes spent elsewhere
    assert by_hess[0][0] == 8 and by_hess[0][3] == min(by_hess[0]) == 0
    assert sorted(by_rows[0] + by_rows[1]).count(8) == 1 and 0 not in by_rows[0] + by_rows[1]  # rows: any group
    assert predicted_damage(ts, damage, by_hess, shares) < predicted_damage(ts, damage, by_rows, shares)


def test_cli_measured_spread_hessian(cli, tiny_model_dir, glue_dir, tmp_path, capsys):
    common = ["baseline", "measured", "--model", str(tiny_model_dir), "--space", "tiny", "--task", "mrpc",
              "--data-dir", str(glue_dir), "--train-subset", "16", "--set", "train.batch_size=8",
              "--set", "model.max_len=32", "--n-batches", "1", "--n-probes", "1", "--ratio", "8"]
    out = tmp_path / "hs.json"
    assert cli([*common, "--spread", "hessian", "--out", str(out)]) == 0
    p = Plan.load(out)
    assert p.provenance["spread"] == "hessian" and p.provenance["n_probes"] == 1 and p.totals["within_budget"]
    assert "h_gc" in p.provenance["utility"] and set(p.provenance["damage_kl_x1000"]) == {t.path for t in p.tensors}
    pred = p.provenance["predicted_kl_x1000"]
    assert 0 <= pred["plan_hessian_spread"] <= pred["uniform"] * (1 + 1e-9)
    # "plan" is split by rows, as `nasq inspect --damage-from` predicts any plan (the same number both ways)
    from nasq.contract.damage import plan_prediction
    assert plan_prediction(p, out)["plan_kl_x1000"] == pytest.approx(pred["plan"])
    capsys.readouterr()
    assert cli([*common, "--spread", "hessian", "--damage-from", str(out), "--out", str(tmp_path / "x.json")]) == 2
    assert "cannot work from --damage-from" in capsys.readouterr().err
    assert cli(["baseline", "hessian", *common[2:], "--spread", "hessian", "--out", str(tmp_path / "y.json")]) == 2
    assert "--spread is for the measured baseline" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists() and not (tmp_path / "y.json").exists()
    # split by the Gauss-Newton traces: no probes recorded, the same measured damages (same rows, same seed)
    fs = tmp_path / "fs.json"
    assert cli([*common, "--spread", "fisher", "--out", str(fs)]) == 0
    f = Plan.load(fs)
    assert f.provenance["spread"] == "fisher" and "n_probes" not in f.provenance and f.totals["within_budget"]
    assert "Tr(G_g)" in f.provenance["utility"]
    assert f.provenance["damage_kl_x1000"] == p.provenance["damage_kl_x1000"]
    assert 0 <= f.provenance["predicted_kl_x1000"]["plan_fisher_spread"]


def test_the_probe_reruns_only_the_stages_a_tensor_changes(model, tensors, task_data):
    """kl(new, changed=(start, i)) is kl(new) to the bit (the same stage programs on the same inputs) while running
    only the stages from tensor i's on, for a tensor of every stage (embeddings, first and last encoder layer,
    pooler and classifier), from fp32 and from a quantized plan (a new start state is not served another state's
    hidden states)."""
    from nasq.baselines.hessian import _train_batches, quantized_rows
    from nasq.baselines.measured import _Probe

    emb = SearchedTensor(path="embeddings.word_embeddings", rule="e", rows=model.config.vocab_size,
                         cols=model.config.hidden_size, group_sizes=group_sizes(model.config.vocab_size, 2),
                         choices=(2, 4), has_bias=False, kind="embedding")
    head = _t("pooler.dense", model.config.hidden_size, model.config.hidden_size, 2, (2, 4))
    ts = [emb, tensors[0], tensors[-1], head]
    batches = _train_batches(task_data, 2, 8, 0)
    probe = _Probe(model, batches, ts, "symmetric")
    n_layers = len(model.bert.encoder.layer)
    assert probe.stage == [0, 1, n_layers, n_layers + 1]
    calls = []
    fns = probe._stage_fns
    probe._stage_fns = [lambda *a, s=s, f=f: (calls.append(s), f(*a))[1] for s, f in enumerate(fns)]
    plan = probe.at_plan([[2] * t.num_groups for t in ts])
    for start in (probe.flat, plan, probe.flat):
        for i, t in enumerate(ts):
            new = dict(start)
            w, b = probe.wb[i]
            probe.replace(new, i, *quantized_rows(t, w, b, 4, "symmetric"))
            probe.kl(new, changed=(start, i))  # the first call of a start also fills its cache: not counted
            calls.clear()
            staged = probe.kl(new, changed=(start, i))
            assert sorted(set(calls)) == list(range(probe.stage[i], n_layers + 2))
            assert staged == probe.kl(new) and staged > 0
