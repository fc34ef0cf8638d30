import argparse
import csv
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from nasq.contract.cost import Budget
from nasq.contract.plan import Plan, make_plan
from nasq.contract.space import match_path
from nasq.errors import NasqError
from nasq.models.surgery import model_param_shapes
from nasq.report import inspect as rep
from nasq.report import plots

QUERY = "encoder.layer.0.attention.self.query"
FFN_OUT = "encoder.layer.1.output.dense"


def _bits(tensors):
    bits = [(4,) * t.num_groups for t in tensors]  # uniform 4 -> collapses to weight_bits
    paths = [t.path for t in tensors]
    bits[paths.index(QUERY)] = (0, 2, 4, 8)
    bits[paths.index(FFN_OUT)] = (8, 8, 2, 0)
    return bits


def _plan(tiny, bits):
    model, space, tensors = tiny
    return make_plan(tensors, bits, space=space,
                     budget=Budget(bytes=20_000, convention="encoder", source="budget_mb=0.02"),
                     param_shapes=model_param_shapes(model), provenance={"method": "test"})


@pytest.fixture(scope="module")
def plan_a(tiny):
    return _plan(tiny, _bits(tiny[2]))


@pytest.fixture(scope="module")
def plan_b(tiny):
    bits = _bits(tiny[2])
    paths = [t.path for t in tiny[2]]
    bits[paths.index(QUERY)] = (0, 2, 2, 8)  # group 2: 4 -> 2
    bits[paths.index("encoder.layer.1.attention.self.key")] = (8, 4, 4, 4)  # group 0: 4 -> 8
    return _plan(tiny, bits)


@pytest.fixture(scope="module")
def paths(tmp_path_factory, tiny, plan_a, plan_b):
    """plan files, a fake search run, a QAT run dir and a fake artifact dir."""
    from safetensors.numpy import save_file

    from nasq.export.format import manifest_digest as _manifest_digest

    model, space, tensors = tiny
    root = tmp_path_factory.mktemp("report")
    pa, pb = plan_a.save(root / "a.json"), plan_b.save(root / "b.json")
    # search run: alphas whose argmax is plan_a's bits
    run = root / "search"
    run.mkdir()
    rng = np.random.default_rng(0)
    alphas = {}
    for t, bb in zip(tensors, _bits(tensors), strict=True):
        a = rng.normal(size=(t.num_groups, len(t.choices))).astype(np.float32)
        for g, b in enumerate(bb):
            a[g, t.choices.index(b)] = 5.0
        alphas[t.path] = a
    save_file(alphas, str(run / "alphas.safetensors"))
    res = {"space_source": space.source, "space_name": space.name, "quant_mode": space.quant_mode,
           "budget": {"bytes": 20_000, "convention": "encoder", "source": "budget_mb=0.02", "fixed_bytes": 0},
           "cost_kind": "size", "cost_budget": 20_000, "fixed": space.fixed.model_dump(),
           "activations": space.activations.model_dump(),
           "tensors": [{"path": t.path, "rule": t.rule, "rows": t.rows, "cols": t.cols,
                        "group_sizes": list(t.group_sizes), "choices": list(t.choices), "has_bias": t.has_bias,
                        "kind": t.kind} for t in tensors],
           "param_shapes": {k: list(v) for k, v in model_param_shapes(model).items()}, "step": 40}
    (run / "search_result.json").write_text(json.dumps(res))
    with (run / "metrics.jsonl").open("w") as f:
        for s in range(10, 50, 10):
            f.write(json.dumps({"step": s, "tau": 1.0 / s, "lambda": 0.1 * s, "task_loss": 0.7 - s / 100,
                                "gate_loss": 0.8 - s / 100, "expected_cost": 2e4 + 100 * s,
                                "expected_mb": 0.02 + s / 1e4, "budget_mb": 0.02, "cost_ratio": 1.0,
                                "gate_entropy": 1.0}) + "\n")
        f.write('{"step": 5')  # partial line being written
    # QAT run
    qat = root / "qat"
    (qat / "model").mkdir(parents=True)
    plan_a.save(qat / "model" / "plan.json")
    # artifact: plan.json + a manifest with a valid self checksum
    art = root / "model.nasq"
    art.mkdir()
    plan_a.save(art / "plan.json")
    import hashlib

    plan_bytes = (art / "plan.json").read_bytes()
    m = {"format": "nasq-artifact", "version": 1, "task": "sst2", "num_labels": 2,
         "files": {**{n: {"bytes": 0, "sha256": hashlib.sha256(b"").hexdigest()}
                      for n in ("tensors.safetensors", "layout.json", "config.json")},
                   "plan.json": {"bytes": len(plan_bytes), "sha256": hashlib.sha256(plan_bytes).hexdigest()}},
         "tensor_bytes": plan_a.totals["artifact_tensor_bytes"], "predicted_bytes": plan_a.totals[
             "artifact_tensor_bytes"], "payload_vs_predicted": 1.0,
         "searched_tensor_bytes": plan_a.totals["searched_bytes"],
         "searched_predicted_bytes": plan_a.totals["searched_bytes"]}
    m["manifest_sha256"] = _manifest_digest(m)
    (art / "manifest.json").write_text(json.dumps(m))
    return {"a": pa, "b": pb, "search": run, "qat": qat, "artifact": art, "root": root}


