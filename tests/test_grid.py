"""experiments/grid.py end to end on a tiny grid: tiny BERT, SST-2 cut to 64 rows, one budget, fp32 + uniform + nasq
(2-3 steps per stage), then a rerun that recomputes nothing and a --collect-only rebuild of the table."""

import functools
import json
import re

import pytest
import yaml
from grid_support import REPO, TRAIN_COMMANDS, _grid, _grid_module, _rows


@pytest.mark.slow
def test_grid_end_to_end_resume_and_collect(grid_config):
    tmp, cfg = grid_config
    runs, results = tmp / "runs", tmp / "results"
    common = ["--config", str(cfg), "--runs", str(runs), "--results", str(results)]
    grid = functools.partial(_grid, cache=tmp / "jax_cache")

    # --dry-run prints every command and creates nothing
    r = grid(*common, "--dry-run")
    assert r.stdout.count("$ nasq ") == 1 + 4 + 4 + 5  # teacher; uniform, random: plan qat export eval; nasq +search
    assert not runs.exists() and not results.exists()

    # the grid minus the random baseline
    r = grid(*common, "--only", "method=fp32|uniform|nasq")
    cell = runs / "sst2" / "avg2"
    for m in ("uniform", "nasq"):
        for p in ("plan.json", "qat/run.json", "model.nasq/manifest.json", "eval.json", "timing.json"):
            assert (cell / m / p).is_file(), f"{m}/{p} missing"
        ev = json.loads((cell / m / "eval.json").read_text())
        assert {"fake_quant", "int_artifact", "prediction_agreement"} <= set(ev)
    assert (cell / "nasq" / "search" / "run.json").is_file()
    assert json.loads((runs / "sst2" / "fp32" / "run.json").read_text())["status"] == "done"
    assert not (cell / "random").exists()
    timing = json.loads((cell / "nasq" / "timing.json").read_text())
    assert set(timing) == {"search", "finalize", "qat", "export", "eval"}
    assert timing["qat"]["cmd"].startswith("nasq finetune --plan ") and timing["qat"]["wall_s"] > 0
    log = (runs / "grid.log").read_text()
    assert "$ nasq search --teacher" in log and "$ nasq eval" in log

    rows = _rows(results / "results.csv")
    assert set(rows) == {("sst2", "fp32", "fp32"), ("sst2", "avg2", "uniform"), ("sst2", "avg2", "random"),
                         ("sst2", "avg2", "nasq")}
    assert rows[("sst2", "avg2", "random")]["status"] == "not run"
    assert rows[("sst2", "avg2", "random")]["metric"] == ""
    for key in [("sst2", "fp32", "fp32"), ("sst2", "avg2", "uniform"), ("sst2", "avg2", "nasq")]:
        row = rows[key]
        assert row["status"] == "done", row
        assert row["metric_name"] == "accuracy"
        assert 0 <= float(row["metric"]) <= 1
        assert float(row["encoder_mb"]) > 0 and float(row["artifact_mb"]) > float(row["encoder_mb"])
        assert row["git_rev"] and row["date"]
    for m in ("uniform", "nasq"):
        row = rows[("sst2", "avg2", m)]
        plan = json.loads((cell / m / "plan.json").read_text())
        assert float(row["encoder_mb"]) == pytest.approx(plan["totals"]["encoder_linear_bytes"] / 1e6)
        assert float(row["avg_bits"]) == pytest.approx(plan["totals"]["avg_bits"], abs=1e-4)
        assert 0 <= float(row["fake_quant_metric"]) <= 1 and row["within_budget"] == "yes"
        assert row["command"].startswith("nasq finetune --plan ") and float(row["finetune_s"]) > 0
        assert float(row["search_s"]) > 0 and row["rank"] in ("1", "2")
    assert rows[("sst2", "fp32", "fp32")]["avg_bits"] == "32"
    md = (results / "results.md").read_text()
    assert "| sst2 | avg2 | random | not run |" in md and "**" in md
    # the summary: one line per (task, budget), methods in columns, nasq's rank among the measured ones
    assert "| task | metric | budget | fp32 teacher | uniform | random | nasq | nasq rank |" in md
    assert re.search(r"\| sst2 \| accuracy \| avg2 \| 0\.\d{4} \| (\*\*)?0\.\d{4}(\*\*)? \| not run \| "
                     r"(\*\*)?0\.\d{4}(\*\*)? \| [12] of 2 \|", md), md[:2000]
    assert (results / "pareto.png").is_file()

    # rerun: every cell is skipped, nothing recomputed
    watched = [cell / m / p for m in ("uniform", "nasq") for p in ("eval.json", "plan.json", "qat/run.json")]
    watched += [runs / "sst2" / "fp32" / "run.json"]
    mtimes = {p: p.stat().st_mtime_ns for p in watched}
    r = grid(*common, "--only", "method=fp32|uniform|nasq")
    assert "skip sst2/avg2/uniform" in r.stdout and "skip sst2/avg2/nasq" in r.stdout
    assert not any(f"$ {c}" in r.stdout for c in TRAIN_COMMANDS), r.stdout
    assert "0 command(s) run" in r.stdout
    assert {p: p.stat().st_mtime_ns for p in watched} == mtimes
    first = (results / "results.csv").read_text()

    # --collect-only rebuilds the same table from the run directories
    (results / "results.csv").unlink()
    (results / "results.md").unlink()
    r = grid(*common, "--collect-only")
    assert "$ nasq finetune" not in r.stdout
    assert (results / "results.csv").read_text() == first
    assert (results / "results.md").is_file()

    # recipe check of existing (e.g. adopted) runs, as reported in the notes column
    mod = _grid_module()
    assert mod.config_mismatches(cell / "nasq" / "qat", {"train.max_steps": 800, "train.seed": 0}) == \
        ["train.max_steps=2 (grid 800)"]

    # a failing stage: logged, the cell is "failed", the others keep their results, exit status 1
    bad = yaml.safe_load(cfg.read_text())
    bad["budgets"]["avg3"] = {"avg_bits": 3, "space": "tiny", "uniform": {"bits": 3}}  # tiny has no 3-bit choice
    bad_cfg = tmp / "grid_bad.yaml"
    bad_cfg.write_text(yaml.safe_dump(bad))
    r = grid("--config", str(bad_cfg), "--runs", str(runs), "--results", str(tmp / "results_bad"), "--no-plot",
             "--only", "budget=avg3,method=uniform", rc=1)
    assert "FAILED sst2/avg3/uniform plan" in r.stdout and "skip sst2/fp32" in r.stdout
    rows = _rows(tmp / "results_bad" / "results.csv")
    assert rows[("sst2", "avg3", "uniform")]["status"] == "failed: plan"
    assert rows[("sst2", "avg2", "nasq")]["status"] == "done"
    assert "may only take bits" in (runs / "sst2" / "avg3" / "uniform" / "logs" / "plan.log").read_text()


