"""experiments/vocab_coverage.py, prequant_eval.py, sensitivity_probe.py, gate_signal.py, hessian_reliability.py and
criteria_compare.py, curve_jitter.py, granularity_curves.py: their numbers and their errors on bad input."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "experiments" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _embedding_plan(bits):
    from nasq.contract.plan import make_plan
    from nasq.contract.space import SearchedTensor, SpaceInfo

    emb = SearchedTensor(path="embeddings.word_embeddings", rule="emb", rows=8, cols=4, group_sizes=(4, 4),
                         choices=(0, 2, 4, 8), has_bias=False, kind="embedding")
    return make_plan([emb], [bits], space=SpaceInfo(name="t", source="test"), budget=None, param_shapes=None,
                     provenance={"method": "test"})


def test_vocab_coverage_counts_pruned_rows():
    vc = _load("vocab_coverage")
    plan = _embedding_plan((0, 4))  # rows 0-3 pruned, rows 4-7 at 4 bits
    dev = [np.array([0, 5]), np.array([6, 7])]
    seen = np.array([1, 0, 0, 0, 1, 1, 1, 1], bool)
    out = vc.coverage(plan, dev, seen)
    assert out["pruned_vocab_rows"] == 0.5
    assert out["dev_tokens_in_pruned_rows"] == 0.25
    assert out["dev_examples_with_a_pruned_token"] == 0.5
    assert out["mean_bits_of_dev_tokens"] == 3.0
    assert out["search_rows_seen_of_pruned_rows"] == 0.25
    assert out["search_rows_seen_of_all_rows"] == 0.625


def test_vocab_coverage_rejects_ids_outside_the_plan_vocabulary():
    vc = _load("vocab_coverage")
    from nasq.errors import NasqError

    with pytest.raises(NasqError, match="vocabulary rows"):
        vc.coverage(_embedding_plan((0, 4)), [np.array([3, 8])])


def test_vocab_coverage_plan_without_embeddings(tiny):
    vc = _load("vocab_coverage")
    from nasq.contract.plan import make_plan

    _, space, tensors = tiny
    plan = make_plan(tensors, [t.choices[-1:] * t.num_groups for t in tensors], space=space, budget=None,
                     param_shapes=None, provenance={"method": "test"})
    assert vc.coverage(plan, [np.array([1])])["word_embeddings"] == "not searched"


@pytest.mark.parametrize("script,args", [
    ("vocab_coverage", ["--task", "sst2"]),
    ("prequant_eval", ["TEACHER_RUN", "--data-dir", "."]),
])
def test_scripts_missing_plan_is_a_clear_error(script, args, tmp_path, capsys):
    missing = str(tmp_path / "nope.json")
    rc = _load(script).main([*args, missing])
    err = capsys.readouterr().err
    assert rc == 2 and f"{script}: error: plan {missing} not found" in err


def test_scripts_invalid_plan_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "plan.json"
    bad.write_text(json.dumps({"format": "something-else"}))
    assert _load("vocab_coverage").main(["--task", "sst2", str(bad)]) == 2
    assert "'format' is 'something-else'" in capsys.readouterr().err


def test_prequant_eval_missing_teacher_is_a_clear_error(tmp_path, capsys):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(_embedding_plan((4, 4)).to_dict()))
    rc = _load("prequant_eval").main([str(tmp_path / "no_run"), str(plan), "--data-dir", "."])
    assert rc == 2 and "not a nasq model" in capsys.readouterr().err


def test_sensitivity_probe_rank_correlation_of_plans(tmp_path, capsys):
    """sensitivity_probe.plan_agreement: +1 when a plan's bits rise with the measured KL per weight, -1 when they
    fall, None for one width everywhere; --from/--plans prints them; a plan of another model is a clear error."""
    from nasq.contract.plan import make_plan
    from nasq.contract.space import SearchedTensor, SpaceInfo

    sp = _load("sensitivity_probe")
    ts = [SearchedTensor(path=f"encoder.layer.0.t{i}", rule="r", rows=8, cols=4, group_sizes=(4, 4),
                         choices=(1, 2, 3, 4), has_bias=True, kind="linear") for i in range(3)]
    probes = [{"path": t.path, "bits": 1, "weights": 32, "kl_x1000": kl} for t, kl in zip(ts, (1.0, 5.0, 9.0))]

    def plan(bits, name):
        p = make_plan(ts, bits, space=SpaceInfo(name="t", source="test"), budget=None, param_shapes=None,
                      provenance={"method": "test"})
        path = tmp_path / name
        p.save(path)
        return str(path)

    up, down, flat = plan([(1, 1), (2, 2), (4, 3)], "up.json"), plan([(4, 4), (2, 2), (1, 1)], "down.json"), \
        plan([(2, 2)] * 3, "flat.json")
    assert sp.plan_agreement(probes, up) == {1: pytest.approx(1.0)}
    assert sp.plan_agreement(probes, down) == {1: pytest.approx(-1.0)}
    assert sp.plan_agreement(probes, flat) == {1: None}
    probe_json = tmp_path / "probe.json"
    probe_json.write_text(json.dumps({"probes": probes}))
    assert sp.main(["--from", str(probe_json), "--plans", up, flat]) == 0
    out = capsys.readouterr().out
    assert f"| {up} | +1.00 |" in out and f"| {flat} | one width |" in out
    other = [{**r, "path": "encoder.layer.9.x"} for r in probes]
    probe_json.write_text(json.dumps({"probes": other}))
    assert sp.main(["--from", str(probe_json), "--plans", up]) == 2
    assert "has no tensor encoder.layer.9.x" in capsys.readouterr().err


@pytest.mark.slow  # fine-tunes a tiny teacher and compiles a supernet: about a minute
def test_gate_signal_and_hessian_reliability_on_a_tiny_teacher(tiny_model_dir, glue_dir, tmp_path, capsys):
    """experiments/gate_signal.py end to end: a row per gated tensor with finite signals and SNRs from both losses,
    rank correlations against the probe, the JSON written; a missing probe file is a clear error."""
    import nasq.cli
    from nasq.contract.model_dir import load_model_dir
    from nasq.contract.space import load_space, resolve
    from nasq.models.surgery import linear_shapes

    teacher = tmp_path / "teacher"
    assert nasq.cli.main(["finetune", "--model", str(tiny_model_dir), "--task", "sst2", "--data-dir", str(glue_dir),
                          "--train-subset", "64", "--max-steps", "2", "--set", "model.max_len=32",
                          "--out", str(teacher)]) == 0
    model, _ = load_model_dir(teacher)
    tensors = resolve(load_space("tiny"), linear_shapes(model.bert), model.config.num_attention_heads)
    probe = tmp_path / "probe.json"
    probe.write_text(json.dumps({"probes": [{"path": t.path, "bits": b, "weights": t.num_weights,
                                             "kl_x1000": float(i + 1) / b} for i, t in enumerate(tensors)
                                            for b in (2, 4)]}))
    gs = _load("gate_signal")
    common = [str(teacher), "--data-dir", str(glue_dir), "--space", "tiny", "--avg-bits", "3", "--batches", "2"]
    out = tmp_path / "signal.json"
    assert gs.main([*common, "--probe", str(probe), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [r["path"] for r in res["rows"]] == [t.path for t in tensors]
    assert all(np.isfinite(r[k]) for r in res["rows"] for k in ("task_signal", "kd_signal", "task_snr", "kd_snr"))
    assert set(res["spearman"]) == {"task@2bit", "task@4bit", "kd@2bit", "kd@4bit"}
    assert "Spearman rank correlation" in capsys.readouterr().out
    assert gs.main([*common, "--probe", str(tmp_path / "missing.json")]) == 2
    assert "gate_signal: error" in capsys.readouterr().err
    # hessian_reliability.py on the same teacher: two draws, both granularities' plans at the budget
    rel = tmp_path / "reliability.json"
    assert _load("hessian_reliability").main([str(teacher), "--task", "sst2", "--data-dir", str(glue_dir),
                                              "--space", "tiny", "--avg-bits", "3", "--n-batches", "1",
                                              "--n-probes", "1", "--train-subset", "64", "--out", str(rel)]) == 0
    r = json.loads(rel.read_text())
    assert r["groups"] == sum(t.num_groups for t in tensors) and -1 <= r["spearman_groups"] <= 1
    for gran in ("group", "tensor"):
        assert 0 <= r["plans"][gran]["same_bits_share"] <= 1
        assert [sum(c.values()) for c in r["plans"][gran]["groups_per_width"]] == [r["groups"]] * 2
    # the Gauss-Newton traces: exact over the rows, never negative
    assert _load("hessian_reliability").main([str(teacher), "--task", "sst2", "--data-dir", str(glue_dir),
                                              "--space", "tiny", "--n-batches", "1", "--curvature", "fisher",
                                              "--train-subset", "64", "--out", str(rel)]) == 0
    f = json.loads(rel.read_text())
    assert f["curvature"] == "fisher" and "n_probes" not in f and f["nonpositive_share"] == [0.0, 0.0]


def test_hessian_reliability_correlations():
    """hessian_reliability.reliability: identical draws agree everywhere (+1); draws whose groups are reversed
    inside each tensor but keep each tensor's pooled trace agree per tensor and disagree per group."""
    from nasq.contract.space import SearchedTensor

    hr = _load("hessian_reliability")
    ts = [SearchedTensor(path=f"encoder.layer.0.t{i}", rule="r", rows=16, cols=4, group_sizes=(4, 4, 4, 4),
                         choices=(2, 3, 4), has_bias=True, kind="linear") for i in range(3)]
    a = [np.array([1.0, 2.0, 3.0, 4.0]) * 10**i for i in range(3)]
    same = hr.reliability(a, a, ts)
    assert same["spearman_groups"] == pytest.approx(1.0) and same["spearman_tensors"] == pytest.approx(1.0)
    assert same["spearman_within_tensor_median"] == pytest.approx(1.0) and same["nonpositive_share"] == [0.0, 0.0]
    flipped = hr.reliability(a, [x[::-1] for x in a], ts)
    assert flipped["spearman_within_tensor_median"] == pytest.approx(-1.0)
    assert flipped["spearman_tensors"] == pytest.approx(1.0)
    assert list(hr.tensor_pooled(a, ts)) == pytest.approx([2.5, 25.0, 250.0])