def test_module_of():
    assert rep.module_of(QUERY) == (0, "q")
    assert rep.module_of("encoder.layer.11.attention.output.dense") == (11, "o")
    assert rep.module_of("encoder.layer.2.intermediate.dense") == (2, "ffn_in")
    assert rep.module_of(FFN_OUT) == (1, "ffn_out")
    assert rep.module_of("embeddings.word_embeddings") == (None, "embeddings")
    assert rep.module_of("pooler.dense") == (None, "pooler.dense")


def test_load_every_source(paths, plan_a):
    kinds = {k: rep.load_sourced_plan(paths[k]) for k in ("a", "search", "qat", "artifact")}
    assert [kinds[k].kind for k in kinds] == ["plan", "search", "finetune", "artifact"]
    for a in kinds.values():
        assert a.plan.bits_per_group() == plan_a.bits_per_group()
    assert "pre-repair argmax" in kinds["search"].note
    assert kinds["search"].plan.totals["fixed_bytes"] == plan_a.totals["fixed_bytes"]
    assert kinds["artifact"].manifest["tensor_bytes"] == plan_a.totals["artifact_tensor_bytes"]
    with pytest.raises(NasqError, match="no plan.json"):
        rep.load_sourced_plan(paths["root"] / "search" / "..")  # root: only loose plan files, no plan.json
    with pytest.raises(NasqError, match="not found"):
        rep.load_sourced_plan(paths["root"] / "missing")


def test_stats_and_budget(plan_a):
    st = {r["path"]: r for r in rep.tensor_stats(plan_a)}
    q = st[QUERY]
    assert q["histogram"] == {"0": 1, "2": 1, "4": 1, "8": 1}
    sizes = plan_a.tensor(QUERY).group_sizes
    assert q["avg_bits"] == pytest.approx(sum(r * b for r, b in zip(sizes, (0, 2, 4, 8))) / sum(sizes))
    assert q["pruned_frac"] == pytest.approx(sizes[0] / sum(sizes))
    assert sum(r["share"] for r in st.values()) == pytest.approx(1.0)
    order = [(r["layer"], r["module"]) for r in rep.tensor_stats(plan_a)]
    assert order[:6] == [(0, m) for m in ("q", "k", "v", "o", "ffn_in", "ffn_out")]
    bc = rep.budget_check(plan_a)
    t = plan_a.totals
    assert bc["encoder"]["budget_bytes"] == 20_000
    assert bc["artifact"]["budget_bytes"] == 20_000 + t["fixed_bytes"]
    assert bc["artifact"]["tensor_bytes"] == t["artifact_tensor_bytes"]
    assert bc["encoder"]["within"] == (t["searched_bytes"] <= 20_000)