def test_grid_config_and_only_errors(tmp_path):
    grid = _grid_module()
    cfg = grid.load_grid(REPO / "experiments" / "grid.yaml")
    assert list(cfg["tasks"]) == ["sst2", "mrpc", "cola"]
    assert list(cfg["budgets"]) == ["avg2", "avg3", "avg4", "mb10"]
    cells = grid.all_cells(cfg, tmp_path / "runs", "G")
    assert len(cells) == 3 * (1 + 4 * 4)
    u3 = next(c for c in cells if (c.task, c.budget, c.method) == ("sst2", "avg3", "uniform"))
    plan_argv = u3.stages[0].argv
    assert plan_argv[plan_argv.index("--avg-bits") + 1] == "3" and plan_argv[plan_argv.index("--bits") + 1] == "3"
    ((space_path, text),) = u3.spaces.items()
    assert plan_argv[plan_argv.index("--space") + 1] == str(space_path)
    assert all(r["choices"] == [3] for r in yaml.safe_load(text)["rules"])
    mb = next(c for c in cells if (c.task, c.budget, c.method) == ("cola", "mb10", "nasq"))
    argv = mb.stages[0].argv
    assert argv[argv.index("--budget-mb") + 1] == "10" and argv[argv.index("--convention") + 1] == "artifact"
    assert argv[argv.index("--space") + 1] == "whole_model"
    qat = [c.stages[-3].argv for c in cells if c.task == "sst2" and c.method != "fp32" and c.stages]
    strip = [[a for a in q if "/avg" not in a and "/mb" not in a] for q in qat]
    assert all(s == strip[0] for s in strip)  # one QAT recipe for every method and budget

    only = grid.parse_only("task=sst2,method=nasq|uniform", cfg)
    assert only == {"task": {"sst2"}, "method": {"nasq", "uniform"}}
    teacher = next(c for c in cells if c.method == "fp32" and c.task == "sst2")
    assert grid.selected(teacher, grid.parse_only("budget=avg2", cfg))
    for bad, message in (("task=qnli", r"task: unknown \['qnli'\]"), ("bits=2", "unknown key 'bits'"),
                         ("sst2", "expected KEY=VALUE")):
        with pytest.raises(grid.GridError, match=message):
            grid.parse_only(bad, cfg)
    bad_cfg = tmp_path / "bad.yaml"
    bad_cfg.write_text(yaml.safe_dump({**yaml.safe_load((REPO / "experiments" / "grid.yaml").read_text()),
                                       "stages": {"qat": {"steps": 3}}}))
    with pytest.raises(grid.GridError, match="qat.*steps"):
        grid.load_grid(bad_cfg)


