import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nasq.contract.cost import Budget, fixed_nbytes, plan_size_bytes
from nasq.contract.plan import Plan, make_plan
from nasq.errors import NasqError
from nasq.models.bert import Embedding, Linear
from nasq.models.surgery import model_param_shapes
from nasq.quant.apply import apply_plan, check_plan_matches
from nasq.quant.layers import QuantEmbedding, QuantLinear

QUERY = "encoder.layer.0.attention.self.query"


def _bits(tensors, seed=0):
    rng = np.random.default_rng(seed)
    bits = [tuple(int(b) for b in rng.choice(t.choices, t.num_groups)) for t in tensors]
    i = [t.path for t in tensors].index(QUERY)
    bits[i] = (0, 2, 4, 8)  # one pruned group, every width
    return bits


@pytest.fixture(scope="module")
def plan(tiny):
    model, space, tensors = tiny
    return make_plan(tensors, _bits(tensors), space=space,
                     budget=Budget(bytes=10**6, convention="encoder", source="budget_mb=1"),
                     param_shapes=model_param_shapes(model), provenance={"method": "random", "seed": 0})


def test_plan_bytes_match_cost_model(tiny, plan):
    model, space, tensors = tiny
    bits = _bits(tensors)
    shapes = model_param_shapes(model)
    t = plan.totals
    assert t["searched_bytes"] == plan_size_bytes(tensors, bits)
    assert t["fixed_bytes"] == fixed_nbytes(shapes, tensors, space)
    assert t["artifact_tensor_bytes"] == t["searched_bytes"] + t["fixed_bytes"]
    assert t["within_budget"] is True and t["budget_bytes"] == 10**6
    assert [pt.bytes for pt in plan.tensors] == [plan_size_bytes([x], [b]) for x, b in zip(tensors, bits)]
    assert plan.tensor(QUERY).pruned_groups == (0,)
    assert 0 < t["pruned_fraction"] < 1
    assert plan.provenance["method"] == "random" and plan.provenance["nasq_version"]


def test_round_trip(plan, tmp_path):
    p = plan.save(tmp_path / "plan.json")
    back = Plan.load(p)
    assert back == plan
    assert back.to_dict() == json.loads(p.read_text())
    with pytest.raises(NasqError, match="--overwrite"):
        plan.save(p)
    plan.save(p, overwrite=True)


def _write(tmp_path, d):
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(d))
    return p