def test_formats(paths, plan_a):
    table = rep.render(paths["a"], "table")
    assert "0:1 2:1 4:1 8:1" in table and "encoder convention" in table and "artifact convention" in table
    assert "pre-repair argmax" in rep.render(paths["search"], "table")
    assert "artifact manifest" in rep.render(paths["artifact"], "table")
    data = json.loads(rep.render(paths["a"], "json"))
    assert {r["path"] for r in data["tensors"]} == set(plan_a.paths)
    assert data["totals"]["searched_bytes"] == plan_a.totals["searched_bytes"]
    md = rep.render(paths["a"], "md").splitlines()
    hdr = next(i for i, ln in enumerate(md) if ln.startswith("| layer"))
    assert set(md[hdr + 1]) <= set("|-:")
    assert sum(ln.startswith("| ") for ln in md) == len(plan_a.tensors) + 1
    with pytest.raises(NasqError, match="unknown format"):
        rep.render(paths["a"], "xml")


def test_the_header_names_a_hessian_plans_recipe(plan_a, tmp_path):
    """A `nasq baseline fisher` plan is a hessian plan: the header says with which curvature and granularity; a
    provenance value that is not a short lowercase word (the file is untrusted) is left out."""
    fisher = tmp_path / "fisher.json"
    replace(plan_a, provenance={"method": "hessian", "curvature": "fisher", "granularity": "weight"}).save(fisher)
    assert f"plan: {fisher}  (method hessian, fisher curvature, per weight, space " in rep.render(fisher, "table")
    assert json.loads(rep.render(fisher, "json"))["recipe"] == ["fisher curvature", "per weight"]
    odd = tmp_path / "odd.json"
    replace(plan_a, provenance={"method": "hessian", "curvature": "x\n" * 40, "granularity": "group"}).save(odd)
    assert "(method hessian, per row group, space " in rep.render(odd, "table")
    assert rep.method_recipe({"method": "measured", "curvature": "fisher"}) == []
    blend = {"method": "hessian", "curvature": "fisher", "granularity": "weight"}
    assert rep.method_recipe({**blend, "shrinkage": 0.5})[-1] == "shrunk 0.5 toward per tensor"
    for odd_s in (2.0, "0.5", -1, float("nan"), True):  # not a shrinkage: left out
        assert rep.method_recipe({**blend, "shrinkage": odd_s}) == ["fisher curvature", "per weight"]


def test_rules_cover_every_tensor(plan_a):
    text = rep.format_rules(plan_a)
    assert text.startswith("# ") and "FIRST rule" in text
    rules = rep.parse_rules(text)
    for t in plan_a.tensors:
        first = next(r for r in rules if match_path(t.path, r["pattern"]))
        got = first["bits"] if "bits" in first else [first["weight_bits"]] * t.num_groups
        assert tuple(got) == t.bits, t.path
        assert not first.get("fixed")
    by_pat = {r["pattern"]: r for r in rules}
    assert by_pat[QUERY] == {"pattern": QUERY, "bits": [0, 2, 4, 8],
                             "group_sizes": list(plan_a.tensor(QUERY).group_sizes)}
    assert by_pat["encoder.layer.*.attention.self.key"] == {"pattern": "encoder.layer.*.attention.self.key",
                                                             "weight_bits": 4}
    assert "encoder.layer.1.attention.self.query" in by_pat  # layer 0 differs -> no merged glob for query
    assert rules[-1]["pattern"] == "**" and rules[-1]["fixed"]
    for other in ("pooler.dense", "classifier", "embeddings.position_embeddings"):
        assert next(r for r in rules if match_path(other, r["pattern"]))["fixed"]
    unmerged = rep.rules(plan_a, merge_layers=False, include_fixed=False)
    assert [r["pattern"] for r in unmerged] == [r["path"] for r in rep.tensor_stats(plan_a)]