def test_protocol_seeds_equal_compute_and_summary(tmp_path):
    """protocol.yaml: one cell per seed in seed{N} dirs, baselines' QAT = nasq QAT + search steps, nasq QAT from
    its search, finalize spends the leftover; the seed summary claims a margin only beyond the spread."""
    grid = _grid_module()
    cfg = grid.load_grid(REPO / "experiments" / "protocol.yaml")
    cells = grid.all_cells(cfg, tmp_path / "runs", "G")
    quant = [c for c in cells if c.method != "fp32"]
    assert {c.seed for c in quant} == set(cfg["seeds"]) and len(quant) == len(cfg["seeds"]) * (
        len(cfg["methods"]) - 1) * len(cfg["budgets"]) * len(cfg["tasks"])
    rule = next(c for c in quant if (c.task, c.budget, c.method, c.seed) == ("sst2", "avg2.5", "rule", 0))
    plan_argv = rule.stages[0].argv
    assert plan_argv[:3] == ["nasq", "baseline", "rule"] and "--avg-bits" in plan_argv
    assert plan_argv[plan_argv.index("--rule-bits") + 1] == "attention_qkv=3,attention_output=3"
    assert next(c for c in quant if (c.budget, c.method) == ("avg2", "rule")).skip  # no rule for avg2
    mag = next(c for c in quant if (c.task, c.budget, c.method, c.seed) == ("cola", "avg2", "magnitude", 2))
    plan_argv = mag.stages[0].argv
    assert plan_argv[:3] == ["nasq", "baseline", "magnitude"] and plan_argv[plan_argv.index("--bits") + 1] == "4"
    assert plan_argv[plan_argv.index("--avg-bits") + 1] == "2" and "--teacher" in plan_argv
    assert next(s for s in mag.stages if s.name == "qat").argv[:2] == ["nasq", "finetune"]
    assert next(c for c in quant if (c.budget, c.method) == ("avg2.5", "magnitude")).skip  # no magnitude there

    def steps(argv):
        return int(argv[argv.index("--max-steps") + 1])

    u = next(c for c in quant if (c.budget, c.method, c.seed) == ("avg2", "uniform", 1))
    n = next(c for c in quant if (c.budget, c.method, c.seed) == ("avg2", "nasq", 1))
    assert u.dir == tmp_path / "runs" / "sst2" / "avg2" / "uniform" / "seed1" and u.label.endswith("/seed1")
    qat_u, qat_n = (next(s for s in c.stages if s.name == "qat").argv for c in (u, n))
    search = next(s for s in n.stages if s.name == "search").argv
    assert steps(qat_u) == steps(qat_n) + steps(search)
    assert qat_n[qat_n.index("--init-from") + 1] == str(n.dir / "search") and "--init-from" not in qat_u
    assert "--spend-leftover" in next(s for s in n.stages if s.name == "finalize").argv
    assert all(a[a.index("--seed") + 1] == "1" for a in (qat_u, qat_n, search))
    # nasq_hinit: the same seed's Hessian plan (the hessian cell's command) as the search's initial gates, then
    # nasq's stages and recipe (no extra QAT steps: it is a searched method)
    h = next(c for c in quant if (c.budget, c.method, c.seed) == ("avg2.5", "nasq_hinit", 1))
    hess = next(c for c in quant if (c.budget, c.method, c.seed) == ("avg2.5", "hessian", 1))
    assert [st.name for st in h.stages] == ["init_plan", "search", "finalize", "qat", "export", "eval"]
    init_argv, h_search = h.stages[0].argv, h.stages[1].argv
    assert init_argv[:init_argv.index("--out")] == hess.stages[0].argv[:hess.stages[0].argv.index("--out")]
    assert f"search.init_plan={h.dir / 'init_plan.json'}" in h_search and "search.gate_init=plan" in h_search
    h_qat = next(st for st in h.stages if st.name == "qat").argv
    assert steps(h_qat) == steps(qat_n) and h_qat[h_qat.index("--init-from") + 1] == str(h.dir / "search")
    # hessian_t: the hessian cell's command, per-tensor traces and the hessian_t stage's probes; a baseline's QAT
    ht = next(c for c in quant if (c.budget, c.method, c.seed) == ("avg2.5", "hessian_t", 1))
    ht_argv, hess_argv = ht.stages[0].argv, hess.stages[0].argv
    flag = {a: ht_argv[ht_argv.index(a) + 1] for a in ("--n-batches", "--n-probes", "--granularity", "--seed")}
    assert flag == {"--n-batches": "16", "--n-probes": "8", "--granularity": "tensor", "--seed": "1"}
    assert hess_argv[hess_argv.index("--n-probes") + 1] == "4" and "--granularity" not in hess_argv
    assert steps(next(st for st in ht.stages if st.name == "qat").argv) == steps(qat_u)
    mrpc_ht = next(c for c in quant if (c.task, c.budget, c.method, c.seed) == ("mrpc", "avg3", "hessian_t", 0))
    assert "model.max_len=112" in mrpc_ht.stages[0].argv  # the task's hessian settings carry over
    # fisher / fisher_t: the Gauss-Newton curvature on the fisher stage's rows, no probes; per group and per tensor
    for method, gran in (("fisher", None), ("fisher_t", "tensor"), ("fisher_w", "weight")):
        fc = next(c for c in quant if (c.budget, c.method, c.seed) == ("avg2.5", method, 1))
        fa = fc.stages[0].argv
        assert fa[:3] == ["nasq", "baseline", "hessian"] and fa[fa.index("--curvature") + 1] == "fisher"
        assert fa[fa.index("--n-batches") + 1] == "16" and "--n-probes" not in fa
        assert (fa[fa.index("--granularity") + 1] if "--granularity" in fa else None) == gran
        assert steps(next(st for st in fc.stages if st.name == "qat").argv) == steps(qat_u)
    # measured_fs: the measured command with its damages split by the Gauss-Newton traces; a baseline's QAT length
    mfs = next(c for c in quant if (c.budget, c.method, c.seed) == ("avg2.5", "measured_fs", 1))
    margv = mfs.stages[0].argv
    assert margv[:3] == ["nasq", "baseline", "measured"] and margv[margv.index("--spread") + 1] == "fisher"
    assert "--n-probes" not in margv
    assert steps(next(st for st in mfs.stages if st.name == "qat").argv) == steps(qat_u)
    # nasq_minit: the same with the same seed's measured plan, held with a logit of 8
    m = next(c for c in quant if (c.budget, c.method, c.seed) == ("avg1.5", "nasq_minit", 1))
    meas = next(c for c in quant if (c.budget, c.method, c.seed) == ("avg1.5", "measured", 1))
    assert [st.name for st in m.stages] == ["init_plan", "search", "finalize", "qat", "export", "eval"]
    m_init, m_search = m.stages[0].argv, m.stages[1].argv
    assert m_init[:m_init.index("--out")] == meas.stages[0].argv[:meas.stages[0].argv.index("--out")]
    assert m_init[:3] == ["nasq", "baseline", "measured"] and "--n-probes" not in m_init
    assert f"search.init_plan={m.dir / 'init_plan.json'}" in m_search and "search.init_plan_logit=8" in m_search
    # nasq_mprior / nasq_mprior10: the same measured plan, its damages the gate loss's prior (gates start uniform)
    for method, weight in (("nasq_mprior", None), ("nasq_mprior10", "10")):
        mp = next(c for c in quant if (c.budget, c.method, c.seed) == ("avg1.5", method, 1))
        mp_init, mp_search = mp.stages[0].argv, mp.stages[1].argv
        assert mp_init[:mp_init.index("--out")] == m_init[:m_init.index("--out")]
        assert f"search.damage_prior={mp.dir / 'init_plan.json'}" in mp_search
        assert "search.gate_init=plan" not in mp_search and "search.init_plan_logit=8" not in mp_search
        assert (f"search.damage_weight={weight}" in mp_search) == (weight is not None)
    # nasq_gumbel: nasq's stages and recipe with Gumbel-sampled gates in the search
    g = next(c for c in quant if (c.budget, c.method, c.seed) == ("avg2.5", "nasq_gumbel", 1))
    assert [st.name for st in g.stages] == ["search", "finalize", "qat", "export", "eval"]
    g_search = g.stages[0].argv
    n25 = next(c for c in quant if (c.budget, c.method, c.seed) == ("avg2.5", "nasq", 1)).stages[0].argv
    assert g_search[:g_search.index("--out")] == [*n25[:n25.index("--out")], "--set", "search.gumbel=true"]
    assert g_search[g_search.index("--out") + 1] == str(g.dir / "search")
    k = next(c for c in quant if (c.budget, c.method, c.seed) == ("avg2.5", "nasq_gkd", 1)).stages[0].argv
    assert k[:k.index("--out")] == [*n25[:n25.index("--out")], "--set", "search.gate_loss=task_kd"]
    k = next(c for c in quant if (c.budget, c.method, c.seed) == ("avg2.5", "nasq_gadam", 1)).stages[0].argv
    assert k[:k.index("--out")] == [*n25[:n25.index("--out")], "--set", "search.gate_optimizer=global_adam"]
    k = next(c for c in quant if (c.budget, c.method, c.seed) == ("avg2.5", "nasq_ge4", 1)).stages[0].argv
    assert k[:k.index("--out")] == [*n25[:n25.index("--out")], "--set", "search.gate_every=4"]
    k = next(c for c in quant if (c.budget, c.method, c.seed) == ("avg2.5", "nasq_ikd", 1)).stages[0].argv
    assert k[:k.index("--out")] == [*n25[:n25.index("--out")], "--set", "kd.hidden_beta=1", "--set",
                                    "kd.attention_beta=1", "--set", "search.gate_loss=task_kd"]
    # nasq_pm: nasq_ge4 searching per_matrix_w1234 where the budget's space is aqbert_128g_w1234; other spaces skip it
    n2 = next(c for c in quant if (c.budget, c.method, c.seed) == ("avg2_nopruning", "nasq", 1)).stages[0].argv
    k = next(c for c in quant if (c.budget, c.method, c.seed) == ("avg2_nopruning", "nasq_pm", 1)).stages[0].argv
    pm_space = ["per_matrix_w1234" if a == "aqbert_128g_w1234" else a for a in n2[:n2.index("--out")]]
    assert pm_space != n2[:n2.index("--out")] and k[:k.index("--out")] == [*pm_space, "--set", "search.gate_every=4"]
    # nasq_frozen: the gates alone on the frozen teacher; QAT from the teacher with a baseline's steps
    fz = next(c for c in quant if (c.budget, c.method, c.seed) == ("avg2.5", "nasq_frozen", 1))
    assert fz.stages[0].argv[:fz.stages[0].argv.index("--out")] == [
        *n25[:n25.index("--out")], "--set", "search.train_weights=false", "--set", "search.gate_loss=task_kd"]
    fz_qat = next(st for st in fz.stages if st.name == "qat").argv
    assert "--init-from" not in fz_qat and steps(fz_qat) == steps(qat_u)
    # nasq_pmfrozen: nasq_frozen's settings in nasq_pm's space, QAT from the teacher
    pf = next(c for c in quant if (c.budget, c.method, c.seed) == ("avg2_nopruning", "nasq_pmfrozen", 1))
    assert pf.stages[0].argv[:pf.stages[0].argv.index("--out")] == [
        *pm_space, "--set", "search.train_weights=false", "--set", "search.gate_loss=task_kd"]
    pf_qat = next(st for st in pf.stages if st.name == "qat").argv
    assert "--init-from" not in pf_qat and steps(pf_qat) == steps(qat_u)
    pm25 = next(c for c in quant if (c.budget, c.method, c.seed) == ("avg2.5", "nasq_pm", 1))
    assert not pm25.stages and "no space for aqbert_128g_w234" in pm25.skip
    # nasq_front: avg2_nopruning's nasq search of the same seed (the same stage, run there once), finalized at 1.5
    # bits, QAT from that search; budgets without front_from skip the method
    f = next(c for c in quant if (c.budget, c.method, c.seed) == ("avg1.5", "nasq_front", 1))
    src = next(c for c in quant if (c.budget, c.method, c.seed) == ("avg2_nopruning", "nasq", 1))
    assert [st.name for st in f.stages] == ["search", "finalize", "qat", "export", "eval"]
    assert f.stages[0].argv == next(st for st in src.stages if st.name == "search").argv
    fin = f.stages[1].argv
    assert fin[2] == str(src.dir / "search") and fin[fin.index("--avg-bits") + 1] == "1.5"
    assert fin[fin.index("--out") + 1] == str(f.dir / "plan.json") and "--spend-leftover" in fin
    f_qat = next(st for st in f.stages if st.name == "qat").argv
    assert steps(f_qat) == steps(qat_n) and f_qat[f_qat.index("--init-from") + 1] == str(src.dir / "search")
    assert next(c for c in quant if (c.budget, c.method) == ("avg2", "nasq_front")).skip
    assert grid.selected(u, grid.parse_only("seed=1", cfg)) and not grid.selected(u, grid.parse_only("seed=0", cfg))
    with pytest.raises(grid.GridError, match="seed"):
        grid.parse_only("seed=7", cfg)

    def row(method, seed, metric):
        return {"task": "sst2", "budget": "avg2", "method": method, "seed": seed, "metric_name": "accuracy",
                "status": "done", "metric": metric, "_seeded": True}

    rows = [row("uniform", s, v) for s, v in enumerate((0.80, 0.81, 0.82))]
    rows += [row("nasq", s, v) for s, v in enumerate((0.85, 0.86, 0.84))]
    (line,) = grid.seed_summary(rows)[2:]
    assert "**85.00 ± 1.00 (n=3)**" in line and "+4.00 vs uniform (beyond the spread)" in line
    assert "| accuracy (%) |" in line
    rows[3]["metric"] = 0.79  # nasq 0.79/0.86/0.84: mean 0.83, std 0.036 > margin 0.02
    assert "within the spread: no claim" in grid.seed_summary(rows)[2]
    assert grid.mean_std([1.0])[1] is None
    rows += [row("nasq_hinit", s, v) for s, v in enumerate((0.90, 0.91, 0.92))]
    line = grid.seed_summary(rows)[2]
    assert "nasq_hinit: +10.00 vs uniform (beyond the spread)" in line  # a searched method, not a baseline
    # Matthews in 3 decimals, rounded once from the exact mean (0.23150 -> 0.231, not 0.2315 -> 0.232)
    mcc = [dict(row("uniform", s, v), task="cola", metric_name="matthews")
           for s, v in enumerate((0.223299, 0.233032, 0.238164))]
    assert "**0.231 ± 0.008 (n=3)**" in grid.seed_summary(mcc)[2]
    assert grid.metric_text("matthews", -0.0123, signed=True) == "-0.012"

    bad = tmp_path / "bad.yaml"
    raw = yaml.safe_load((REPO / "experiments" / "protocol.yaml").read_text())
    avg = raw["budgets"]
    for patch, message in (
            ({"seeds": [0, 0]}, r"`seeds` must be a non-empty list of distinct integers, got \[0, 0\]"),
            ({"seeds": "0,1"}, "`seeds` must be a non-empty list of distinct integers, got '0,1'"),
            ({"protocol": {"equal_compute": "yes"}}, "`protocol.equal_compute` must be true or false"),
            ({"protocol": {"fair": True}}, "`protocol` must be a mapping with keys from"),
            ({"budgets": {**avg, "avg2.5": {**avg["avg2.5"], "rule": {"bits": 2}}}}, r"`budgets.avg2.5`.rule must be"),
            ({"budgets": {**avg, "avg2.5": {**avg["avg2.5"], "rule": {"bits": 2, "rule_bits": {"ffn_in": "3"}}}}},
             r"`budgets.avg2.5`.rule must be"),
            ({"budgets": {**avg, "avg2": {**avg["avg2"], "magnitude": {"bits": "4"}}}}, "`budgets.avg2`.magnitude must"),
            ({"budgets": {**avg, "avg2": {**avg["avg2"], "magnitude": {"bit": 4}}}}, "`budgets.avg2`.magnitude must"),
            ({"budgets": {**avg, "avg1.5": {**avg["avg1.5"], "front_from": "avg2"}}},
             "finalizes in its own space only"),
            ({"budgets": {**avg, "avg1.5": {**avg["avg1.5"], "front_from": "avg1.5"}}},
             "must be another budget that runs its own search")):
        bad.write_text(yaml.safe_dump({**raw, **patch}))
        with pytest.raises(grid.GridError, match=message):
            grid.load_grid(bad)


