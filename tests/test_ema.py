"""The weights' exponential moving average in fine-tune / QAT (train.ema_decay): the update, a QAT run that keeps
it (training unchanged, the average saved and exported), resume, and the config bounds."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nasq.config import build_config
from nasq.errors import NasqError
from nasq.run import RunDir, load_run_config
from nasq.train.finetune import ema_update
from nasq.tree import flatten


def test_ema_update_is_the_weighted_average_over_the_pytree():
    ema = {"a": jnp.asarray([1.0, 2.0]), "b": {"c": jnp.asarray(4.0)}}
    new = {"a": jnp.asarray([3.0, 0.0]), "b": {"c": jnp.asarray(-4.0)}}
    out = ema_update(ema, new, 0.75)
    np.testing.assert_allclose(out["a"], [0.75 * 1 + 0.25 * 3, 0.75 * 2 + 0.25 * 0])
    np.testing.assert_allclose(out["b"]["c"], 0.75 * 4 - 0.25 * 4)
    np.testing.assert_array_equal(ema_update(ema, new, 0.0)["a"], new["a"])  # decay 0: the raw weights


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5])
def test_ema_decay_bounds(bad):
    with pytest.raises(NasqError, match="ema_decay"):
        build_config(("t", {"train": {"ema_decay": bad}}))


@pytest.fixture(scope="module")
def qat_runs(tiny_model_dir, glue_dir, tmp_path_factory):
    """A teacher, a uniform 2-bit plan, and two 3-step QATs of it from the same seed: without and with the average."""
    from nasq.baselines.allocators import baseline_plan
    from nasq.models.loading import load_pretrained
    from nasq.train.finetune import finetune

    tmp = tmp_path_factory.mktemp("ema")
    base = {"model": {"name": str(tiny_model_dir), "max_len": 32},
            "data": {"task": "sst2", "data_dir": str(glue_dir), "train_subset": 64, "buckets": [32]},
            "train": {"max_steps": 3, "batch_size": 16, "lr": 1e-2, "log_every": 1, "eval_every": 1,
                      "checkpoint_every": 1}}
    teacher = finetune(build_config(("t", base)), tmp / "teacher", log=lambda *a: None)
    model, _, _ = load_pretrained(tiny_model_dir, 2)
    plan = baseline_plan("uniform", model, None, build_config(("t", {**base, "search": {"space": "tiny"}})), None,
                         bits=2)
    plan.save(tmp / "plan.json")

    def qat(name, **train):
        cfg = build_config(("t", {**base, "train": {**base["train"], **train}, "plan": str(tmp / "plan.json"),
                                  "kd": {"teacher": str(teacher)}}))
        return finetune(cfg, tmp / name, log=lambda *a: None), cfg

    return qat("off"), qat("on", ema_decay=0.5), tmp


def _checkpoint(run, step):
    flat, _ = RunDir(run, kind="qat", config=None, resume=True, overwrite=False).restore_checkpoint(None, step)
    return flat


def test_qat_with_ema_trains_the_same_weights_and_saves_their_average(qat_runs):
    from nasq.contract.model_dir import load_model_dir

    (off, _), (on, _), _ = qat_runs
    a, b = _checkpoint(off, 3), _checkpoint(on, 3)
    raw = sorted(k for k in a if k.startswith("params."))
    assert raw and sorted(k for k in b if k.startswith("params.")) == raw
    assert not any(k.startswith("ema.") for k in a)
    for k in raw:  # the average never feeds back into training
        np.testing.assert_array_equal(a[k], b[k])
    # the recurrence, from the run's own checkpoints: ema_3 = 0.5 * ema_2 + 0.5 * params_3
    b2 = _checkpoint(on, 2)
    moved = 0
    for k in raw:
        e = "ema." + k[len("params."):]
        np.testing.assert_allclose(b[e], 0.5 * b2[e] + 0.5 * b[k], rtol=1e-6, atol=1e-7)
        moved += not np.array_equal(b[e], b[k])
    assert moved  # lr 1e-2: the average lags the raw weights
    # what the run saves (and `nasq export` packs) is the average, not the raw weights
    model, _ = load_model_dir(on / "model")
    saved = flatten(nnx.split(model, nnx.Param, ...)[1], "ema.")
    assert sorted(saved) == sorted("ema." + k[len("params."):] for k in raw)
    for k, v in saved.items():
        np.testing.assert_allclose(np.asarray(v), b[k], rtol=1e-6, atol=1e-7)


def test_qat_with_ema_logs_both_dev_metrics(qat_runs):
    (off, _), (on, _), _ = qat_runs
    dev = [json.loads(x) for x in (on / "metrics.jsonl").read_text().splitlines()]
    dev = [r for r in dev if r.get("split") == "dev"]
    assert [r["step"] for r in dev][:3] == [1, 2, 3] and all("accuracy" in r and "raw_accuracy" in r for r in dev)
    info_off = json.loads((off / "run.json").read_text())
    info_on = json.loads((on / "run.json").read_text())
    assert "raw_accuracy" not in info_on["dev"] and info_on["ema_decay"] == 0.5
    # the raw weights are the run without the average, step for step
    assert info_on["dev_raw_weights"] == pytest.approx(info_off["dev"])
    assert "dev_raw_weights" not in info_off


def test_resume_refuses_to_switch_the_average_on_or_off(qat_runs):
    from nasq.train.finetune import finetune

    (off, cfg_off), (on, cfg_on), tmp = qat_runs
    for src, cfg, name in ((off, cfg_on, "r_on"), (on, cfg_off, "r_off")):
        # a run started with the other setting and not finished (its config, no "done" status)
        run = tmp / name
        RunDir(run, kind="qat", config=load_run_config(src), resume=False, overwrite=False)
        before = (run / "config.yaml").read_text()
        with pytest.raises(NasqError, match="ema_decay"):
            finetune(cfg, run, resume=True, log=lambda *a: None)
        assert (run / "config.yaml").read_text() == before  # nothing rewritten


def test_resume_restores_the_average(qat_runs):
    """A run stopped after step 2 and resumed ends with the uninterrupted run's average, bit for bit."""
    import shutil

    from nasq.train.finetune import finetune

    _, (on, cfg_on), tmp = qat_runs
    run = tmp / "stopped"
    shutil.copytree(on, run)
    shutil.rmtree(run / "checkpoints" / "3")
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, "status": "running"}))
    finetune(cfg_on, run, resume=True, log=lambda *a: None)
    a, b = _checkpoint(on, 3), _checkpoint(run, 3)
    assert sorted(a) == sorted(b) and any(k.startswith("ema.") for k in a)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