def test_compare(paths, plan_a, plan_b):
    cmp = rep.compare_plans(paths["a"], paths["b"])
    d = {x["path"]: x for x in cmp["differ"]}
    assert set(d) == {QUERY, "encoder.layer.1.attention.self.key"}
    assert d[QUERY]["groups"] == [2] and d[QUERY]["bits_a"] == [4] and d[QUERY]["bits_b"] == [2]
    assert d[QUERY]["bytes_b"] < d[QUERY]["bytes_a"]
    assert d["encoder.layer.1.attention.self.key"]["groups"] == [0]
    assert cmp["identical"] == len(plan_a.tensors) - 2
    assert cmp["totals"]["searched_bytes"] == {"a": plan_a.totals["searched_bytes"],
                                               "b": plan_b.totals["searched_bytes"]}
    text = rep.format_compare(cmp)
    assert "2 tensors differ" in text and QUERY in text
    assert rep.compare_plans(paths["a"], paths["qat"])["differ"] == []
    assert rep.compare_plans(paths["a"], paths["qat"])["agreement"]["same_bits"] == 1.0
    ag = cmp["agreement"]
    assert ag["weights"] == sum(t.rows * t.cols for t in plan_a.tensors)
    assert 0.9 < ag["same_bits"] < 1.0 and "same bits on" in text


def test_bits_agreement_and_its_chance_level():
    from nasq.contract.plan import PlanTensor

    def t(bits, sizes=(2, 2)):
        return PlanTensor(path="x", kind="linear", rows=sum(sizes), cols=3, has_bias=False, group_sizes=sizes,
                          choices=(0, 2, 4, 8), bits=bits, pruned_groups=(), bytes=0)

    ag = rep.bits_agreement([t((2, 4))], [t((2, 8))])
    assert ag == {"weights": 12, "same_bits": 0.5, "chance": 0.25}  # p_A = {2: .5, 4: .5}, p_B = {2: .5, 8: .5}
    ag = rep.bits_agreement([t((4, 4))], [t((4, 4))])
    assert ag["same_bits"] == 1.0 and ag["chance"] == 1.0
    # tensors whose group layouts differ are not compared
    assert rep.bits_agreement([t((2, 4), (1, 3))], [t((2, 4))])["weights"] == 0


def _png_ok(p: Path) -> None:
    assert p.is_file() and p.stat().st_size > 5000
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_and_html(paths, tmp_path):
    files = plots.write_report(rep.load_sourced_plan(paths["search"]), tmp_path / "rep")
    assert set(files) == {"heatmap", "modules", "trajectory", "html"}
    for k in ("heatmap", "modules", "trajectory"):
        _png_ok(files[k])
    page = files["html"].read_text()
    for k in ("heatmap", "modules", "trajectory"):
        assert f'src="{files[k].name}"' in page
    assert "pre-repair argmax" in page
    files = plots.write_report(paths["a"], tmp_path / "plan")
    assert "trajectory" not in files


def test_heatmap_levels(plan_a):
    assert plots.bit_levels(plan_a) == [0, 1, 2, 3, 4, 8]


