"""Cost model: sizes via the exporter's byte count, budgets, latency tables."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tiers import examples

from nasq.contract import cost
from nasq.contract.space import SearchedTensor, load_space, resolve
from nasq.errors import NasqError
from nasq.quant.packing import group_nbytes
from nasq.testing import bert_shapes


@pytest.fixture(scope="module")
def minilm():
    return resolve(load_space("aqbert_128g"), bert_shapes(), num_heads=12)


@pytest.fixture(scope="module")
def tiny():
    return resolve(load_space("tiny"), bert_shapes(2, 32, 64, 100), num_heads=2)


def onehot_plan(tensors, seed):
    rng = np.random.default_rng(seed)
    idx = [rng.integers(0, len(t.choices), t.num_groups) for t in tensors]
    probs = [jax.nn.one_hot(jnp.asarray(i), len(t.choices)) for i, t in zip(idx, tensors, strict=True)]
    plan = [tuple(t.choices[j] for j in i) for i, t in zip(idx, tensors, strict=True)]
    return probs, plan


def test_size_table_uses_group_nbytes():
    t = SearchedTensor("x", "r", 10, 12, (4, 3, 3), (0, 1, 3, 8), True, "linear")
    tab = cost.size_table(t)
    assert tab.shape == (3, 4) and tab.dtype == np.int64
    assert (tab[:, 0] == 0).all()
    assert tab[0, 3] == group_nbytes(4, 12, 8) == 4 * 12 + 4 + 16
    assert tab[1, 2] == 3 * math.ceil(12 * 3 / 8) + 4 + 12  # 3 bits packed densely: 5 bytes per row


@pytest.mark.parametrize("seed", [0, 1])
def test_expected_equals_plan_for_onehot(tiny, seed):
    probs, plan = onehot_plan(tiny, seed)
    e = cost.expected_cost(probs, cost.size_tables(tiny))
    assert float(e) == cost.plan_size_bytes(tiny, plan)


def test_expected_equals_plan_minilm(minilm):
    probs, plan = onehot_plan(minilm, 3)
    e = cost.expected_cost(probs, cost.size_tables(minilm))
    assert abs(float(e) - cost.plan_size_bytes(minilm, plan)) <= 1e-6 * float(e)


def test_expected_size_is_differentiable(tiny):
    tabs = cost.size_tables(tiny)
    logits = [jnp.zeros(t.shape) for t in tabs]
    grads = jax.grad(lambda ls: cost.expected_cost([jax.nn.softmax(x) for x in ls], tabs))(logits)
    # raising the logit of the 8-bit choice increases size; of the pruned choice decreases it
    assert all((g[:, -1] > 0).all() and (g[:, 0] < 0).all() for g in grads)


def test_plan_checks(tiny):
    plan = cost.uniform_plan(tiny, 4)
    with pytest.raises(NasqError, match="not one of the choices"):
        cost.plan_size_bytes(tiny, cost.uniform_plan(tiny, 3))
    three = cost.plan_size_bytes(tiny, cost.uniform_plan(tiny, 3), check_choices=False)
    two = cost.plan_size_bytes(tiny, cost.uniform_plan(tiny, 2))
    assert two < three < cost.plan_size_bytes(tiny, plan)  # 3 bits is packed densely, not in a 4-bit container
    with pytest.raises(NasqError, match="groups"):
        cost.plan_size_bytes(tiny, [(4,)] + plan[1:])


def test_size_range_and_monotone(minilm):
    lo, hi = cost.size_range(minilm)
    assert lo == 0  # 0 is a choice everywhere
    sizes = [cost.plan_size_bytes(minilm, cost.uniform_plan(minilm, b)) for b in (2, 4, 8)]
    assert lo < sizes[0] < sizes[1] < sizes[2] == hi
    pm = resolve(load_space("per_matrix"), bert_shapes(), 12)
    lo2, hi2 = cost.size_range(pm)
    assert lo2 == cost.plan_size_bytes(pm, cost.uniform_plan(pm, 2)) and hi2 == hi - 4 * (128 - 1) * 36


@settings(max_examples=examples(25), deadline=None)
@given(st.lists(st.integers(0, 3), min_size=12 * 4, max_size=12 * 4), st.integers(0, 12 * 4 - 1))
def test_plan_size_monotone_in_bits(idx, k):
    ts = resolve(load_space("tiny"), bert_shapes(2, 32, 64, 100), num_heads=2)
    plan = [[t.choices[idx[4 * i + g]] for g in range(4)] for i, t in enumerate(ts)]
    before = cost.plan_size_bytes(ts, plan)
    i, g = divmod(k, 4)
    c = ts[i].choices.index(plan[i][g])
    if c + 1 < len(ts[i].choices):
        plan[i][g] = ts[i].choices[c + 1]
        assert cost.plan_size_bytes(ts, plan) > before


def test_avg_bits(minilm):
    assert cost.avg_bits(minilm, cost.uniform_plan(minilm, 4)) == 4.0
    plan = cost.uniform_plan(minilm, 8)
    plan[0] = (0,) * 128  # prune one 384x384 matrix out of 10.6M weights
    n = sum(t.num_weights for t in minilm)
    assert cost.avg_bits(minilm, plan) == pytest.approx(8 * (n - 384 * 384) / n)


def test_encoder_linear_nbytes():
    ts = resolve(load_space("whole_model"), bert_shapes(), 12)
    plan = cost.uniform_plan(ts, 8)
    enc = cost.encoder_linear_nbytes(ts, plan)
    assert enc == cost.plan_size_bytes(ts[1:], plan[1:])
    assert cost.encoder_linear_nbytes(ts, plan, include_bias=False) == enc - 4 * sum(t.rows for t in ts[1:])


# ---------------------------------------------------------------------------------------------- budgets


@pytest.mark.parametrize("b", [2, 4, 8])
def test_avg_bits_budget_equals_uniform_plan(minilm, b):
    budget = cost.resolve_budget(minilm, avg_bits=b)
    assert budget.bytes == cost.plan_size_bytes(minilm, cost.uniform_plan(minilm, b))
    assert budget.convention == "encoder" and budget.source == f"avg_bits={b}"


@pytest.mark.parametrize("b", range(1, 9))
def test_uniform_plan_fits_its_avg_bits_budget_exactly(minilm, b):
    """Dense packing: uniform b-bit is exactly the avg_bits=b budget for every width, 3, 5, 6, 7 included
    (through size_budget, the budget resolution of search, baselines and finalize)."""
    space = load_space("aqbert_128g")
    budget = cost.size_budget(minilm, space, bert_shapes(), avg_bits=b)
    uniform = cost.plan_size_bytes(minilm, cost.uniform_plan(minilm, b), check_choices=False)
    assert budget.bytes == uniform
    n = sum(t.num_weights for t in minilm)
    assert uniform == n * b // 8 + 4 * sum(t.num_groups + t.rows for t in minilm)
    if b > 1:
        assert cost.plan_size_bytes(minilm, cost.uniform_plan(minilm, b - 1), check_choices=False) < budget.bytes


def test_avg_bits_budget_minilm_value(minilm):
    # 10.6M weights * 2/8 + 36*128 scales*4 + biases
    n = sum(t.num_weights for t in minilm)
    assert n == 6 * (4 * 384 * 384 + 2 * 384 * 1536)
    bias = 4 * sum(t.rows for t in minilm)
    assert cost.resolve_budget(minilm, avg_bits=2).bytes == n // 4 + 36 * 128 * 4 + bias


def test_ratio_and_mb_budgets(minilm):
    fp32 = cost.fp32_nbytes(minilm)
    assert cost.resolve_budget(minilm, ratio=8).bytes == fp32 // 8
    assert cost.resolve_budget(minilm, budget_mb=3.0).bytes == 3_000_000
    art = cost.resolve_budget(minilm, budget_mb=10.0, convention="artifact", fixed_bytes=7_000_000)
    assert art.bytes == 3_000_000 and art.total_bytes == 10_000_000 and art.convention == "artifact"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, r"exactly one budget .* \(got none\)"),
        ({"budget_mb": 1.0, "avg_bits": 2}, r"exactly one budget .* \(got budget_mb, avg_bits\)"),
        ({"avg_bits": 2, "convention": "artifact"}, "'artifact' convention needs --budget-mb"),
        ({"budget_mb": -1.0}, "--budget-mb must be a positive number, got -1.0"),
        ({"ratio": 0}, "--ratio must be a positive number, got 0"),
    ],
)
def test_budget_argument_errors(minilm, kwargs, message):
    with pytest.raises(NasqError, match=message):
        cost.resolve_budget(minilm, **kwargs)


def test_infeasible_budget_states_range():
    ts = resolve(load_space("per_matrix"), bert_shapes(), 12)  # no pruning: min = uniform 2-bit
    lo, hi = cost.size_range(ts)
    with pytest.raises(
        NasqError, match=rf"{lo / 1e6:.3f} \.\. {hi / 1e6:.3f} MB \(average 2\.00 \.\. 8\.00 bits"
    ):
        cost.resolve_budget(ts, budget_mb=1.0)
    with pytest.raises(NasqError, match="outside the reachable range"):
        cost.resolve_budget(ts, ratio=1.5)  # above the all-8-bit size
    with pytest.raises(NasqError, match="fixed, unsearched"):
        cost.resolve_budget(ts, budget_mb=5.0, convention="artifact", fixed_bytes=4_000_000)
    assert cost.resolve_budget(ts, budget_mb=lo / 1e6).bytes == lo


# ------------------------------------------------------------------------------------------ fixed bytes


def test_fixed_nbytes_minilm_hf_and_flax_names():
    space = load_space("aqbert_128g")
    hidden, vocab = 384, 30522
    params = {
        "embeddings.word_embeddings.weight": (vocab, hidden),
        "embeddings.position_embeddings.weight": (512, hidden),
        "embeddings.token_type_embeddings.weight": (2, hidden),
        "embeddings.LayerNorm.weight": (hidden,),
        "embeddings.LayerNorm.bias": (hidden,),
        "encoder.layer.0.attention.self.query.weight": (hidden, hidden),
        "encoder.layer.0.attention.self.query.bias": (hidden,),
        "encoder.layer.0.output.LayerNorm.weight": (hidden,),
        "pooler.dense.weight": (hidden, hidden),
        "pooler.dense.bias": (hidden,),
        "classifier.kernel": (hidden, 2),  # Flax layout (in, out)
        "classifier.bias": (2,),
    }
    ts = [
        SearchedTensor(
            "encoder.layer.0.attention.self.query",
            "q",
            hidden,
            hidden,
            (3,) * 128,
            (0, 2, 4, 8),
            True,
            "linear",
        )
    ]
    expect = (
        vocab * hidden
        + 4 * vocab  # int8 word embeddings + per-row scale
        + 4 * (512 + 2) * hidden  # fp32 position / token type
        + 4 * 3 * hidden  # LayerNorms
        + 4 * (hidden * hidden + hidden)  # pooler fp32
        + 4 * (hidden * 2 + 2)  # classifier fp32
    )
    assert cost.fixed_nbytes(params, ts, space) == expect
    # int8 unsearched linears: per output row scale; Flax kernel rows are axis 1
    s8 = space.model_copy(update={"fixed": space.fixed.model_copy(update={"unsearched_linear_bits": 8})})
    expect8 = (
        expect - 4 * (hidden * hidden + hidden * 2) + (hidden * hidden + 4 * hidden) + (hidden * 2 + 4 * 2)
    )
    assert cost.fixed_nbytes(params, ts, s8) == expect8


def test_fixed_nbytes_excludes_searched_embeddings():
    space = load_space("whole_model")
    shapes = bert_shapes(1, 32, 64, 100)
    ts = resolve(space, shapes, 2)
    params = {"embeddings.word_embeddings.embedding": (100, 32), "embeddings.LayerNorm.scale": (32,)}
    assert cost.fixed_nbytes(params, ts, space) == 4 * 32


# --------------------------------------------------------------------------------------------- latency


def make_table(tensors, fixed_ms=1.5):
    ms = {}
    for t in tensors:
        for b in t.choices:
            if b:
                ms[(t.cols, b)] = 1e-3 * b * t.cols / 32
    return cost.LatencyTable(tokens=128, fixed_ms=fixed_ms, ms_per_row=ms, meta={"device": "test"})


def test_latency_roundtrip_and_expected(tmp_path, tiny):
    table = make_table(tiny)
    path = tmp_path / "lat.json"
    cost.save_latency_table(table, path)
    with pytest.raises(NasqError, match="--overwrite"):
        cost.save_latency_table(table, path)
    loaded = cost.load_latency_table(path)
    assert loaded.ms_per_row == table.ms_per_row and loaded.fixed_ms == 1.5 and loaded.tokens == 128
    loaded.check(tiny)
    probs, plan = onehot_plan(tiny, 5)
    e = float(cost.expected_latency_ms(probs, tiny, loaded))
    assert e == pytest.approx(cost.plan_latency_ms(tiny, plan, loaded), rel=1e-6)
    lo, hi = cost.latency_range(tiny, loaded)
    assert lo == 1.5 and lo < e < hi
    assert hi == pytest.approx(cost.plan_latency_ms(tiny, cost.uniform_plan(tiny, 8), loaded))


def test_latency_budget_feasible_in_the_integer_nanoseconds_it_is_solved_in():
    """At the fastest reachable latency the costs rounded up to whole ns no longer fit: infeasible, said as a
    latency (not as bytes, as the knapsack would); a few ns more fit, and the knapsack's plan keeps the budget."""
    from nasq.search.finalize import allocate, choices_to_bits

    tiny = resolve(load_space("aqbert_128g_w1234"), bert_shapes(2, 32, 64, 100), num_heads=2)  # no 0-bit choice
    table = cost.LatencyTable(tokens=8, fixed_ms=0.25, ms_per_row={
        (t.cols, b): t.cols * b * 1e-6 + 3.3e-10 for t in tiny for b in t.choices if b})
    lo, _ = cost.latency_range(tiny, table)
    with pytest.raises(NasqError, match="infeasible"):
        cost.check_latency_budget(tiny, lo, table)
    ms = lo + 1e-6 * sum(t.num_groups for t in tiny)
    cost.check_latency_budget(tiny, ms, table)
    tables = cost.latency_ns_tables(tiny, table)
    alloc = allocate([-np.asarray(x, float) for x in tables], tables, cost.latency_budget_ns(ms, table))
    assert cost.plan_latency_ms(tiny, choices_to_bits(tiny, alloc.choices), table) <= ms


