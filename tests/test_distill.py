"""Hidden-state distillation (kd.hidden_beta): the loss, and a QAT run that uses it; off by default."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nasq.config import build_config
from nasq.errors import NasqError
from nasq.objectives import hidden_kd_loss


def test_hidden_kd_loss_value_mask_and_gradient():
    rng = np.random.default_rng(0)
    s = [jnp.asarray(rng.normal(size=(2, 3, 4)), jnp.float32) for _ in range(3)]
    t = [jnp.asarray(rng.normal(size=(2, 3, 4)), jnp.float32) for _ in range(3)]
    am = jnp.asarray([[1, 1, 0], [1, 0, 0]])
    w = jnp.asarray([1.0, 1.0])
    assert float(hidden_kd_loss(t, t, am, w)) == 0.0
    # by hand: the 3 real tokens, mean over the hidden dim, mean over layers
    real = [(0, 0), (0, 1), (1, 0)]
    want = np.mean([np.mean([np.mean((np.asarray(a)[b, i] - np.asarray(c)[b, i]) ** 2) for b, i in real])
                    for a, c in zip(s, t, strict=True)])
    np.testing.assert_allclose(float(hidden_kd_loss(s, t, am, w)), want, rtol=1e-5)
    # padded positions and zero-weight rows do not count
    s2 = [x.at[0, 2].set(100.0).at[1].set(jnp.where(jnp.arange(3)[:, None] > 0, 50.0, x[1])) for x in s]
    np.testing.assert_allclose(float(hidden_kd_loss(s2, t, am, w)), want, rtol=1e-5)
    assert float(hidden_kd_loss(s, t, am, jnp.asarray([0.0, 0.0]))) == 0.0
    # the teacher is a constant: no gradient reaches it
    g_t = jax.grad(lambda tt: hidden_kd_loss(s, tt, am, w))(t)
    assert all(float(jnp.abs(x).max()) == 0.0 for x in g_t)
    with pytest.raises(ValueError):
        hidden_kd_loss(s[:2], t, am, w)


@pytest.fixture(scope="module")
def teacher_and_plan(tiny_model_dir, glue_dir, tmp_path_factory):
    from nasq.baselines.allocators import baseline_plan
    from nasq.models.loading import load_pretrained
    from nasq.train.finetune import finetune

    tmp = tmp_path_factory.mktemp("distill")
    base = {"model": {"name": str(tiny_model_dir), "max_len": 32},
            "data": {"task": "sst2", "data_dir": str(glue_dir), "train_subset": 64, "buckets": [32]},
            "train": {"max_steps": 4, "batch_size": 16, "lr": 1e-3, "log_every": 1}}
    teacher = finetune(build_config(("t", base)), tmp / "teacher", log=lambda *a: None)
    cfg = build_config(("t", {**base, "search": {"space": "tiny"}}))
    model, _, _ = load_pretrained(tiny_model_dir, 2)
    plan = baseline_plan("uniform", model, None, cfg, None, bits=2)
    plan.save(tmp / "plan.json")
    return base, teacher, tmp / "plan.json", tmp


def _qat(base, teacher, plan, out, **kd):
    from nasq.train.finetune import finetune

    cfg = build_config(("t", {**base, "plan": str(plan), "kd": {"teacher": str(teacher), **kd}}))
    finetune(cfg, out, log=lambda *a: None)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_qat_with_hidden_state_kd(teacher_and_plan):
    base, teacher, plan, tmp = teacher_and_plan
    off = [r for r in _qat(base, teacher, plan, tmp / "off") if "loss" in r]
    on = [r for r in _qat(base, teacher, plan, tmp / "on", hidden_beta=2.0) if "loss" in r]
    assert "hidden_kd_loss" not in off[0]  # off by default: the step and its metrics are as before
    assert all(np.isfinite(r["hidden_kd_loss"]) and r["hidden_kd_loss"] > 0 for r in on)
    # the loss adds 2 x the hidden term on top of task + KD (same first batch and weights as the run without)
    first = on[0]
    np.testing.assert_allclose(first["loss"], first["task_loss"] + first["kd_loss"] + 2.0 * first["hidden_kd_loss"],
                               rtol=1e-5)
    np.testing.assert_allclose(first["task_loss"], off[0]["task_loss"], rtol=1e-5)


def test_hidden_kd_needs_a_teacher(teacher_and_plan):
    from nasq.train.finetune import finetune

    base, _, plan, tmp = teacher_and_plan
    cfg = build_config(("t", {**base, "plan": str(plan), "kd": {"hidden_beta": 1.0}}))
    with pytest.raises(NasqError, match="teacher"):
        finetune(cfg, tmp / "no_teacher", log=lambda *a: None)
    assert not (tmp / "no_teacher").exists()