def test_pre_dense_packing_plan_refused_with_advice(plan, tmp_path):
    """A plan counting 3-bit groups in 4-bit containers (nasq before dense packing) is refused, saying why."""
    from nasq.quant.packing import V1_CONTAINER_BITS

    d = plan.to_dict()
    t = next(x for x in d["tensors"] if x["path"] == QUERY)
    t["choices"], t["bits"][1] = sorted({*t["choices"], 3}), 3
    t["bytes"] = sum(r * -(-t["cols"] * V1_CONTAINER_BITS[b] // 8) + 4 + 4 * r
                     for r, b in zip(t["group_sizes"], t["bits"]) if b)
    d["totals"]["searched_bytes"] = sum(x["bytes"] for x in d["tensors"])
    with pytest.raises(NasqError, match=r"\.bytes: .*before dense packing counted its 3-bit groups.*"
                                        r"re-create the plan with this nasq"):
        Plan.load(_write(tmp_path, d))


def test_bad_files(plan, tmp_path):
    with pytest.raises(NasqError, match="not found"):
        Plan.load(tmp_path / "missing.json")
    (tmp_path / "x.json").write_text("{nope")
    with pytest.raises(NasqError, match=r"x\.json is not valid JSON"):
        Plan.load(tmp_path / "x.json")
    d = plan.to_dict()
    with pytest.raises(NasqError, match="unsupported plan format version 7, this nasq reads 1"):
        Plan.load(_write(tmp_path, {**d, "version": 7}))
    bad = json.loads(json.dumps(d))
    bad["tensors"][2]["bits"][1] = 3
    with pytest.raises(NasqError, match=r"bad\.json: tensors\[2\] .*bits: \[3\] not among"):
        Plan.load(_write(tmp_path, bad))
    bad = json.loads(json.dumps(d))
    bad["tensors"][1]["bytes"] += 1
    with pytest.raises(NasqError, match=r"tensors\[1\] .*\.bytes.*cost model"):
        Plan.load(_write(tmp_path, bad))
    bad = json.loads(json.dumps(d))
    bad["tensors"][0]["group_sizes"] = [8, 8, 8]
    with pytest.raises(NasqError, match=r"tensors\[0\].*group_sizes: sum to 24"):
        Plan.load(_write(tmp_path, bad))
    bad = json.loads(json.dumps(d))
    del bad["tensors"][3]["rows"]
    with pytest.raises(NasqError, match=r"tensors\[3\]: missing key\(s\) rows"):
        Plan.load(_write(tmp_path, bad))


def test_wrong_model(tiny, plan, tmp_path):
    model, _, _ = tiny
    d = plan.to_dict()
    d["tensors"][0]["path"] = "encoder.layer.9.attention.self.query"
    other = Plan.from_dict(d, "other.json")
    with pytest.raises(NasqError, match="other.json was made for another model.*layer.9.*not in the model"):
        check_plan_matches(other, model)
    with pytest.raises(NasqError, match="another model"):
        apply_plan(model, other)


def test_apply_plan(tiny, plan):
    model, _, _ = tiny
    q = apply_plan(model, plan)
    assert isinstance(model.bert.encoder.layer[0].attention.self.query, Linear)  # input untouched
    query = q.bert.encoder.layer[0].attention.self.query
    assert isinstance(query, QuantLinear) and query.bits == (0, 2, 4, 8)
    assert isinstance(q.classifier, Linear) and isinstance(q.bert.pooler.dense, Linear)  # fixed 32 bits
    we = q.bert.embeddings.word_embeddings
    assert isinstance(we, QuantEmbedding) and set(we.bits) == {8} and len(we.group_sizes) == we.num_embeddings
    assert isinstance(q.bert.embeddings.position_embeddings, Embedding)
    ids = jnp.array([[101, 2000, 2001, 102], [101, 7, 9, 102]])
    graphdef, state = nnx.split(q)
    logits = jax.jit(lambda st, i: nnx.merge(graphdef, st)(i))(state, ids)
    assert logits.shape == (2, 2) and bool(jnp.all(jnp.isfinite(logits)))
    y = query(jnp.asarray(np.random.default_rng(0).standard_normal((3, 32)), jnp.float32))
    pruned_rows = query.group_sizes[0]
    np.testing.assert_array_equal(np.asarray(y[:, :pruned_rows]), 0.0)
    assert np.abs(np.asarray(y[:, pruned_rows:])).sum() > 0


def test_apply_plan_fixed_int8_and_scales(tiny, plan):
    model, _, _ = tiny
    d = plan.to_dict()
    d["fixed"]["unsearched_linear_bits"] = 8
    p8 = Plan.from_dict(d)
    key = "encoder.layer.0.attention.self.key"
    s = {key: np.full(plan.tensor(key).num_groups, 0.01, np.float32)}
    with pytest.raises(NasqError, match="scales for"):
        apply_plan(model, p8, scales={key: np.ones(3)})
    q = apply_plan(model, p8, scales=s)
    for lin in (q.classifier, q.bert.pooler.dense):
        assert isinstance(lin, QuantLinear) and set(lin.bits) == {8} and len(lin.group_sizes) == lin.out_features
    np.testing.assert_allclose(np.asarray(q.bert.encoder.layer[0].attention.self.key.scales[...]), 0.01)
    # init_steps=False (a model whose state is loaded next): given steps kept, every other step 1.0, no search
    q1 = apply_plan(model, p8, scales=s, init_steps=False)
    np.testing.assert_allclose(np.asarray(q1.bert.encoder.layer[0].attention.self.key.scales[...]), 0.01)
    for mod in (q1.classifier, q1.bert.embeddings.word_embeddings, q1.bert.encoder.layer[1].output.dense):
        np.testing.assert_array_equal(np.asarray(mod.scales[...]), 1.0)
    assert not np.allclose(np.asarray(q.classifier.scales[...]), 1.0)  # the default searched them


def test_quant_embedding_gather_equals_table():
    emb = Embedding(50, 8, rngs=nnx.Rngs(0))
    q = QuantEmbedding(emb, "embeddings.word_embeddings", (13, 12, 13, 12), (0, 2, 8, 1))
    ids = jnp.array([[0, 12, 13, 30], [49, 25, 26, 1]])
    np.testing.assert_array_equal(np.asarray(q(ids)), np.asarray(q.quantized_weight()[ids]))
    q1 = QuantEmbedding(emb, "e", (1,) * 50, (8,) * 50)
    np.testing.assert_array_equal(np.asarray(q1(ids)), np.asarray(q1.quantized_weight()[ids]))