def test_pareto(tmp_path, monkeypatch):
    res = tmp_path / "results.csv"
    cols = ["task", "method", "budget", "metric_name", "metric", "encoder_mb", "artifact_mb"]
    with res.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for m, off in (("nasq", 0.02), ("uniform", 0.0)):
            for mb in (2.0, 4.0, 8.0):
                w.writerow(["sst2", m, f"mb={mb}", "accuracy", 0.8 + off + mb / 100, mb, mb + 1.5])
        w.writerow(["sst2", "fp32", "", "accuracy", 0.92, 85.0, ""])  # no artifact size -> auto uses encoder_mb
    _png_ok(plots.plot_pareto(res, tmp_path / "p.png"))
    _png_ok(plots.plot_pareto(tmp_path, tmp_path / "p2.png", size="artifact_mb"))
    # seeds of one (method, budget) are one point: mean ± sample std
    rows = [{"task": "sst2", "method": "nasq", "budget": "avg2", "encoder_mb": 2.7, "metric": m} for m in (0.8, 0.9)]
    rows.append({"task": "sst2", "method": "nasq", "budget": "avg4", "encoder_mb": 5.4, "metric": 0.91})
    pts = plots.pareto_points(rows, "encoder_mb")[("sst2", "nasq")]
    assert [(x, n) for x, _, _, n in pts] == [(2.7, 2), (5.4, 1)]
    assert abs(pts[0][1] - 0.85) < 1e-12 and abs(pts[0][2] - 0.0707107) < 1e-6 and pts[1][2] == 0.0
    _png_ok(plots.plot_pareto(rows, tmp_path / "p3.png", size="encoder_mb"))
    # `budgets` keeps those budgets' rows and the reference's; none of them left is an error, not an empty plot
    drawn, points = [], plots.pareto_points
    monkeypatch.setattr(plots, "pareto_points", lambda rs, size: drawn.append(rs) or points(rs, size))
    _png_ok(plots.plot_pareto(res, tmp_path / "p4.png", budgets=["mb=4.0"]))
    assert sorted((r["method"], r["budget"]) for r in drawn[0]) == [("fp32", ""), ("nasq", "mb=4.0"),
                                                                   ("uniform", "mb=4.0")]
    fig_tasks = []
    monkeypatch.setattr(plots, "_save", lambda fig, out: fig_tasks.append([a.get_title() for a in fig.axes]) or out)
    plots.plot_pareto([*drawn[0], {"task": "cola", "method": "fp32", "budget": "", "metric": 0.3,
                                   "encoder_mb": 85.0}], tmp_path / "p6.png", size="encoder_mb")
    assert fig_tasks == [["sst2"]]  # a task with only its teacher's row gets no empty panel
    with pytest.raises(NasqError, match="no result rows of budget"):
        plots.plot_pareto(res, tmp_path / "p5.png", budgets=["avg9"])
    # `methods` likewise keeps those methods' rows and the reference's
    drawn.clear()
    plots.plot_pareto(res, tmp_path / "p7.png", methods=["uniform"])
    assert {r["method"] for r in drawn[0]} == {"fp32", "uniform"}
    with pytest.raises(NasqError, match="no result rows of method"):
        plots.plot_pareto(res, tmp_path / "p8.png", methods=["nope"])
    bad = tmp_path / "bad" / "x.csv"
    bad.parent.mkdir()
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(NasqError, match="lack method"):
        plots.read_results(bad)


def test_method_styles_are_stable_and_distinct():
    many = [f"m{i:02d}" for i in range(25)]
    styles = plots.method_styles(many)
    assert len(set(styles.values())) == 25  # colour + marker unique beyond tab20's 20 colours
    assert len({c for c, _ in styles.values()}) == 20
    # a method's style does not depend on the order it is met in, so every panel draws it the same
    assert plots.method_styles(list(reversed(many))) == styles
    assert plots.method_styles(["uniform", "nasq", "uniform"]) == {"nasq": styles["m00"], "uniform": styles["m01"]}


