"""Hidden-state and attention distillation (kd.hidden_beta, kd.attention_beta): the losses, and QAT runs that use
them; off by default."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nasq.config import build_config
from nasq.errors import NasqError
from nasq.objectives import attention_kd_loss, hidden_kd_loss


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


def _attention(rng, am, layers=2, heads=3):
    """Softmax attention maps ``[b, h, q, k]`` with padded keys at probability 0, as the model makes them."""
    b, s = am.shape
    bias = jnp.where(am[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min)
    return [jax.nn.softmax(jnp.asarray(rng.normal(size=(b, heads, s, s)), jnp.float32) + bias, axis=-1)
            for _ in range(layers)]


def test_attention_kd_loss_value_mask_and_gradient():
    rng = np.random.default_rng(0)
    am = jnp.asarray([[1, 1, 0], [1, 0, 0]])
    w = jnp.asarray([1.0, 1.0])
    s, t = _attention(rng, am), _attention(rng, am)
    assert abs(float(attention_kd_loss(t, t, am, w))) < 1e-6
    # by hand: KL(t || s) over the real keys, for each real query (0,0), (0,1), (1,0) and head; mean over heads,
    # queries and layers
    real = [(0, 0), (0, 1), (1, 0)]
    want = np.mean([np.mean([np.mean([np.sum([tt[b, h, q, k] * np.log(tt[b, h, q, k] / ss[b, h, q, k])
                                              for k in range(int(am[b].sum()))]) for h in range(3)])
                             for b, q in real])
                    for ss, tt in zip((np.asarray(x, np.float64) for x in s), (np.asarray(x, np.float64) for x in t))])
    assert want > 0
    np.testing.assert_allclose(float(attention_kd_loss(s, t, am, w)), want, rtol=1e-4)
    # padded queries and zero-weight rows do not count; the loss is finite and so is its gradient
    s2 = [x.at[0, :, 2].set(1 / 3).at[1, :, 1:].set(jnp.asarray([1.0, 0.0, 0.0])) for x in s]
    np.testing.assert_allclose(float(attention_kd_loss(s2, t, am, w)), want, rtol=1e-4)
    assert float(attention_kd_loss(s, t, am, jnp.asarray([0.0, 0.0]))) == 0.0
    g_s = jax.grad(lambda ss: attention_kd_loss(ss, t, am, w))(s)
    assert all(np.isfinite(np.asarray(x)).all() for x in g_s) and any(float(jnp.abs(x).max()) > 0 for x in g_s)
    # the teacher is a constant: no gradient reaches it
    g_t = jax.grad(lambda tt: attention_kd_loss(s, tt, am, w))(t)
    assert all(float(jnp.abs(x).max()) == 0.0 for x in g_t)
    with pytest.raises(ValueError):
        attention_kd_loss(s[:1], t, am, w)


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


def test_qat_with_attention_kd(teacher_and_plan):
    base, teacher, plan, tmp = teacher_and_plan
    off = [r for r in _qat(base, teacher, plan, tmp / "att_off") if "loss" in r]
    on = [r for r in _qat(base, teacher, plan, tmp / "att_on", attention_beta=3.0) if "loss" in r]
    both = [r for r in _qat(base, teacher, plan, tmp / "att_both", attention_beta=3.0, hidden_beta=2.0)
            if "loss" in r]
    assert "attention_kd_loss" not in off[0] and "hidden_kd_loss" not in on[0]
    assert all(np.isfinite(r["attention_kd_loss"]) and r["attention_kd_loss"] > 0 for r in on)
    first = on[0]
    np.testing.assert_allclose(first["loss"], first["task_loss"] + first["kd_loss"] + 3.0 * first["attention_kd_loss"],
                               rtol=1e-5)
    np.testing.assert_allclose(first["task_loss"], off[0]["task_loss"], rtol=1e-5)
    # both terms together: the same first-step terms, each with its weight
    b = both[0]
    np.testing.assert_allclose(b["attention_kd_loss"], first["attention_kd_loss"], rtol=1e-5)
    np.testing.assert_allclose(b["loss"], b["task_loss"] + b["kd_loss"] + 2.0 * b["hidden_kd_loss"]
                               + 3.0 * b["attention_kd_loss"], rtol=1e-5)


@pytest.mark.parametrize("beta", ["hidden_beta", "attention_beta"])
def test_internals_kd_needs_a_teacher(teacher_and_plan, beta):
    from nasq.train.finetune import finetune

    base, _, plan, tmp = teacher_and_plan
    cfg = build_config(("t", {**base, "plan": str(plan), "kd": {beta: 1.0}}))
    with pytest.raises(NasqError, match=f"kd.{beta} > 0 .*teacher"):
        finetune(cfg, tmp / "no_teacher", log=lambda *a: None)
    assert not (tmp / "no_teacher").exists()