def test_uniform_same_as_shares_one_cell(tmp_path):
    """protocol.yaml's avg2.5 uniform 2-bit cell is avg2's (the same plan and recipe run once); a same_as that
    names a different plan is refused."""
    grid = _grid_module()
    cfg = grid.load_grid(REPO / "experiments" / "protocol.yaml")
    cells = grid.all_cells(cfg, tmp_path / "runs", "G")
    a, b = (next(c for c in cells if (c.budget, c.method, c.seed) == (bud, "uniform", 2)) for bud in ("avg2", "avg2.5"))
    assert b.dir == a.dir and [s.argv for s in b.stages] == [s.argv for s in a.stages] and "avg2 cell" in b.note
    assert b.label == "sst2/avg2.5/uniform/seed2"
    raw = yaml.safe_load((REPO / "experiments" / "protocol.yaml").read_text())
    bad = tmp_path / "bad.yaml"
    for same_as, match in (("avg4", "4-bit"), ("avg2.5", "another budget"), ("nope", "another budget")):
        raw["budgets"]["avg2.5"]["uniform"]["same_as"] = same_as
        bad.write_text(yaml.safe_dump(raw))
        with pytest.raises(grid.GridError, match=match):
            grid.load_grid(bad)
    # the magnitude cell is shared the same way (avg2_nopruning's is avg2's), but only at the same budget: its plan
    # is pruned to the budget
    m, m2 = (next(c for c in cells if (c.budget, c.method, c.seed) == (bud, "magnitude", 1))
             for bud in ("avg2", "avg2_nopruning"))
    assert m2.dir == m.dir and [s.argv for s in m2.stages] == [s.argv for s in m.stages] and "avg2 cell" in m2.note
    assert "--space" in m.stages[0].argv and "aqbert_128g" in m.stages[0].argv  # the 0-bit width of avg2's space
    raw = yaml.safe_load((REPO / "experiments" / "protocol.yaml").read_text())
    for budget, same_as, match in (("avg2_nopruning", "avg4", "runs magnitude 8-bit, not 4-bit"),
                                   ("avg2.5", "avg2", "only the same budget"),
                                   ("avg2_nopruning", "avg2_nopruning", "another budget")):
        raw["budgets"][budget]["magnitude"] = {"bits": 4, "same_as": same_as}
        bad.write_text(yaml.safe_dump(raw))
        with pytest.raises(grid.GridError, match=match):
            grid.load_grid(bad)
        raw = yaml.safe_load((REPO / "experiments" / "protocol.yaml").read_text())


