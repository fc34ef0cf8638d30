"""Fine-tuning: fp32 (the teacher / accuracy reference) and quantization-aware (a fixed plan + KD).

One loop serves both: the model is either the plain BERT or the plan-applied one (`nasq.quant.apply.apply_plan`,
fake-quant `QuantLinear`s with learned LSQ scales); the loss adds the KD term when a teacher is given.
Teacher logits are computed once for the training rows and cached (the teacher is frozen). With
``train.ema_decay = d > 0`` the loop also keeps an exponential moving average of the weights (:func:`ema_update`),
and that average is what is evaluated, saved and exported.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from nasq.config import Config
from nasq.contract.model_dir import load_model_dir, save_model_dir
from nasq.contract.plan import Plan
from nasq.data.batching import iterate_batches
from nasq.data.tasks import TaskData, load_task_data
from nasq.errors import NasqError
from nasq.evaluation import evaluate, predict_logits
from nasq.models.loading import load_pretrained
from nasq.objectives import (
    internals_kd,
    kd_loss,
    lr_schedule,
    task_loss,
    total_steps,
    weight_optimizer,
)
from nasq.parallel import DataParallel
from nasq.quant.apply import apply_plan
from nasq.run import Cadence, RunDir, load_run_config, resume_state, run_finished, save_state, train_loop
from nasq.search.restore import inherit_search_weights


def build_student(cfg: Config, data: TaskData, log=print) -> tuple[nnx.Module, dict | None]:
    """The model to train: pretrained BERT (fp32) or, with `cfg.plan`, its plan-quantized version.

    For QAT the starting weights are the teacher's fine-tuned weights when a teacher run is given
    (the usual recipe: quantize a fine-tuned model), else the pretrained checkpoint; with ``cfg.init_from``
    (a search run) they are the search's trained weights and the search's steps of the planned widths.
    """
    num_labels = data.task.num_labels
    if cfg.kd.teacher:
        model, _ = load_model_dir(cfg.kd.teacher)
        if model.num_labels != num_labels:
            raise NasqError(f"teacher {cfg.kd.teacher} has {model.num_labels} labels; task {data.task.name} "
                            f"needs {num_labels}.")
    else:
        model, _, report = load_pretrained(data.model_dir, num_labels, seed=cfg.train.seed)
        if report.new_head:
            log(f"initialised a new task head: {', '.join(report.new_head)}")
    plan = None
    if cfg.plan:
        plan_obj = Plan.load(cfg.plan)
        if cfg.init_from:
            model = inherit_search_weights(cfg.init_from, plan_obj, model)
            log(f"QAT starts from the weights and steps of search run {cfg.init_from}")
        else:
            model = apply_plan(model, plan_obj)
        plan = plan_obj.to_dict()
    return model, plan


def teacher_logits_for(cfg: Config, data: TaskData, teacher=None) -> np.ndarray | None:
    """The teacher's logits on every training row (None without KD); ``teacher``: the model when already loaded."""
    if not cfg.kd.teacher or cfg.kd.beta == 0:
        return None
    if teacher is None:
        teacher, _ = load_model_dir(cfg.kd.teacher)
    return predict_logits(teacher, data.train, cfg.data.eval_batch_size, data.buckets)


def internals_teacher_for(cfg: Config, student) -> tuple | None:
    """``(graphdef, state)`` of the frozen teacher when ``kd.hidden_beta > 0`` or ``kd.attention_beta > 0``
    (hidden-state / attention KD run it on every step), else None. Its hidden states and attention maps must have
    the student's shapes."""
    on = [k for k in ("hidden_beta", "attention_beta") if getattr(cfg.kd, k) > 0]
    if not on:
        return None
    if not cfg.kd.teacher:
        raise NasqError(f"kd.{on[0]} > 0 distils the internals of a teacher: set --teacher (kd.teacher)")
    teacher, _ = load_model_dir(cfg.kd.teacher)
    shape = ("num_hidden_layers", "hidden_size", "num_attention_heads")
    tc, sc = ([getattr(c, k) for k in shape] for c in (teacher.config, student.config))
    if tc != sc:
        raise NasqError(f"kd.{on[0]}: teacher {cfg.kd.teacher} has (layers, hidden, heads) = {tuple(tc)}, the "
                        f"student {tuple(sc)}; distilling hidden states and attention needs the same shapes (set "
                        "kd.hidden_beta=0 and kd.attention_beta=0)")
    return nnx.split(teacher)