def test_cli(paths, tmp_path, capsys, monkeypatch):
    import nasq.cli
    from nasq.commands import report

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    report.register(sub)
    for fmt in rep.FORMATS:
        args = parser.parse_args(["inspect", str(paths["artifact"]), "--format", fmt])
        assert args.fn(args) == 0
    out = capsys.readouterr().out
    assert "| layer" in out and '"weight_bits"' in out
    assert nasq.cli.main(["compare", str(paths["a"]), str(paths["b"])]) == 0
    assert "2 tensors differ" in capsys.readouterr().out
    assert nasq.cli.main(["plot", str(paths["qat"]), "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "report.html").is_file()
    res = tmp_path / "res.csv"
    res.write_text("task,method,budget,metric_name,metric,encoder_mb\nsst2,uniform,avg2,accuracy,0.8,2.7\n"
                   "sst2,uniform,avg4,accuracy,0.9,5.4\n")
    assert nasq.cli.main(["plot", "--pareto", str(res), "--out", str(tmp_path / "x.png"), "--budgets", "avg2"]) == 0
    assert (tmp_path / "x.png").is_file() and not (tmp_path / "x.png" / "pareto.png").exists()
    assert nasq.cli.main(["plot", "--pareto", str(res), "--out", str(tmp_path / "d"), "--budgets", "mb8"]) == 2
    assert "no result rows of budget(s) mb8" in capsys.readouterr().err
    assert nasq.cli.main(["plot", "--pareto", str(res), "--out", str(tmp_path / "m.png"), "--methods", "uniform"]) == 0
    assert nasq.cli.main(["plot", "--pareto", str(res), "--out", str(tmp_path / "n.png"), "--methods", "nasq"]) == 2
    assert "no result rows of method(s) nasq" in capsys.readouterr().err and not (tmp_path / "n.png").exists()
    assert nasq.cli.main(["inspect", str(tmp_path / "nothing")]) == 2
    assert "not found" in capsys.readouterr().err


def test_inspection_never_rewrites_its_sources(paths, plan_a, tmp_path, capsys):
    """`inspect` (every format), `compare` and `plot` read plan files and leave them as they were, byte for byte
    and untouched (same mtime); the plan file still loads as the plan that was saved."""
    import nasq.cli

    srcs = [paths["a"], paths["b"]]

    def snapshot():
        return [(p.read_bytes(), p.stat().st_mtime_ns) for p in srcs]

    before = snapshot()
    for fmt in rep.FORMATS:
        assert nasq.cli.main(["inspect", str(paths["a"]), "--format", fmt]) == 0, fmt
    assert nasq.cli.main(["compare", str(paths["a"]), str(paths["b"])]) == 0
    assert nasq.cli.main(["plot", str(paths["a"]), "--out", str(tmp_path / "plots")]) == 0
    capsys.readouterr()
    assert snapshot() == before
    assert Plan.load(paths["a"]).to_dict() == plan_a.to_dict()


# ------------------------------------------------------------------------------------------------ prediction


def _measured(tiny, path, scale=1.0, rows=256, drop=None):
    """A measured plan file whose damages are known: D_t(c) = scale * (i_t + 1) * (9 - c) (x1000 nats); ``drop``:
    ``(tensor path, width)`` left out of the table."""
    model, space, tensors = tiny
    table = {t.path: {str(c): scale * (i + 1) * (9 - c) for c in t.choices} for i, t in enumerate(tensors)}
    if drop:
        del table[drop[0]][str(drop[1])]
    p = make_plan(tensors, [(4,) * t.num_groups for t in tensors], space=space, budget=None,
                  param_shapes=model_param_shapes(model),
                  provenance={"method": "measured", "damage_kl_x1000": table, "rows": rows})
    return p.save(path)


def _want(tensors, bits, scale=1.0):
    return sum(scale * (i + 1) * (9 - b) * r / t.rows
               for i, (t, bb) in enumerate(zip(tensors, bits, strict=True)) for r, b in zip(t.group_sizes, bb))


def test_plan_prediction_is_the_additive_sum_beside_uniform(tiny, plan_a, tmp_path):
    from nasq.contract.cost import plan_size_bytes, uniform_plan
    from nasq.contract.damage import plan_prediction

    tensors = tiny[2]
    m = _measured(tiny, tmp_path / "m.json")
    pred = plan_prediction(plan_a, m)
    assert pred["plan_kl_x1000"] == pytest.approx(_want(tensors, _bits(tensors)))
    assert pred["rows"] == 256 and pred["source"] == str(m)
    assert pred["top_tensors"][0][1] == max(v for _, v in pred["top_tensors"])
    # uniform: the widest width whose uniform plan fits the plan's 20,000-byte budget, computed here by hand
    w = max(c for c in (1, 2, 4, 8) if c in tensors[0].choices
            and plan_size_bytes(tensors, uniform_plan(tensors, c)) <= 20_000)
    assert pred["uniform"]["bits"] == w
    assert pred["uniform"]["kl_x1000"] == pytest.approx(_want(tensors, uniform_plan(tensors, w)))
    assert pred["removed_share"] == pytest.approx(1 - pred["plan_kl_x1000"] / pred["uniform"]["kl_x1000"])
    # two measurements pool, weighted by their rows: (100 * 1 + 300 * 3) / 400 = 2.5 x the damages
    m3 = _measured(tiny, tmp_path / "m3.json", scale=3.0, rows=300)
    m1 = _measured(tiny, tmp_path / "m1.json", scale=1.0, rows=100)
    pooled = plan_prediction(plan_a, [m1, m3])
    assert pooled["plan_kl_x1000"] == pytest.approx(2.5 * pred["plan_kl_x1000"]) and pooled["rows"] == 400


def test_plan_prediction_needs_only_the_widths_the_plan_uses(tiny, plan_a, paths, tmp_path):
    from nasq.contract.damage import plan_prediction

    tensors = tiny[2]
    other = next(t.path for t in tensors if t.path not in (QUERY, FFN_OUT))  # every group at 4 bits in plan_a
    ok = plan_prediction(plan_a, _measured(tiny, tmp_path / "no8.json", drop=(other, 8)))
    assert ok["plan_kl_x1000"] == pytest.approx(_want(tensors, _bits(tensors)))
    # the uniform reference (8 bits fit this budget) lacks its width: the plan's own prediction stands
    assert ok["uniform"]["bits"] == 8 and ok["uniform"]["kl_x1000"] is None and ok["removed_share"] is None
    assert f"{other} at 8 bits" in ok["uniform"]["note"]
    assert "uniform 8-bit reference: not measured" in "\n".join(rep.prediction_lines(ok))
    with pytest.raises(NasqError, match=rf"no4\.json.*{other} at 4 bits"):
        plan_prediction(plan_a, _measured(tiny, tmp_path / "no4.json", drop=(other, 4)))
    bad = json.loads((tmp_path / "no8.json").read_text())
    del bad["provenance"]["damage_kl_x1000"][QUERY]
    (tmp_path / "noq.json").write_text(json.dumps(bad))
    with pytest.raises(NasqError, match=rf"noq\.json: no measured damage for tensor {QUERY}"):
        plan_prediction(plan_a, tmp_path / "noq.json")
    with pytest.raises(NasqError, match="not a measured plan"):
        plan_prediction(plan_a, paths["a"])
    # damages of a tensor the file does not describe (shape, groups) cannot be checked against the model
    from nasq.contract.damage import check_measured_plan

    full = Plan.load(tmp_path / "no8.json")
    untied = replace(full, tensors=tuple(t for t in full.tensors if t.path != QUERY))
    with pytest.raises(NasqError, match=rf"u\.json: it has damages of {QUERY} but not the tensor itself"):
        check_measured_plan(untied, [t.searched() for t in full.tensors], full.quant_mode, "u.json")
    # a row count that is not a positive integer is left out of the prediction (it only labels the printout)
    for i, rows in enumerate(("256", [1], True, 10**400)):
        pred = plan_prediction(plan_a, _measured(tiny, tmp_path / f"r{i}.json", rows=rows))
        assert pred["rows"] is None and "predicted output KL" in "\n".join(rep.prediction_lines(pred))


def test_cli_damage_from(paths, tiny, tmp_path, capsys):
    import nasq.cli

    m = str(_measured(tiny, tmp_path / "m.json"))
    assert nasq.cli.main(["inspect", str(paths["a"]), "--damage-from", m]) == 0
    out = capsys.readouterr().out
    assert "predicted output KL before QAT" in out and "-bit within the same budget" in out
    assert nasq.cli.main(["inspect", str(paths["artifact"]), "--format", "json", "--damage-from", f"{m},{m}"]) == 0
    got = json.loads(capsys.readouterr().out)["prediction"]
    assert got["plan_kl_x1000"] == pytest.approx(_want(tiny[2], _bits(tiny[2]))) and got["rows"] == 512
    assert nasq.cli.main(["compare", str(paths["a"]), str(paths["b"]), "--damage-from", m]) == 0
    out = capsys.readouterr().out
    assert out.count("predicted output KL before QAT") == 2 and "predicted output KL B - A" in out
    assert nasq.cli.main(["inspect", str(paths["a"]), "--format", "rules", "--damage-from", m]) == 2
    assert "rules format" in capsys.readouterr().err
    assert nasq.cli.main(["inspect", str(paths["a"]), "--damage-from", str(paths["b"])]) == 2
    assert "not a measured plan" in capsys.readouterr().err