def test_hessian_reliability_missing_teacher_is_a_clear_error(tmp_path, capsys):
    rc = _load("hessian_reliability").main([str(tmp_path / "no_run"), "--task", "cola", "--data-dir", "."])
    assert rc == 2 and "hessian_reliability: error:" in capsys.readouterr().err


def test_criteria_compare_log_ratios_by_module_kind():
    """criteria_compare.compare: d_fish = 0.5 * trace * sum_g ||dW_g||^2 (x1000), the log ratio to the measured
    damage per tensor and width, averaged per module kind and width; pruning and unmeasured widths left out."""
    from nasq.contract.space import SearchedTensor

    cc = _load("criteria_compare")
    assert [cc.module_kind(f"encoder.layer.3.{s}") for s, _ in cc.MODULE_KINDS] == [k for _, k in cc.MODULE_KINDS]
    ts = [SearchedTensor(path=f"encoder.layer.{i}.attention.self.value", rule="r", rows=8, cols=4, group_sizes=(4, 4),
                         choices=(0, 2, 4), has_bias=True, kind="linear") for i in range(2)]
    perts = [np.array([[9.0, 1.0, 0.25], [9.0, 1.0, 0.25]])] * 2   # sum over groups: 2.0 at 2 bits, 0.5 at 4
    traces = {ts[0].path: 1e-3, ts[1].path: 2e-3}
    damage = {ts[0].path: {"2": 1.0 * np.e, "4": 0.25}, ts[1].path: {"2": 2.0}}  # layer 1: no 4-bit measurement
    res = cc.compare(ts, perts, damage, traces)
    assert [(r["path"][:15], r["bits"]) for r in res["rows"]] == [("encoder.layer.0", 2), ("encoder.layer.0", 4),
                                                                  ("encoder.layer.1", 2)]
    assert [r["fisher_x1000"] for r in res["rows"]] == pytest.approx([1.0, 0.25, 2.0])
    assert res["log_ratio_by_kind"]["value@2"] == {"mean": pytest.approx(0.5), "n": 2}
    assert res["log_ratio_by_kind"]["value@4"]["mean"] == pytest.approx(0.0)
    assert "| value | +0.50 | +0.00 |" in cc.markdown(res)