@pytest.mark.parametrize("change", [{"fixed_ms": float("inf")}, {"tokens": 2**40},
                                    {"entries": [{"cols": 4, "bits": 2, "ms_per_row": float("inf")}]},
                                    {"entries": [{"cols": 4, "bits": 2, "ms_per_row": 1e9}]}])
def test_latency_table_values_are_bounded(change):
    data = {"format": "nasq-latency/1", "tokens": 16, "fixed_ms": 0.5,
            "entries": [{"cols": 4, "bits": 2, "ms_per_row": 1e-3}], **change}
    with pytest.raises(NasqError, match="invalid latency table t.json"):
        cost.latency_table_from_dict(data, "t.json")


def test_latency_missing_entry_and_bad_file(tmp_path, tiny):
    table = make_table(tiny)
    del table.ms_per_row[(64, 4)]
    with pytest.raises(NasqError, match=r"cols=64, bits=4.*nasq profile"):
        table.check(tiny)
    with pytest.raises(NasqError, match="nasq profile"):
        cost.load_latency_table(tmp_path / "missing.json")
    p = tmp_path / "bad.json"
    p.write_text(json.dumps({"format": "nasq-latency/1", "tokens": 128, "entries": []}))
    with pytest.raises(NasqError, match="fixed_ms"):
        cost.load_latency_table(p)
    p.write_text("{not json")
    with pytest.raises(NasqError, match="cannot read"):
        cost.load_latency_table(p)