def make_train_step(graphdef, rest, tx, *, is_regression: bool, kd_beta: float, kd_temperature: float,
                    hidden_beta: float = 0.0, attention_beta: float = 0.0, teacher_graphdef=None):
    """Jitted `(params, opt_state, batch, key, teacher_logits, teacher_state) -> (params, opt_state, metrics)`.

    ``teacher_state`` (with ``teacher_graphdef``; None when both betas are 0): the frozen teacher, run on the
    batch for hidden-state KD (``objectives.hidden_kd_loss``, weight ``hidden_beta``) and attention KD
    (``objectives.attention_kd_loss``, weight ``attention_beta``): ``objectives.internals_kd``."""

    @jax.jit
    def step(params, opt_state, batch, key, teacher_logits, teacher_state=None):
        def loss_fn(p):
            ids, tt, am = batch.input_ids, batch.token_type_ids, batch.attention_mask
            student = nnx.merge(graphdef, p, rest)
            if teacher_state is None:
                logits, internals = student(ids, tt, am, key=key), None
            else:
                logits, internals = student(ids, tt, am, key=key, return_internals=True)
            lt = task_loss(logits, batch.labels, batch.weights, is_regression)
            loss = lt
            terms = {"task_loss": lt, "kd_loss": jnp.float32(0)}
            if teacher_logits is not None:
                terms["kd_loss"] = kd_loss(logits, teacher_logits, batch.weights, kd_temperature, is_regression)
                loss = lt + kd_beta * terms["kd_loss"]
            if teacher_state is not None:
                _, t_int = nnx.merge(teacher_graphdef, teacher_state)(ids, tt, am, return_internals=True)
                extra, parts = internals_kd(internals, t_int, am, batch.weights, hidden_beta=hidden_beta,
                                            attention_beta=attention_beta)
                loss, terms = loss + extra, {**terms, **parts}
            return loss, terms

        (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {"loss": loss, **terms, "grad_norm": optax.global_norm(grads)}

    return step


def ema_update(ema, params, decay: float):
    """One step of the weights' exponential moving average (Polyak averaging)::

        ema_t = decay * ema_{t-1} + (1 - decay) * params_t

    ``optax.incremental_update`` over the whole pytree (LSQ steps included, so a QAT model's average is quantized
    with averaged steps). Started at the initial weights, the average weighs step ``t`` of ``T`` by
    ``(1 - decay) * decay^(T - t)``: a horizon of about ``1 / (1 - decay)`` steps."""
    return optax.incremental_update(params, ema, 1.0 - decay)


def _check_ema_resume(out: str | Path, cfg: Config) -> None:
    """A run's checkpoints hold the average only when it was started with ``train.ema_decay > 0``."""
    if not (Path(out) / "config.yaml").is_file():
        return  # not a run directory: RunDir says so
    saved = load_run_config(out).train.ema_decay
    if (saved > 0) != (cfg.train.ema_decay > 0):
        raise NasqError(f"--resume: {out} was started with train.ema_decay={saved}, so its checkpoints "
                        f"{'hold' if saved > 0 else 'do not hold'} a weight average; resume with "
                        f"train.ema_decay {'> 0' if saved > 0 else '= 0'} (--set train.ema_decay=...), or start "
                        "it again with --overwrite")


def finetune(cfg: Config, out: str | Path, *, resume: bool = False, overwrite: bool = False,
             log=print) -> Path:
    """Train into run directory `out`; returns the path. `cfg.plan` set -> QAT, `cfg.kd.teacher` set -> KD."""
    kind = "qat" if cfg.plan else "finetune"
    if resume and run_finished(out):
        log(f"{out} is finished (run.json status done); nothing to resume.")
        return Path(out)
    # Validate data, model and plan before the run directory exists (a typo leaves nothing behind).
    dp = DataParallel.from_config(cfg, batch_sizes={"train.batch_size": cfg.train.batch_size,
                                                    "data.eval_batch_size": cfg.data.eval_batch_size})
    data = load_task_data(cfg)
    if note := data.truncation_note(cfg.model.max_len):
        log(note)
    model, plan = build_student(cfg, data, log=log)
    internals_teacher = internals_teacher_for(cfg, model)
    if resume:
        _check_ema_resume(out, cfg)
    run = RunDir(out, kind=kind, config=cfg, resume=resume, overwrite=overwrite)
    steps = total_steps(cfg.train, data)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = weight_optimizer(cfg.train, steps)
    state, start = {"params.": params, "opt.": tx.init(params)}, 0
    decay = cfg.train.ema_decay
    if decay > 0:
        state["ema."] = jax.tree.map(jnp.array, params)  # a copy: the average starts at the initial weights
    ema_step = jax.jit(lambda ema, p: ema_update(ema, p, decay))
    if resume:
        state, start = resume_state(run, state, steps, log)
    state = dp.replicate(state)  # identity unless data_parallel > 1
    teacher = teacher_logits_for(cfg, data, None if internals_teacher is None else nnx.merge(*internals_teacher))
    teacher_state = None if internals_teacher is None else dp.replicate(internals_teacher[1])
    train_step = dp.wrap(make_train_step(graphdef, rest, tx, is_regression=data.task.is_regression,
                                         kd_beta=cfg.kd.beta, kd_temperature=cfg.kd.temperature,
                                         hidden_beta=cfg.kd.hidden_beta, attention_beta=cfg.kd.attention_beta,
                                         teacher_graphdef=None if internals_teacher is None
                                         else internals_teacher[0]))
    schedule = lr_schedule(cfg.train, steps)
    base_key = jax.random.key(cfg.train.seed)
    run.write_info(model_dir=str(data.model_dir), task=data.task.name, total_steps=steps,
                   train_rows=len(data.train), devices=dp.size, status="running")

    def step_fn(state, step, batch):
        tl = None if teacher is None else jnp.asarray(teacher[np.maximum(batch.index, 0)])
        batch, tl = dp.shard((batch, tl))
        params, opt_state, m = train_step(state["params."], state["opt."], batch, jax.random.fold_in(base_key, step),
                                          tl, teacher_state)
        new = {"params.": params, "opt.": opt_state}
        if decay > 0:
            new["ema."] = ema_step(state["ema."], params)
        return new, m

    def record(state, done, m):
        lr = float(schedule(done - 1))
        return {"lr": lr, **m}, {"loss": m["loss"], "lr": lr}

    def dev_metrics(st) -> dict:
        """The dev metrics of the weights that are saved (the average with EMA on; the raw weights' as
        ``raw_<metric>`` beside them)."""
        ev = evaluate(nnx.merge(graphdef, st["ema." if decay > 0 else "params."], rest), data,
                      cfg.data.eval_batch_size, shard=dp.shard)
        if decay > 0:
            raw = evaluate(nnx.merge(graphdef, st["params."], rest), data, cfg.data.eval_batch_size, shard=dp.shard)
            ev |= {f"raw_{k}": v for k, v in raw.items()}
        return ev

    batches = iterate_batches(data.train, cfg.train.batch_size, data.buckets, cfg.train.seed, start_step=start)
    state, wall = train_loop(
        run, state, batches, step_fn, total=steps, start=start, desc=kind, record=record,
        cadence=Cadence(steps, cfg.train.log_every, cfg.train.checkpoint_every, cfg.train.eval_every, start),
        evaluate=dev_metrics)
    model = nnx.merge(graphdef, state["ema." if decay > 0 else "params."], rest)
    ev = dev_metrics(state)
    run.log({"step": steps, "split": "dev", **ev})
    save_model_dir(run.path / "model", model, source_model_dir=data.model_dir, num_labels=data.task.num_labels,
                   task=data.task.name, plan=plan)
    save_state(run, state, steps)
    trained = steps - start
    saved_ev = {k: v for k, v in ev.items() if not k.startswith("raw_")}
    raw_ev = {k[4:]: v for k, v in ev.items() if k.startswith("raw_")}
    run.write_info(status="done", dev=saved_ev, **({"dev_raw_weights": raw_ev, "ema_decay": decay} if raw_ev else {}),
                   wall_s=round(wall, 1), s_per_step=round(wall / max(trained, 1), 4))
    log(f"{kind} done: {steps} steps, dev {ev}, {wall:.0f}s -> {run.path}")
    return run.path