def test_criteria_compare_plan_without_the_scores_is_a_clear_error(tmp_path, capsys):
    plan = tmp_path / "uniform.json"
    _embedding_plan((2, 2)).save(plan)
    rc = _load("criteria_compare").main([str(tmp_path), "--task", "cola", "--measured", str(plan),
                                         "--fisher", str(plan)])
    err = capsys.readouterr().err
    assert rc == 2 and "criteria_compare: error:" in err and "damage_kl_x1000" in err and "uniform.json" in err


def test_curve_jitter_within_and_across_and_the_raw_arm(tmp_path, capsys):
    cj = _load("curve_jitter")
    rows = [{"task": "cola", "budget": "avg2", "method": "m", "status": "done", "fake_quant_metric": str(f),
             "dev_curve": f"100:0.1 500:{a} 800:{f}", "raw_weights_metric": str(f + 0.01),
             "raw_dev_curve": f"500:{a - 0.02} 800:{f + 0.01}"}
            for a, f in ((0.20, 0.22), (0.24, 0.25), (0.30, 0.27))]
    rows += [{**r, "method": "other", "raw_dev_curve": "", "raw_weights_metric": ""} for r in rows[:2]]
    rows.append({**rows[0], "method": "unfinished", "status": "incomplete"})
    got = {r["method"]: r for r in cj.jitter(rows, 500, 800, min_seeds=1)}  # two seeds at least, always
    assert set(got) == {"m", "other"}
    import statistics as st
    m = got["m"]
    assert m["n"] == 3
    assert m["within"] == pytest.approx(st.mean([st.stdev([0.20, 0.22]), st.stdev([0.24, 0.25]),
                                                 st.stdev([0.30, 0.27])]))
    assert m["across"] == pytest.approx(st.stdev([0.22, 0.25, 0.27]))
    assert m["raw_within"] == pytest.approx(st.mean([st.stdev([0.18, 0.23]), st.stdev([0.22, 0.26]),
                                                     st.stdev([0.28, 0.28])]))
    assert m["raw_across"] == pytest.approx(m["across"])
    assert "raw_within" not in got["other"]  # no raw arm logged
    assert [r["method"] for r in cj.jitter(rows, 500, 800, min_seeds=3)] == ["m"]  # "other" has two seeds
    bad = tmp_path / "r.csv"
    bad.write_text("task,budget,method,status,dev_curve,fake_quant_metric\ncola,avg2,m,done,100-0.1,0.2\n")
    assert cj.main([str(bad)]) == 2
    assert "not a readable grid results.csv" in capsys.readouterr().err
    assert cj.main([str(tmp_path / "missing.csv")]) == 2


