"""The Python API (`nasq.api`, re-exported lazily as `nasq.*`): every stage called from Python on the tiny model,
the results equal what the library (and so the CLI) gives, bad input is a NasqError naming the key."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import nasq

REPO = Path(__file__).resolve().parents[1]
from nasq.contract.plan import Plan
from nasq.errors import NasqError


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
    quiet = {"log": lambda *a: None}
    teacher = nasq.finetune(_cfg(tiny_model_dir, glue_dir), tmp_path / "teacher", **quiet)
    cfg = _cfg(tiny_model_dir, glue_dir, **{"kd.teacher": str(teacher), "search.avg_bits": 3.0})
    run = nasq.run_search(cfg, tmp_path / "search", **quiet)
    plan = nasq.finalize(run, tmp_path / "plan.json")
    assert isinstance(plan, Plan) and plan.totals["within_budget"] and Plan.load(tmp_path / "plan.json") == plan
    lower = nasq.finalize(run, tmp_path / "plan2.json", avg_bits=2.0)  # one search, another budget
    assert lower.budget["bytes"] < plan.budget["bytes"] and lower.totals["searched_bytes"] <= lower.budget["bytes"]
    with pytest.raises(NasqError, match="at most one"):
        nasq.finalize(run, tmp_path / "plan3.json", avg_bits=2.0, ratio=8.0)
    qat = nasq.finetune(cfg, tmp_path / "qat", plan=tmp_path / "plan.json", init_from=run, **quiet)
    art = nasq.export_artifact(qat, tmp_path / "model.nasq")

    model = nasq.load(art)
    assert model.num_labels == 2 and model.manifest["task"] == "sst2"
    preds = model.predict(["a gripping, funny film", "dull"])
    assert len(preds) == 2 and all(abs(sum(p["scores"]) - 1) < 1e-5 for p in preds)
    from nasq.export.reader import predict_texts

    assert preds == predict_texts(art, ["a gripping, funny film", "dull"])  # the CLI's `nasq predict` path
    ids = np.array([[101, 2023, 102, 0]])
    logits = model.logits(ids, attention_mask=(ids > 0).astype(np.int32))
    assert logits.shape == (1, 2) and np.isfinite(logits).all()
    ev = model.evaluate(nasq.make_config(data_dir=str(glue_dir), **{"model.max_len": 32}))
    assert ev["task"] == "sst2" and ev["dev_rows"] == 872 and ev["kernel"].split()[0] in ("native", "xla")
    again = nasq.evaluate(art, nasq.make_config(data_dir=str(glue_dir), **{"model.max_len": 32}))
    assert {k: v for k, v in again.items() if k != "wall_s"} == {k: v for k, v in ev.items() if k != "wall_s"}
    with pytest.raises(NasqError):
        nasq.load(tmp_path / "missing.nasq")


@pytest.mark.slow
def test_quickstart_example_script(tiny_model_dir, glue_dir, tmp_path):
    """notebooks/quickstart.py (the API example) runs end to end on the tiny model."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("quickstart", REPO / "notebooks" / "quickstart.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    res = mod.main(["--model", str(tiny_model_dir), "--data-dir", str(glue_dir), "--out", str(tmp_path / "q"),
                    "--steps", "3", "--train-subset", "64", "--avg-bits", "3"])
    assert res["dev"]["dev_rows"] == 872 and (tmp_path / "q" / "model.nasq" / "manifest.json").is_file()
    assert (tmp_path / "q" / "plan_wider.json").is_file()