def test_ray_scheduling_helpers(tmp_path, capsys):
    """Cells sharing a directory (uniform.same_as) run once; `resources` is validated; --ray with --dry-run is
    refused."""
    grid = _grid_module()
    cfg = grid.load_grid(REPO / "experiments" / "protocol.yaml")
    cells = grid.all_cells(cfg, tmp_path / "runs", "G")
    uniq = grid.unique_cells(cells)
    shared = sum("same_as" in (b.get(m) or {}) for b in cfg["budgets"].values() for m in grid.SHARABLE)
    # avg2.5's uniform cells are avg2's, on every task (and avg2_nopruning's uniform and magnitude cells)
    assert shared >= 1 and len(uniq) == len(cells) - shared * len(cfg["seeds"]) * len(cfg["tasks"])
    assert len({c.dir for c in uniq}) == len(uniq)
    assert grid.stage_cpus(cfg, "search", 2) == 2
    raw = yaml.safe_load((REPO / "experiments" / "protocol.yaml").read_text())
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({**raw, "resources": {"search": {"num_cpus": 4}}}))
    assert grid.stage_cpus(grid.load_grid(good), "search", 2) == 4.0
    bad = tmp_path / "bad.yaml"
    for res in ({"serach": {"num_cpus": 1}}, {"qat": {"num_cpus": 0}}, {"qat": {"gpus": 1}}, {"qat": 2}):
        bad.write_text(yaml.safe_dump({**raw, "resources": res}))
        with pytest.raises(grid.GridError, match="resources"):
            grid.load_grid(bad)
    assert grid.main(["--config", str(good), "--runs", str(tmp_path / "r"), "--ray", "--dry-run"]) == 2
    assert "drop --ray" in capsys.readouterr().err