def test_granularity_curves_counts_rows_whose_early_sign_matches_the_final(tmp_path, capsys):
    gc = _load("granularity_curves")

    def run(task, budget, method, curve, metric):
        return {"task": task, "budget": budget, "method": method, "dev_curve": curve, "metric": str(metric)}

    rows = []
    for seed in range(3):
        # row a: per weight behind at step 100, ahead at 800 and in the final metric
        rows += [run("sst2", "a", "fisher_w", "100:0.80 800:0.90", 0.90 + seed / 100),
                 run("sst2", "a", "fisher_t", "100:0.85 800:0.88", 0.88 + seed / 100)]
        # row b: per tensor ahead throughout; per tensor's runs also evaluated step 400, per weight's did not
        rows += [run("cola", "b", "fisher_w", "100:0.20 800:0.20", 0.20),
                 run("cola", "b", "fisher_t", "100:0.25 400:0.3 800:0.30", 0.30)]
    rows += [run("mrpc", "c", "fisher_w", "100:0.8 800:0.8", 0.8)] * 3  # per tensor never ran: no row
    rows += [run("mrpc", "c", "measured", "100:0.9 800:0.9", 0.9)] * 3  # another method: ignored
    rows += [run("sst2", "a", "fisher_t", "100:0.1 800:0.1", "")]  # unfinished: no metric, not counted
    got = gc.race(rows, seeds=3)
    assert got["sign_matches_final"] == {100: "1 of 2 rows", 800: "2 of 2 rows"}
    assert got["rows"]["sst2 a"] == {"final_w_minus_t": 0.02, "dev_w_minus_t_at_step": {100: -0.05, 800: 0.02}}
    assert got["rows"]["cola b"]["dev_w_minus_t_at_step"] == {100: -0.05, 800: -0.1}
    assert set(got["rows"]) == {"sst2 a", "cola b"}
    assert gc.race(rows, seeds=4)["rows"] == {}  # three seeds each: a row needs as many as asked
    bad = tmp_path / "r.csv"
    bad.write_text("task,budget,method,dev_curve,metric\nsst2,a,fisher_w,100-0.1,0.2\n")
    assert gc.main([str(bad)]) == 2
    assert "not a readable grid results.csv" in capsys.readouterr().err
    assert gc.main([str(tmp_path / "missing.csv")]) == 2
