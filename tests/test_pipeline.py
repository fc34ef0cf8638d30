"""`nasq pipeline` end to end on the tiny model: every stage, summary numbers, resume skips finished stages."""

import json

import pytest

from nasq.cli import main
from nasq.pipeline import run_pipeline


def _layers(tiny_model_dir, glue_dir):
    return [("test", {"model": {"name": str(tiny_model_dir), "max_len": 32},
                      "data": {"data_dir": str(glue_dir), "train_subset": 96, "buckets": [32]},
                      "train": {"max_steps": 3, "batch_size": 16, "log_every": 1},
                      "search": {"space": "tiny"}})]


@pytest.mark.slow
def test_pipeline_end_to_end_and_resume(tiny_model_dir, glue_dir, tmp_path, capsys):
    out = tmp_path / "pipe"
    s = run_pipeline(out, preset="smoke", user_layers=_layers(tiny_model_dir, glue_dir), log=lambda *a: None,
                     allocator="search")
    for part in ("teacher/model/state.safetensors", "search/alphas.safetensors", "plan.json",
                 "qat/model/plan.json", "model.nasq/manifest.json", "summary.json"):
        assert (out / part).exists(), part
    assert s["artifact_vs_predicted"] == 1.0 and s["artifact_tensor_bytes"] == s["predicted_bytes"]
    assert s["fake_quant_vs_int_agreement"] >= 0.995
    assert s["plan_totals"]["within_budget"] and s["dev_rows"] == 872
    assert json.loads((out / "summary.json").read_text())["int_artifact"] == s["int_artifact"]
    acc = s["int_artifact"]["accuracy"]
    assert f"accuracy {acc:.4f}" in (out / "model.nasq" / "README.md").read_text()  # the card: int-path metrics
    # resume: every stage is complete, nothing is retrained (checkpoints and plan untouched)
    stamp = {p: p.stat().st_mtime_ns for p in [out / "plan.json", out / "qat" / "run.json", out / "search" / "run.json"]}
    run_pipeline(out, preset="smoke", user_layers=_layers(tiny_model_dir, glue_dir), resume=True,
                 log=lambda *a: None, allocator="search")
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp

    # `nasq eval` on the QAT run (fake-quant), and side by side with the artifact (integer path)
    capsys.readouterr()
    assert main(["eval", str(out / "qat"), "--data-dir", str(glue_dir)]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["dev_rows"] == 872 and ev["accuracy"] == s["fake_quant"]["accuracy"]
    assert main(["eval", str(out / "qat"), "--artifact", str(out / "model.nasq"), "--data-dir", str(glue_dir)]) == 0
    cmp = json.loads(capsys.readouterr().out)
    assert cmp["int_artifact"] == s["int_artifact"] and cmp["prediction_agreement"] >= 0.995
    assert main(["eval", "--data-dir", str(glue_dir)]) == 2
    assert "RUN directory or --artifact" in capsys.readouterr().err


@pytest.mark.slow
def test_pipeline_with_the_measured_allocator(tiny_model_dir, glue_dir, tmp_path):
    """--allocator measured: no search run; the plan is the (here refined) measured allocation within the budget
    on the preset's batches, QAT'd, exported and evaluated like a searched one; resuming with the other allocator
    is refused, nothing lost."""
    from nasq.contract.plan import Plan
    from nasq.errors import NasqError

    out = tmp_path / "pipe"
    layers = _layers(tiny_model_dir, glue_dir)
    layers[0][1]["search"]["avg_bits"] = 3
    s = run_pipeline(out, preset="smoke", user_layers=layers, log=lambda *a: None, allocator="measured",
                     refine_rounds=1, measure_batches=1)
    plan = Plan.load(out / "plan.json")
    assert not (out / "search").exists() and s["allocator"] == "measured"
    assert plan.provenance["method"] == "measured" and plan.provenance["refine_rounds"] == 1
    assert plan.provenance["n_batches"] == 1
    assert s["plan_totals"]["within_budget"] and s["artifact_vs_predicted"] == 1.0
    stamp = (out / "plan.json").stat().st_mtime_ns
    with pytest.raises(NasqError, match="was made by 'measured'"):
        run_pipeline(out, preset="smoke", user_layers=layers, resume=True, log=lambda *a: None, allocator="search")
    assert (out / "plan.json").stat().st_mtime_ns == stamp and not (out / "search").exists()


def test_each_size_allocator_runs_on_its_presets_batches():
    """The Fisher allocator sums its traces over the protocol's 16 batches in the quick preset, the measured one
    measures on 8; --measure-batches overrides either."""
    from nasq.pipeline import PRESETS, allocation_batches

    assert allocation_batches(PRESETS["quick"], "fisher") == 16
    assert allocation_batches(PRESETS["quick"], "measured") == 8
    assert allocation_batches(PRESETS["quick"], "fisher", 3) == 3
    assert allocation_batches(PRESETS["smoke"], "measured", 3) == 3
    assert all(allocation_batches(p, a) >= 1 for p in PRESETS.values() for a in ("measured", "fisher"))


@pytest.mark.slow
def test_pipeline_with_the_fisher_allocator(tiny_model_dir, glue_dir, tmp_path):
    """The default allocator, fisher: the per-tensor Gauss-Newton plan on the preset's batches, within the budget,
    QAT'd, exported and evaluated; resuming with another allocator is refused and names the one that made the
    plan."""
    from nasq.contract.plan import Plan
    from nasq.errors import NasqError
    from nasq.pipeline import plan_allocator

    out = tmp_path / "pipe"
    layers = _layers(tiny_model_dir, glue_dir)
    layers[0][1]["search"]["avg_bits"] = 3
    s = run_pipeline(out, preset="smoke", user_layers=layers, log=lambda *a: None, measure_batches=1)
    prov = Plan.load(out / "plan.json").provenance
    assert not (out / "search").exists() and s["allocator"] == "fisher" and plan_allocator(prov) == "fisher"
    assert (prov["method"], prov["curvature"], prov["granularity"], prov["n_batches"]) == ("hessian", "fisher",
                                                                                          "tensor", 1)
    assert s["plan_totals"]["within_budget"] and s["artifact_vs_predicted"] == 1.0
    with pytest.raises(NasqError, match="was made by 'fisher', not by --allocator measured; resume with "
                                        "--allocator fisher"):
        run_pipeline(out, preset="smoke", user_layers=layers, resume=True, log=lambda *a: None,
                     allocator="measured")
    stamp = (out / "plan.json").stat().st_mtime_ns
    with pytest.raises(NasqError, match="made by the fisher allocator per tensor, not per weight; resume with "
                                        "--granularity tensor"):
        run_pipeline(out, preset="smoke", user_layers=layers, resume=True, log=lambda *a: None, granularity="weight")
    assert (out / "plan.json").stat().st_mtime_ns == stamp
    # per weight, from the same teacher: its plan records the errors it was solved with
    per_weight = tmp_path / "pipe_w"
    s = run_pipeline(per_weight, preset="smoke", user_layers=layers, teacher=str(out / "teacher"),
                     log=lambda *a: None, measure_batches=1, granularity="weight")
    prov = Plan.load(per_weight / "plan.json").provenance
    assert (prov["granularity"], plan_allocator(prov)) == ("weight", "fisher") and "weighted_errors" in prov
    assert s["plan_totals"]["within_budget"] and s["artifact_vs_predicted"] == 1.0
    stamp = (per_weight / "plan.json").stat().st_mtime_ns
    with pytest.raises(NasqError, match="made with --shrinkage 0.0, not 0.5; resume with --shrinkage 0.0"):
        run_pipeline(per_weight, preset="smoke", user_layers=layers, resume=True, log=lambda *a: None,
                     measure_batches=1, granularity="weight", shrinkage=0.5)
    assert (per_weight / "plan.json").stat().st_mtime_ns == stamp
    # shrunk all the way toward per tensor (--shrinkage 1): the per-tensor plan's bits, recorded as shrunk
    shrunk = tmp_path / "pipe_s"
    run_pipeline(shrunk, preset="smoke", user_layers=layers, teacher=str(out / "teacher"), log=lambda *a: None,
                 measure_batches=1, granularity="weight", shrinkage=1.0)
    plan_s = Plan.load(shrunk / "plan.json")
    assert (plan_s.provenance["granularity"], plan_s.provenance["shrinkage"]) == ("weight", 1.0)
    assert plan_s.bits_per_group() == Plan.load(out / "plan.json").bits_per_group()
    assert plan_allocator({"method": "nasq-search"}) == "search"
    assert plan_allocator({"method": "hessian", "curvature": "hutchinson"}) == "hessian"


@pytest.mark.slow
def test_pipeline_searched_embeddings_artifact_budget(tiny_model_dir, glue_dir, tmp_path):
    """What the grid's whole-artifact cells run: word embeddings searched (pruned rows embed to zero), a
    whole-artifact MB budget; the finalized plan fits it, the artifact's bytes are predicted exactly and the
    integer path agrees with fake-quant."""
    space = tmp_path / "tiny_whole.yaml"
    space.write_text(
        "name: tiny_whole\ndescription: tiny + word embeddings\nquant_mode: symmetric\n"
        "activations: {bits: 8, granularity: per_token}\n"
        "fixed: {word_embeddings_bits: 8, other_embeddings_bits: 32, unsearched_linear_bits: 32}\n"
        "rules:\n"
        "  - {name: enc, patterns: ['encoder.layer.*.*.*.*', 'encoder.layer.*.*.dense'], groups: 4, choices: [0, 2, 4, 8]}\n"
        "  - {name: emb, patterns: ['embeddings.word_embeddings'], groups: 8, choices: [0, 2, 4, 8]}\n")
    layers = _layers(tiny_model_dir, glue_dir)
    layers[0][1]["search"] = {"space": str(space), "avg_bits": None, "budget_mb": 0.5, "convention": "artifact"}
    s = run_pipeline(tmp_path / "pipe", preset="smoke", user_layers=layers, log=lambda *a: None, allocator="search")
    plan = json.loads((tmp_path / "pipe" / "plan.json").read_text())
    emb = [t for t in plan["tensors"] if t["path"] == "embeddings.word_embeddings"]
    assert len(emb) == 1 and len(emb[0]["bits"]) == 8
    assert s["plan_totals"]["within_budget"] and s["plan_totals"]["artifact_tensor_bytes"] <= 500_000
    assert s["artifact_vs_predicted"] == 1.0 and s["fake_quant_vs_int_agreement"] >= 0.995


def test_preset_subset_is_a_cap(glue_dir):
    """`--preset quick` (8,000 train rows) on MRPC (3,667 in this copy) uses every row instead of failing; a user's own
    --train-subset is left alone; SST-2 keeps the preset's subset."""
    from nasq.pipeline import PRESETS, fit_preset_to_task, stage_config

    quick = PRESETS["quick"]
    said = []
    mrpc = [("user", {"data": {"task": "mrpc", "data_dir": str(glue_dir)}})]
    fitted = fit_preset_to_task(quick, stage_config(quick, "finetune", mrpc), mrpc, said.append)
    assert stage_config(fitted, "qat", mrpc).data.train_subset is None and "3,667 train rows" in said[0]
    assert quick["common"]["data"]["train_subset"] == 8000  # the preset itself is not modified
    own = [("user", {"data": {"task": "mrpc", "data_dir": str(glue_dir), "train_subset": 9000}})]
    assert stage_config(fit_preset_to_task(quick, stage_config(quick, "finetune", own), own), "qat",
                        own).data.train_subset == 9000
    sst2 = [("user", {"data": {"task": "sst2", "data_dir": str(glue_dir)}})]
    assert stage_config(fit_preset_to_task(quick, stage_config(quick, "finetune", sst2), sst2), "qat",
                        sst2).data.train_subset == 8000


def test_user_budget_replaces_the_presets(glue_dir):
    """The preset's avg-bits budget is a default: a budget the user gives (`--set search.latency_ms=T`,
    `search.budget_mb=M`, ...) replaces it instead of failing as a second budget; the preset is not modified."""
    from nasq.pipeline import PRESETS, fit_preset_to_task, stage_config

    smoke = PRESETS["smoke"]
    for key, value in (("latency_ms", 40.0), ("budget_mb", 3.0), ("ratio", 8.0), ("avg_bits", 3.0)):
        user = [("user", {"data": {"data_dir": str(glue_dir)}, "search": {key: value}})]
        s = stage_config(fit_preset_to_task(smoke, stage_config(smoke, "finetune", user), user), "search", user).search
        assert getattr(s, key) == value
        assert [k for k in ("budget_mb", "avg_bits", "ratio", "latency_ms") if getattr(s, k) is not None] == [key]
    assert smoke["search"]["search"] == {"avg_bits": 2.0}
    plain = [("user", {"data": {"data_dir": str(glue_dir)}})]  # no budget given: the preset's
    assert stage_config(fit_preset_to_task(smoke, stage_config(smoke, "finetune", plain), plain), "search",
                        plain).search.avg_bits == 2.0


def test_preset_max_len_from_task(glue_dir):
    """The preset's max length 64 cuts a fifth of MRPC (pairs up to 103 tokens): the fitted preset holds the
    longest example, rounded up to 16; CoLA's short sentences get a shorter one; a user's max_len stays."""
    from nasq.data.batching import encode
    from nasq.data.glue import load_split
    from nasq.models.loading import load_tokenizer, resolve_model_dir
    from nasq.pipeline import PRESETS, fit_preset_to_task, stage_config

    quick = PRESETS["quick"]
    said = []
    mrpc = [("user", {"data": {"task": "mrpc", "data_dir": str(glue_dir)}})]
    cfg = stage_config(fit_preset_to_task(quick, stage_config(quick, "finetune", mrpc), mrpc, said.append), "qat",
                       mrpc)
    assert cfg.model.max_len == 112 and any("max length 112" in m for m in said)
    dev = load_split("mrpc", "dev", glue_dir)
    tok = load_tokenizer(resolve_model_dir("minilm-l6"))
    assert encode(dev, tok, "mrpc", 64).num_truncated > 50  # what the preset's 64 did
    assert encode(dev, tok, "mrpc", cfg.model.max_len).num_truncated == 0
    cola = [("user", {"data": {"task": "cola", "data_dir": str(glue_dir)}})]
    assert stage_config(fit_preset_to_task(quick, stage_config(quick, "finetune", cola), cola), "qat",
                        cola).model.max_len == 48
    own = [("user", {"data": {"task": "mrpc", "data_dir": str(glue_dir)}, "model": {"max_len": 64}})]
    assert stage_config(fit_preset_to_task(quick, stage_config(quick, "finetune", own), own), "qat",
                        own).model.max_len == 64


def test_truncation_note(glue_dir):
    from nasq.config import build_config
    from nasq.data.tasks import load_task_data

    cfg = build_config(("t", {"data": {"task": "mrpc", "data_dir": str(glue_dir), "train_subset": 400},
                              "model": {"max_len": 64}}))
    note = load_task_data(cfg).truncation_note(64)
    assert note.startswith("warning: model.max_len 64 truncates") and "dev rows" in note and "mrpc" in note
    cfg = build_config(("t", {"data": {"task": "cola", "data_dir": str(glue_dir), "train_subset": 400},
                              "model": {"max_len": 64}}))
    assert load_task_data(cfg).truncation_note(64) is None


def test_stage_sections():
    """`stages.<stage>` applies to one stage only; the common part to all; a bad stage name is a clear error."""
    from nasq.errors import NasqError
    from nasq.pipeline import PRESETS, stage_config

    smoke = PRESETS["smoke"]
    layers = [("--set", {"train": {"lr": 1e-4}, "stages": {"qat": {"train": {"max_steps": 7}}}})]
    assert stage_config(smoke, "qat", layers).train.max_steps == 7
    assert stage_config(smoke, "search", layers).train.max_steps == 16  # the preset's
    assert all(stage_config(smoke, s, layers).train.lr == 1e-4 for s in ("finetune", "search", "qat"))
    with pytest.raises(NasqError, match="stages"):
        stage_config(smoke, "qat", [("--set", {"stages": {"qta": {"train": {"max_steps": 7}}}})])


def test_allocators_check_their_budget_before_any_stage(tiny_model_dir, glue_dir, tmp_path):
    """A latency budget without its table, or with a missing one, is refused with what to do, before the teacher
    is trained or --out is created; so is an unknown allocator, and options of another allocator."""
    from nasq.errors import NasqError

    layers = _layers(tiny_model_dir, glue_dir)
    layers[0][1]["search"].update(latency_ms=5.0)  # replaces the preset's avg_bits
    with pytest.raises(NasqError, match="needs a latency table.*nasq profile"):
        run_pipeline(tmp_path / "pipe", preset="smoke", user_layers=layers, log=lambda *a: None)
    layers[0][1]["search"].update(latency_table=str(tmp_path / "lat.json"))
    with pytest.raises(NasqError, match="lat.json not found"):
        run_pipeline(tmp_path / "pipe", preset="smoke", user_layers=layers, log=lambda *a: None)
    assert not (tmp_path / "pipe").exists()
    for options, message in [
            ({"allocator": "hessian"}, "unknown allocator"),
            ({"allocator": "search", "refine_rounds": 1}, "--refine-rounds is for the measured baseline, not search"),
            ({"allocator": "search", "measure_batches": 4},
             "--measure-batches is for the measured and fisher allocators, not search"),
            ({"measure_batches": 0}, "--measure-batches must be an integer >= 1, got 0"),
            ({"allocator": "measured", "granularity": "weight"}, "--granularity is for the fisher allocator, not measured"),
            ({"granularity": "row"}, "--granularity must be one of group, tensor, weight, got 'row'"),
            ({"allocator": "measured", "shrinkage": 0.5}, "--shrinkage is for the fisher allocator, not measured"),
            ({"shrinkage": 0.5}, "--shrinkage blends .* it needs --granularity weight"),
            ({"granularity": "weight", "shrinkage": 1.5}, r"--shrinkage must be a number in \[0, 1\]"),
            ({"allocator": "measured", "refine_rounds": -1}, "--refine-rounds must be >= 0")]:
        with pytest.raises(NasqError, match=message):
            run_pipeline(tmp_path / "pipe", preset="smoke", user_layers=_layers(tiny_model_dir, glue_dir), **options)
    assert not (tmp_path / "pipe").exists()


def _smoke_configs(tiny_model_dir, glue_dir, tmp_path, extra: dict):
    """``(pipeline_configs, what it said)`` of the smoke preset on the tiny model, with ``extra`` in the user's layer."""
    from nasq.pipeline import PRESETS, pipeline_configs

    layer = {"model": {"name": str(tiny_model_dir), "max_len": 32},
             "data": {"data_dir": str(glue_dir), "train_subset": 96}, **extra}
    said: list[str] = []
    return pipeline_configs(PRESETS["smoke"], [("test", layer)], tmp_path / "p", None, said.append), said


def test_space_follows_the_budget(tiny_model_dir, glue_dir, tmp_path):
    """Without a user's space the search stage (both allocators) takes the space of its budget (the protocol's
    evidence: {1,2,3,4} up to avg 2, {2,3,4} up to 3, {3,4,5,6} at 4, the whole-model space for an artifact
    budget) and says so; a space the user names, for every stage or the search stage, is kept."""
    from nasq.config import SearchConfig
    from nasq.pipeline import PRESETS, budget_space

    assert [budget_space(SearchConfig(avg_bits=b)) for b in (1.5, 2, 2.5, 3, 4, 6, 7)] == [
        "aqbert_128g_w1234", "aqbert_128g_w1234", "aqbert_128g_w234", "aqbert_128g_w234", "aqbert_128g_w3456",
        "aqbert_128g_w3456", "aqbert_128g_w12348"]
    assert budget_space(SearchConfig(budget_mb=8, convention="artifact")) == "whole_model_w1234"
    assert budget_space(SearchConfig(budget_mb=8)) is None and budget_space(SearchConfig(ratio=8)) is None

    def configs(search: dict, stages: dict | None = None):
        extra = {"search": search, **({"stages": stages} if stages else {})}
        return _smoke_configs(tiny_model_dir, glue_dir, tmp_path, extra)

    c, said = configs({})
    assert c["search"].search.space == "aqbert_128g_w1234" and "search space aqbert_128g_w1234" in said[-1]
    c, _ = configs({"avg_bits": 4})
    assert c["search"].search.space == "aqbert_128g_w3456"
    c, said = configs({"avg_bits": 4, "space": "tiny"})
    assert c["search"].search.space == "tiny" and not any("search space" in x for x in said)
    c, _ = configs({"avg_bits": 4}, {"search": {"search": {"space": "aqbert_128g"}}})
    assert c["search"].search.space == "aqbert_128g"
    assert PRESETS["smoke"]["search"]["search"] == {"avg_bits": 2.0}  # the preset itself is not modified


def test_qat_distils_attention_by_default(tiny_model_dir, glue_dir, tmp_path):
    """Every preset's QAT distils the teacher's attention maps (kd.attention_beta = QAT_ATTENTION_KD, the protocol's
    evidence) and only the QAT: the teacher's fine-tune and the search do not; a user's kd.attention_beta, for every
    stage or for the QAT stage, replaces it."""
    from nasq.pipeline import PRESETS, QAT_ATTENTION_KD

    assert QAT_ATTENTION_KD > 0

    def configs(extra: dict | None = None):
        return _smoke_configs(tiny_model_dir, glue_dir, tmp_path, extra or {})[0]

    c = configs()
    assert c["qat"].kd.attention_beta == QAT_ATTENTION_KD and c["qat"].kd.teacher == str(tmp_path / "p" / "teacher")
    assert c["finetune"].kd.attention_beta == 0 and c["search"].kd.attention_beta == 0
    assert all(PRESETS[p]["qat"]["kd"]["attention_beta"] == QAT_ATTENTION_KD for p in PRESETS)
    assert configs({"kd": {"attention_beta": 0.0}})["qat"].kd.attention_beta == 0
    assert configs({"stages": {"qat": {"kd": {"attention_beta": 2.5}}}})["qat"].kd.attention_beta == 2.5