def test_dev_curve_reads_eval_records(tmp_path):
    grid = _grid_module()
    m = tmp_path / "metrics.jsonl"
    m.write_text("\n".join(json.dumps(r) for r in (
        {"step": 50, "loss": 0.3}, {"step": 100, "split": "dev", "accuracy": 0.8},
        {"step": 100, "split": "dev", "accuracy": 0.81}, {"step": 200, "split": "dev", "accuracy": 0.85})) + "\nnot json\n")
    assert grid.dev_curve(m, "accuracy") == "100:0.8100 200:0.8500"
    assert grid.dev_curve(tmp_path / "missing.jsonl", "accuracy") == ""
    assert grid.dev_curve(m, "raw_accuracy") == ""  # no weight average: no raw curve
    # a QAT that averaged its weights (train.ema_decay) logs its raw weights' metric beside: both curves
    m.write_text("\n".join(json.dumps(r) for r in (
        {"step": 100, "split": "dev", "accuracy": 0.8, "raw_accuracy": 0.79},
        {"step": 200, "split": "dev", "accuracy": 0.82, "raw_accuracy": 0.85})))
    rows = [{"task": "sst2", "budget": "avg2", "method": "uniform", "dev_curve": grid.dev_curve(m, "accuracy"),
             "raw_dev_curve": grid.dev_curve(m, "raw_accuracy")}]
    assert rows[0]["raw_dev_curve"] == "100:0.7900 200:0.8500"
    table = grid.curve_table(rows)
    assert "| sst2 | avg2 | uniform | 100: 0.8000 (1), 200: 0.8200 (1) |" in table
    assert "| sst2 | avg2 | uniform (raw weights) | 100: 0.7900 (1), 200: 0.8500 (1) |" in table


