"""`nasq bench` drivers on a tiny random BERT: they run and report consistent ratios (no timing asserted)."""

import math

import pytest

from nasq.bench import bench_search_step, bench_train_step
from nasq.config import build_config


def _cfg(model, **search):
    return build_config(("test", {"model": {"name": str(model), "max_len": 16},
                                  "search": {"space": "tiny", **search}}))


@pytest.mark.slow
def test_bench_train_and_search_step(tiny_model_dir):
    r = bench_train_step(_cfg(tiny_model_dir), batch_size=2, seq_len=8, repeats=1)
    assert r["bench"] == "train-step" and r["fp32_train_step_s"] > 0
    s = bench_search_step(_cfg(tiny_model_dir, gate_every=4), batch_size=2, seq_len=8, repeats=1)
    assert s["gate_every"] == 4 and s["groups"] > 0
    for k in ("fp32_step_s", "supernet_weight_step_s", "budget_price_s", "bilevel_step_s", "single_level_step_s"):
        assert s[k] > 0 and math.isfinite(s[k])
    every_step = s["supernet_weight_step_s"] + s["budget_price_s"]
    expect = every_step + max(s["bilevel_step_s"] - every_step, 0.0) / 4
    assert math.isclose(s["search_iteration_vs_fp32"] * s["fp32_step_s"], expect)
    assert math.isclose(s["bilevel_vs_fp32"], s["bilevel_step_s"] / s["fp32_step_s"])
