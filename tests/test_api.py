"""The Python API (`nasq.api`, re-exported lazily as `nasq.*`): every stage called from Python on the tiny model,
the results equal what the library (and so the CLI) gives, bad input is a NasqError naming the key."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import nasq
from nasq.contract.plan import Plan
from nasq.errors import NasqError

REPO = Path(__file__).resolve().parents[1]


def _cfg(tiny_model_dir, glue_dir, **kw):
    return nasq.make_config(model=str(tiny_model_dir), task="sst2", data_dir=str(glue_dir),
                       **{"model.max_len": 32, "data.train_subset": 96, "data.buckets": [32],
                          "train.max_steps": 3, "train.batch_size": 16, "train.log_every": 1,
                          "search.space": "tiny", **kw})


def test_import_nasq_is_light():
    code = "import sys, nasq; print('jax' in sys.modules, sorted(set(nasq.__all__) - set(dir(nasq))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "[]"]


def test_config_layers_and_errors(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train: {lr: 0.001, max_steps: 7}\n")
    cfg = nasq.make_config(task="mrpc", file=f, train={"max_steps": 9}, **{"search.avg_bits": 2.5})
    assert (cfg.data.task, cfg.train.lr, cfg.train.max_steps, cfg.search.avg_bits) == ("mrpc", 0.001, 9, 2.5)
    with pytest.raises(NasqError, match="lr"):
        nasq.make_config(**{"train.lr": -1})
    with pytest.raises(NasqError, match="bogus"):
        nasq.make_config(**{"train.bogus": 1})


@pytest.mark.slow
def test_stages_from_python(tiny_model_dir, glue_dir, tmp_path):
    """notebooks/quickstart.py (the API example: every stage through `nasq.*`) on the tiny model, then what its
    outputs must satisfy: plans within budget and equal to their files, one search finalized at a second budget,
    the measured allocation at the search's budget,
    predictions equal to the CLI path's, the artifact's metrics the same through `Model.evaluate` and
    `nasq.evaluate`."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("quickstart", REPO / "notebooks" / "quickstart.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "q"
    res = mod.main(["--model", str(tiny_model_dir), "--data-dir", str(glue_dir), "--out", str(out), "--steps", "3",
                    "--train-subset", "96", "--avg-bits", "3", "--space", "tiny", "--max-len", "32"])
    plan, wider = res["plan"], res["wider"]
    assert isinstance(plan, Plan) and plan.totals["within_budget"] and Plan.load(out / "plan.json") == plan
    assert wider.budget["bytes"] > plan.budget["bytes"] and wider.totals["searched_bytes"] <= wider.budget["bytes"]
    measured = res["measured"]
    assert measured.provenance["method"] == "measured" and measured.budget == plan.budget
    assert measured.totals["within_budget"] and Plan.load(out / "plan_measured.json") == measured
    with pytest.raises(NasqError, match="at most one"):
        nasq.finalize(res["search"], tmp_path / "plan3.json", avg_bits=2.0, ratio=8.0)
    art = res["artifact"]
    model = nasq.load(art)
    assert model.num_labels == 2 and model.manifest["task"] == "sst2"
    preds = res["predictions"]
    assert len(preds) == 2 and all(abs(sum(p["scores"]) - 1) < 1e-5 for p in preds)
    from nasq.export.reader import predict_texts

    assert preds == predict_texts(art, ["a gripping, funny film", "dull"])  # the CLI's `nasq predict` path
    ids = np.array([[101, 2023, 102, 0]])
    logits = model.logits(ids, attention_mask=(ids > 0).astype(np.int32))
    assert logits.shape == (1, 2) and np.isfinite(logits).all()
    ev = res["dev"]
    assert ev["task"] == "sst2" and ev["dev_rows"] == 872 and ev["kernel"].split()[0] in ("native", "xla")
    again = nasq.evaluate(art, nasq.make_config(data_dir=str(glue_dir), **{"model.max_len": 32}))
    assert {k: v for k, v in again.items() if k != "wall_s"} == {k: v for k, v in ev.items() if k != "wall_s"}
    if "onnx" in res:  # the onnx extra is installed
        assert (out / "model.onnx").stat().st_size == res["onnx"]["onnx_file_bytes"]
    with pytest.raises(NasqError):
        nasq.load(tmp_path / "missing.nasq")


def test_allocate_from_python_equals_the_cli(tiny_model_dir, glue_dir, tmp_path, capsys):
    """`nasq.allocate`: the Fisher plan (the default method, as `nasq pipeline`'s) within the budget, saved, the
    same as `nasq baseline fisher`'s, and measured on request as `nasq baseline measured`'s; an existing file is
    not overwritten without overwrite=True; a bad method is named."""
    from nasq.cli import main

    cfg = _cfg(tiny_model_dir, glue_dir, **{"search.avg_bits": 3})
    cli_common = ["--model", str(tiny_model_dir), "--task", "sst2", "--data-dir", str(glue_dir), "--space", "tiny",
                  "--avg-bits", "3", "--n-batches", "1", "--train-subset", "96", "--set", "model.max_len=32",
                  "--set", "data.buckets=[32]", "--set", "train.batch_size=16"]
    plan = nasq.allocate(cfg, tmp_path / "f.json", n_batches=1, log=lambda *a: None)
    assert plan.provenance["method"] == "hessian" and plan.provenance["curvature"] == "fisher"
    assert plan.provenance["granularity"] == "tensor" and plan.totals["within_budget"]
    assert Plan.load(tmp_path / "f.json") == plan
    assert main(["baseline", "fisher", *cli_common, "--out", str(tmp_path / "cli_f.json")]) == 0
    assert Plan.load(tmp_path / "cli_f.json").bits_per_group() == plan.bits_per_group()
    plan = nasq.allocate(cfg, tmp_path / "m.json", method="measured", n_batches=1, log=lambda *a: None)
    assert plan.provenance["method"] == "measured" and plan.totals["within_budget"]
    assert Plan.load(tmp_path / "m.json") == plan
    assert main(["baseline", "measured", *cli_common, "--out", str(tmp_path / "cli.json")]) == 0
    assert Plan.load(tmp_path / "cli.json").bits_per_group() == plan.bits_per_group()
    stamp = (tmp_path / "m.json").stat().st_mtime_ns
    with pytest.raises(NasqError, match="already exists"):
        nasq.allocate(cfg, tmp_path / "m.json", method="uniform", bits=2)
    assert (tmp_path / "m.json").stat().st_mtime_ns == stamp
    u = nasq.allocate(cfg, tmp_path / "m.json", method="uniform", bits=2, overwrite=True)
    assert u.provenance["method"] == "uniform" and Plan.load(tmp_path / "m.json") == u
    with pytest.raises(NasqError, match="unknown baseline 'bogus'"):
        nasq.allocate(cfg, tmp_path / "b.json", method="bogus")
    assert not (tmp_path / "b.json").exists()