def test_collect_keeps_finished_rows_whose_runs_are_elsewhere(tmp_path):
    """A fresh checkout has no run directories: --collect-only keeps the finished rows of the committed
    results.csv (with a note) instead of erasing them, and keeps nothing that was not finished."""
    grid = _grid_module()
    res = tmp_path / "results"
    res.mkdir()
    base = {c: "" for c in grid.CSV_COLUMNS}
    rows = [dict(base, task="sst2", budget="avg1.5", method="uniform", seed="0", status="done",
                 metric_name="accuracy", metric="0.8544", avg_bits="1.0", within_budget="yes", rank="2",
                 dev_curve="100:0.8000 800:0.8544", raw_weights_metric="0.85", raw_dev_curve="800:0.8500",
                 note="an old note"),
            dict(base, task="sst2", budget="avg1.5", method="nasq", seed="0", status="failed: qat",
                 metric_name="accuracy"),
            dict(base, task="sst2", budget="avg1.5", method="hessian", seed="0", status="done",
                 metric_name="accuracy", metric="0.86", avg_bits="1.6", within_budget="no", note="over budget"),
            dict(base, task="sst2", budget="avg2", method="uniform", seed="2", status="done",
                 metric_name="accuracy", metric="0.875", avg_bits="2.0", within_budget="yes"),
            dict(base, task="sst2", budget="fp32", method="fp32", seed="0", status="done", metric_name="accuracy",
                 metric="0.896789", avg_bits="32", finetune_s="1242.5")]
    with (res / "results.csv").open("w", newline="") as f:
        w = grid.csv.DictWriter(f, fieldnames=grid.CSV_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    args = ["--config", str(REPO / "experiments" / "protocol.yaml"), "--runs", str(tmp_path / "runs"),
            "--results", str(res), "--collect-only", "--no-plot"]
    for _ in range(2):  # a second collect does not stack the note
        assert grid.main(args) == 0
        with (res / "results.csv").open(newline="") as f:
            got = {(r["method"], r["seed"]): r for r in grid.csv.DictReader(f)
                   if (r["task"], r["budget"]) == ("sst2", "avg1.5")}
        kept = got[("uniform", "0")]
        assert (kept["status"], float(kept["metric"]), kept["within_budget"]) == ("done", 0.8544, "yes")
        assert kept["dev_curve"] == "100:0.8000 800:0.8544"
        assert (kept["raw_weights_metric"], kept["raw_dev_curve"]) == ("0.850000", "800:0.8500")
        assert kept["note"] == "an old note; kept from results.csv (its run directory is not on this machine)"
        assert got[("nasq", "0")]["status"] == "not run"
        over = got[("hessian", "0")]  # an over-budget kept row says so once, however often it is collected
        assert (over["within_budget"], over["note"]) == (
            "no", "over budget; kept from results.csv (its run directory is not on this machine)")
        teacher = next(r for r in grid.csv.DictReader((res / "results.csv").open(newline=""))
                       if r["method"] == "fp32" and r["task"] == "sst2")
        # written as a fresh teacher row is (32, not 32.0000): a kept row reads back as it was written
        assert (teacher["metric"], teacher["avg_bits"], teacher["finetune_s"]) == ("0.896789", "32", "1242.5")
        assert got[("uniform", "1")]["status"] == "not run"
        # avg2.5's uniform cell is avg2's (uniform.same_as): with no row of its own it takes avg2's
        shared = [r for r in grid.csv.DictReader((res / "results.csv").open(newline=""))
                  if (r["task"], r["method"], r["seed"]) == ("sst2", "uniform", "2")]
        assert {r["budget"]: (r["status"], float(r["metric"])) for r in shared
                if r["budget"] in ("avg2", "avg2.5")} == {"avg2": ("done", 0.875), "avg2.5": ("done", 0.875)}
    md = (res / "results.md").read_text()
    assert "85.44 (n=1)" in md  # the kept row counts in the summary
    (res / "results.csv").write_bytes(b"\xff\xfe not a csv")
    assert grid.main(args) == 0  # an unreadable old table: nothing kept, no crash
    with (res / "results.csv").open(newline="") as f:
        assert all(r["status"] != "done" for r in grid.csv.DictReader(f))


def test_extends_merges_a_grid_over_another(tmp_path):
    """`extends`: the file's keys merged over the base's (mappings key by key, the rest replaced), relative to
    the file; protocol_qat2x.yaml is protocol.yaml with the QAT doubled (baselines still get the search's steps
    on top); a missing base or a cycle is a GridError naming the file."""
    grid = _grid_module()
    base = grid.load_grid(REPO / "experiments" / "protocol.yaml")
    long = grid.load_grid(REPO / "experiments" / "protocol_qat2x.yaml")
    assert long["stages"]["qat"]["max_steps"] == 2 * base["stages"]["qat"]["max_steps"] + 300
    assert {k: v for k, v in long["stages"]["qat"].items() if k != "max_steps"} == {
        k: v for k, v in base["stages"]["qat"].items() if k != "max_steps"}
    assert long["budgets"] == base["budgets"] and long["seeds"] == base["seeds"]
    assert grid.qat_recipe(long, "cola", "uniform")["max_steps"] == 1600
    # protocol_hkd.yaml adds one `--set` to every QAT: merged into the base's `set` mapping, nothing lost
    hkd = grid.load_grid(REPO / "experiments" / "protocol_hkd.yaml")
    assert hkd["stages"]["qat"]["set"] == {**base["stages"]["qat"]["set"], "kd.hidden_beta": 1.0}
    assert {k: v for k, v in hkd["stages"].items() if k != "qat"} == {
        k: v for k, v in base["stages"].items() if k != "qat"}
    (tmp_path / "sub").mkdir()
    child = tmp_path / "sub" / "child.yaml"
    child.write_text(f"extends: {REPO / 'experiments' / 'protocol.yaml'}\nseeds: [7]\n")
    assert grid.load_grid(child)["seeds"] == [7]
    for text, match in (("extends: nope.yaml\n", "nope.yaml"), ("extends: child.yaml\n", "cycle"),
                        ("extends: [a]\n", "extends")):
        child.write_text(text)
        with pytest.raises(grid.GridError, match=match):
            grid.load_grid(child)


def test_pareto_commands_draw_artifact_budgets_apart(tmp_path):
    """protocol.yaml plots encoder bytes; its whole-artifact budgets (mb8, mb10) go to a second plot on artifact
    bytes, and a plot is drawn only for budgets with a finished row. A grid on artifact_mb keeps one plot."""
    grid = _grid_module()
    cfg = grid.load_grid(REPO / "experiments" / "protocol.yaml")
    cfg = {**cfg, "plot": {"size": cfg["plot"]["size"]}}  # without main_methods (the next test)
    res = tmp_path / "results.csv"
    res.write_text("task,budget,method,seed,status,metric\ncola,fp32,fp32,0,done,0.3\n"
                   "cola,avg2,uniform,0,done,0.2\ncola,mb8,measured,0,not run,\n"
                   "sst2,lat42,fisher_t,0,done,0.89\n")  # a latency budget: drawn on neither size axis
    cmds = grid.pareto_commands(cfg, res, tmp_path)
    assert cmds == [["nasq", "plot", "--pareto", str(res), "--out", str(tmp_path / "pareto.png"), "--size",
                     "encoder_mb", "--budgets", "avg2"]]
    res.write_text(res.read_text().replace("mb8,measured,0,not run,", "mb8,measured,0,done,0.25"))
    cmds = grid.pareto_commands(cfg, res, tmp_path)
    assert [c[5] for c in cmds] == [str(tmp_path / "pareto.png"), str(tmp_path / "pareto_artifact.png")]
    assert cmds[1][-3:] == ["artifact_mb", "--budgets", "mb8"]
    # one plot (artifact_mb): every size budget with a finished row, the latency budget not
    single = grid.pareto_commands({**cfg, "plot": {"size": "artifact_mb"}}, res, tmp_path)
    assert single == [["nasq", "plot", "--pareto", str(res), "--out", str(tmp_path / "pareto.png"), "--size",
                       "artifact_mb", "--budgets", "avg2,mb8"]]
    # a grid without latency budgets draws every budget on its one plot (no --budgets)
    no_lat = {**cfg, "budgets": {n: b for n, b in cfg["budgets"].items() if "latency_ms" not in b},
              "plot": {"size": "artifact_mb"}}
    assert grid.pareto_commands(no_lat, res, tmp_path) == [
        ["nasq", "plot", "--pareto", str(res), "--out", str(tmp_path / "pareto.png"), "--size", "artifact_mb"]]


def test_pareto_main_methods_draw_each_plot_again(tmp_path):
    """protocol.yaml's plot.main_methods: each plot is drawn a second time with only those methods."""
    grid = _grid_module()
    cfg = grid.load_grid(REPO / "experiments" / "protocol.yaml")
    main = cfg["plot"]["main_methods"]
    assert "fisher_t" in main and "uniform" in main and "nasq_hinit" not in main
    res = tmp_path / "results.csv"
    res.write_text("task,budget,method,seed,status,metric\ncola,avg2,uniform,0,done,0.2\n"
                   "cola,mb8,measured,0,done,0.25\n")
    cmds = grid.pareto_commands(cfg, res, tmp_path)
    assert [c[5] for c in cmds] == [str(tmp_path / f) for f in ("pareto.png", "pareto_artifact.png",
                                                               "pareto_main.png", "pareto_artifact_main.png")]
    assert cmds[2] == [*cmds[0][:5], str(tmp_path / "pareto_main.png"), *cmds[0][6:], "--methods", ",".join(main)]
    for bad in ({"main_methods": ["nope"]}, {"main_methods": "uniform"}, {"colour": "red"}):
        y = tmp_path / "g.yaml"
        y.write_text((REPO / "experiments" / "protocol.yaml").read_text().split("\nplot:")[0] +
                     f"\nplot: {bad!r}\n".replace("'", ""))
        with pytest.raises(grid.GridError, match="plot"):
            grid.load_grid(y)


def test_predict_rows_from_the_seeds_measured_plan(tiny, tmp_path):
    """Every plan of a (task, budget, seed) gets its predicted output KL from that seed's measured plan; rows
    without a measured sibling, or whose plan the measurement does not cover, keep what they had."""
    from nasq.contract.cost import Budget
    from nasq.contract.damage import plan_prediction
    from nasq.contract.plan import make_plan
    from nasq.models.surgery import model_param_shapes

    grid = _grid_module()
    model, space, tensors = tiny

    def plan(name, bits, method, damage=None):
        prov = {"method": method, **({"damage_kl_x1000": damage, "rows": 64} if damage else {})}
        p = make_plan(tensors, [(bits,) * t.num_groups for t in tensors], space=space,
                      budget=Budget(bytes=20_000, convention="encoder", source="budget_mb=0.02"),
                      param_shapes=model_param_shapes(model), provenance=prov)
        return p.save(tmp_path / f"{name}.json")

    damage = {t.path: {str(c): (i + 1.0) * (9 - c) for c in t.choices} for i, t in enumerate(tensors)}
    m0, u0 = plan("m0", 4, "measured", damage), plan("u0", 2, "uniform")
    partial = {p: {k: v for k, v in row.items() if k != "2"} for p, row in damage.items()}
    m1, u1 = plan("m1", 4, "measured", partial), plan("u1", 2, "uniform")  # seed 1 measured no 2-bit damage
    u2 = plan("u2", 2, "uniform")  # seed 2: no measured plan

    def row(method, seed, path):
        return {"task": "sst2", "budget": "avg2", "method": method, "seed": seed, "_plan_path": path}

    rows = [row("measured", 0, m0), row("uniform", 0, u0), row("measured", 1, m1), row("uniform", 1, u1),
            row("uniform", 2, u2), {"task": "sst2", "budget": "fp32", "method": "fp32", "seed": 0}]
    assert grid.predict_rows(rows) == 3
    want = plan_prediction(grid.Plan.load(u0), m0)
    assert rows[1]["predicted_kl"] == pytest.approx(want["plan_kl_x1000"])
    assert rows[1]["predicted_removed"] == pytest.approx(want["removed_share"])
    assert rows[0]["predicted_kl"] < rows[1]["predicted_kl"]  # 4 bits damage less than 2 under D(c) = 9 - c
    assert rows[2]["predicted_kl"] is not None and "predicted_kl" not in rows[3]  # 2-bit damage not measured
    assert "predicted_kl" not in rows[4] and "predicted_kl" not in rows[5]


def test_latency_budget_cells_and_rows(tiny, tmp_path, monkeypatch):
    """A latency budget: the sensitivity baselines and magnitude get `--latency-ms` and its table, uniform runs as a
    reference with no budget flag; a row's `latency_ms` is its plan's latency on the table, and that latency, not
    the plan's bytes, decides `within_budget`."""
    from nasq.contract.cost import (
        Budget,
        LatencyTable,
        load_latency_table,
        plan_latency_ms,
        save_latency_table,
    )
    from nasq.contract.plan import make_plan
    from nasq.models.surgery import model_param_shapes

    grid = _grid_module()
    model, space, tensors = tiny
    widths = sorted({b for t in tensors for b in t.choices if b})
    table = LatencyTable(tokens=128, fixed_ms=1.0,
                         ms_per_row={(t.cols, b): 0.01 * b for t in tensors for b in widths})
    save_latency_table(table, tmp_path / "lat.json")

    def bits(b):
        return [(b,) * t.num_groups for t in tensors]
    lo, hi = plan_latency_ms(tensors, bits(widths[0]), table), plan_latency_ms(tensors, bits(widths[-1]), table)
    budget = {"latency_ms": round((lo + hi) / 2, 3), "latency_table": str(tmp_path / "lat.json"), "space": "tiny",
              "uniform": {"bits": widths[-1]}, "magnitude": {"bits": widths[-1]}}
    cfg_path = tmp_path / "g.yaml"
    cfg_path.write_text(yaml.safe_dump({"model": "tiny", "tasks": ["sst2"], "budgets": {"lat": budget},
                                        "methods": ["uniform", "magnitude", "fisher_t"]}))
    cfg = grid.load_grid(cfg_path)
    cells = {c.method: c for c in grid.all_cells(cfg, tmp_path / "runs", "G")}
    for method in ("fisher_t", "magnitude"):
        argv = cells[method].stages[0].argv
        assert not cells[method].skip and argv[:3] == ["nasq", "baseline", "hessian" if method == "fisher_t" else method]
        assert argv[argv.index("--latency-ms") + 1] == grid._fmt(budget["latency_ms"])
        assert f"search.latency_table={tmp_path / 'lat.json'}" in argv
    uniform = cells["uniform"].stages[0].argv
    assert not {"--latency-ms", "--avg-bits", "--budget-mb", "--ratio"} & set(uniform)

    for method, b in (("uniform", widths[-1]), ("fisher_t", widths[0])):
        cells[method].dir.mkdir(parents=True)
        make_plan(tensors, bits(b), space=space, param_shapes=model_param_shapes(model),
                  budget=Budget(bytes=10**9, convention="encoder", source="budget_mb=1000"),
                  provenance={"method": method}).save(cells[method].dir / "plan.json")
    reads = []
    monkeypatch.setattr(grid, "load_latency_table", lambda p: reads.append(p) or load_latency_table(p))
    rows = {m: grid.cell_row(cfg, cells[m], "2026-12-04") for m in ("uniform", "fisher_t")}
    assert rows["uniform"]["latency_ms"] == pytest.approx(hi) and rows["uniform"]["within_budget"] is False
    assert rows["fisher_t"]["latency_ms"] == pytest.approx(lo) and rows["fisher_t"]["within_budget"] is True
    assert len(reads) == 1  # the rows of a budget share one read of its table
    save_latency_table(LatencyTable(tokens=128, fixed_ms=2.0, ms_per_row=table.ms_per_row), tmp_path / "lat.json",
                       overwrite=True)  # a table rewritten since is read again
    assert grid.cell_row(cfg, cells["fisher_t"], "2026-12-04")["latency_ms"] == pytest.approx(lo + 1.0)

    for bad, match in (({"latency_ms": 5.0}, "both or neither"), ({"latency_ms": -1.0, "latency_table": "t.json"},
                                                                  "> 0"),
                       ({"latency_ms": 5.0, "latency_table": "t.json", "avg_bits": 2}, "exactly one of")):
        cfg_path.write_text(yaml.safe_dump({"model": "tiny", "tasks": ["sst2"], "methods": ["fisher_t"],
                                            "budgets": {"lat": {"space": "tiny", **bad}}}))
        with pytest.raises(grid.GridError, match=match):
            grid.load_grid(cfg_path)
    (tmp_path / "lat.json").unlink()
    with pytest.raises(grid.GridError, match="latency table .* not found"):
        grid.cell_row(cfg, cells["uniform"], "2026-12-04")
