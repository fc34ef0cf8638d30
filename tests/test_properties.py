"""Property tests (hypothesis): exported bytes == cost model for random plans; corrupt plan.json files are refused
with NasqError (never another exception, never silently a different plan).

Quantizer / packing / finalize properties live in test_quantizer.py, test_packing.py, test_finalize.py; corrupt
artifacts in test_export.py."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiers import examples

from nasq.contract.plan import Plan, make_plan
from nasq.errors import NasqError
from nasq.models.surgery import model_param_shapes
from nasq.quant.apply import apply_plan

SETTINGS = settings(max_examples=examples(5), deadline=None, suppress_health_check=list(HealthCheck))


# ------------------------------------------------------------------------------- cost model == exported bytes
@given(data=st.data())
@SETTINGS
def test_exported_bytes_equal_cost_model(tiny, tmp_path_factory, data):
    from nasq.contract.space import Fixed, SpaceInfo
    from nasq.export.reader import read_manifest
    from nasq.export.writer import export_model

    model, space, tensors = tiny
    bits = [tuple(data.draw(st.lists(st.sampled_from(t.choices), min_size=t.num_groups, max_size=t.num_groups)))
            for t in tensors]
    fixed = Fixed(word_embeddings_bits=data.draw(st.sampled_from([8, 32])),
                  other_embeddings_bits=data.draw(st.sampled_from([8, 32])),
                  unsearched_linear_bits=data.draw(st.sampled_from([8, 32])))
    info = SpaceInfo(name=space.name, source=space.source, quant_mode=space.quant_mode, fixed=fixed)
    plan = make_plan(tensors, bits, space=info, budget=None, param_shapes=model_param_shapes(model),
                     provenance={"method": "random"})
    out = export_model(apply_plan(model, plan), plan.to_dict(), tmp_path_factory.mktemp("art") / "m.nasq",
                       task="sst2", num_labels=2)
    m = read_manifest(out)
    assert m["tensor_bytes"] == plan.totals["artifact_tensor_bytes"] == m["predicted_bytes"]
    assert m["searched_tensor_bytes"] == plan.totals["searched_bytes"]


# ------------------------------------------------------------------------------------------ corrupt plan fuzz
@pytest.fixture(scope="module")
def plan_text(tiny):
    model, space, tensors = tiny
    rng = np.random.default_rng(0)
    bits = [tuple(int(b) for b in rng.choice(t.choices, t.num_groups)) for t in tensors]
    plan = make_plan(tensors, bits, space=space, budget=None, param_shapes=model_param_shapes(model),
                     provenance={"method": "random"})
    return json.dumps(plan.to_dict(), indent=1) + "\n"


WEIRD = st.one_of(st.none(), st.booleans(), st.integers(-3, 12), st.sampled_from([2**63, 10**30, -(2**70)]),
                  st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=5),
                  st.lists(st.integers(-2, 9), max_size=5), st.just({}), st.just({"a": 1}))
TENSOR_KEYS = ("path", "kind", "rows", "cols", "has_bias", "group_sizes", "choices", "bits", "pruned_groups",
               "bytes")
TOP_KEYS = ("format", "version", "quant_mode", "space", "activations", "fixed", "tensors", "budget", "totals",
            "provenance")


def _mutate(d: dict, data) -> dict:
    """One structural corruption of a plan dict (every kind makes it invalid)."""
    d = copy.deepcopy(d)
    kind = data.draw(st.sampled_from(["drop_top", "drop_tensor_key", "bad_bits", "tensor_value", "version",
                                      "top_value", "tensors_shape"]))
    i = data.draw(st.integers(0, len(d["tensors"]) - 1))
    t = d["tensors"][i]
    if kind == "drop_top":
        del d[data.draw(st.sampled_from(TOP_KEYS))]
    elif kind == "drop_tensor_key":
        del t[data.draw(st.sampled_from(TENSOR_KEYS))]
    elif kind == "bad_bits":
        g = data.draw(st.integers(0, len(t["bits"]) - 1))
        t["bits"][g] = data.draw(st.one_of(st.sampled_from([-1, 9, 16, 1, 3, 5, 6, 7, 2.0, "4", True, None]),
                                           st.integers(-100, -1), st.integers(9, 2**40)))
    elif kind == "tensor_value":
        key = data.draw(st.sampled_from(TENSOR_KEYS))
        old = t[key]

        def changes(v):
            if json.dumps(v) == json.dumps(old):
                return False
            if key == "path":  # a renamed tensor is a consistent plan (check_plan_matches refuses it on use)
                return not (isinstance(v, str) and v)
            if key == "bits" and isinstance(v, list):  # permuted equal-size groups: same bytes, valid plan
                return sorted(map(repr, v)) != sorted(map(repr, old))
            return True

        t[key] = data.draw(WEIRD.filter(changes))
    elif kind == "version":
        d["version"] = data.draw(st.sampled_from([0, 2, -1, "1", None, 1.5, [1], True, 1.0]))
    elif kind == "top_value":
        key = data.draw(st.sampled_from(["format", "quant_mode", "fixed", "tensors", "budget", "totals", "space",
                                         "activations", "provenance"]))
        d[key] = data.draw(WEIRD.filter(lambda v: not isinstance(v, dict) and not (key == "budget" and v is None)))
    else:  # tensors_shape: drop / duplicate a tensor entry, or make it a non-object
        op = data.draw(st.sampled_from(["dup", "empty", "scalar"]))
        if op == "dup":
            d["tensors"].append(copy.deepcopy(t))
        elif op == "empty":
            d["tensors"] = []
        else:
            d["tensors"][i] = data.draw(WEIRD.filter(lambda v: not isinstance(v, dict)))
    return d


def _semantics(tensors: list[dict]) -> str:
    """What a consumer of the plan uses (``choices`` and ``rule`` are informational)."""
    return json.dumps([{k: v for k, v in t.items() if k not in ("choices", "rule")} for t in tensors],
                      sort_keys=True)


@given(data=st.data())
@settings(max_examples=examples(150), deadline=None, suppress_health_check=list(HealthCheck))
def test_mutated_plan_refused(plan_text, tmp_path_factory, data):
    good = json.loads(plan_text)
    bad = _mutate(good, data)
    p = tmp_path_factory.mktemp("p") / "plan.json"
    p.write_text(json.dumps(bad))
    try:
        loaded = Plan.load(p)
    except NasqError as e:
        assert "plan.json" in str(e)
        return
    # Loading succeeded: only an informational field may differ (e.g. a superset of choices); the bits, groups
    # and shapes every consumer uses must be exactly the original ones.
    assert _semantics(loaded.to_dict()["tensors"]) == _semantics(good["tensors"]), json.dumps(bad)[:300]
    assert all(set(t.bits) <= set(t.choices) for t in loaded.tensors)


@given(n=st.integers(0, 10**9))
@settings(max_examples=examples(60), deadline=None, suppress_health_check=list(HealthCheck))
def test_truncated_plan_refused(plan_text, tmp_path_factory, n):
    cut = n % (len(plan_text) - 1)  # strictly shorter than the JSON body (the text ends in a newline)
    p = tmp_path_factory.mktemp("t") / "plan.json"
    p.write_text(plan_text[:cut])
    with pytest.raises(NasqError, match="plan.json"):
        Plan.load(p)


def test_good_plan_loads(plan_text, tmp_path):
    p = tmp_path / "plan.json"
    p.write_text(plan_text)
    assert Plan.load(p).to_dict() == json.loads(plan_text)


@pytest.mark.parametrize("version", [True, 1.0])
def test_version_must_be_the_integer_1(plan_text, tmp_path, version):
    d = json.loads(plan_text)
    d["version"] = version
    p = tmp_path / "plan.json"
    p.write_text(json.dumps(d))
    with pytest.raises(NasqError, match="version"):
        Plan.load(p)
