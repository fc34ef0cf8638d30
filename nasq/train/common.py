"""Pieces shared by fine-tuning, QAT and search: data preparation, losses, optimizers, prediction, saving.

Losses (per-example weights `w_i` mask padding rows of a fixed-shape batch):

    task (classification)  = sum_i w_i * CE(softmax(z_i), y_i) / sum_i w_i
    task (regression)      = sum_i w_i * (z_i - y_i)^2 / sum_i w_i
    KD (Hinton)            = T^2 * sum_i w_i * KL(softmax(t_i/T) || softmax(z_i/T)) / sum_i w_i
                             (regression: MSE between student and teacher outputs)
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from nasq.config import Config, TrainConfig
from nasq.data.batching import Encoded, buckets_for, encode, eval_batches, heldout_split, steps_per_epoch
from nasq.data.glue import TaskSpec, get_task, load_split
from nasq.data.metrics import compute_metrics
from nasq.errors import NasqError
from nasq.models.loading import load_tokenizer, resolve_model_dir
from nasq.run import write_atomic


# ----------------------------------------------------------------------------------------------- data
@dataclasses.dataclass
class TaskData:
    task: TaskSpec
    train: Encoded  # rows used for weight updates
    heldout: Encoded | None  # rows held out of train for gate updates (search only)
    dev: Encoded  # reporting only
    buckets: tuple[int, ...]
    model_dir: Path


def load_task_data(cfg: Config, *, with_heldout: bool = False, model_dir: Path | None = None) -> TaskData:
    """Read, tokenize and split the task's train/dev data as the config says."""
    task = get_task(cfg.data.task)
    model_dir = model_dir or resolve_model_dir(cfg.model.name)
    tok = load_tokenizer(model_dir)
    buckets = buckets_for(cfg.model.max_len, cfg.data.buckets)
    train_ds = load_split(task, "train", cfg.data.data_dir)
    dev = encode(load_split(task, "dev", cfg.data.data_dir), tok, task, cfg.model.max_len)
    heldout = None
    # Draw the rows first, tokenize only those (the same rows as encoding everything, then selecting).
    if with_heldout:
        tr_idx, ho_idx = heldout_split(len(train_ds), cfg.data.heldout, cfg.train.seed, cfg.data.train_subset)
        heldout = encode(train_ds.select(ho_idx), tok, task, cfg.model.max_len)
    elif cfg.data.train_subset is not None:
        tr_idx, _ = heldout_split(len(train_ds), 0, cfg.train.seed, cfg.data.train_subset)
    else:
        tr_idx = None
    train = encode(train_ds if tr_idx is None else train_ds.select(tr_idx), tok, task, cfg.model.max_len)
    return TaskData(task, train, heldout, dev, buckets, model_dir)


def total_steps(train_cfg: TrainConfig, data: TaskData) -> int:
    if train_cfg.max_steps is not None:
        return train_cfg.max_steps
    spe = steps_per_epoch(data.train, train_cfg.batch_size, data.buckets)
    return max(1, int(np.ceil(train_cfg.epochs * spe)))


# --------------------------------------------------------------------------------------------- losses
def task_loss(logits: jax.Array, labels: jax.Array, weights: jax.Array, is_regression: bool) -> jax.Array:
    denom = jnp.maximum(weights.sum(), 1.0)
    if is_regression:
        per = jnp.square(logits[:, 0] - labels)
    else:
        per = optax.softmax_cross_entropy_with_integer_labels(logits, labels.astype(jnp.int32))
    return (per * weights).sum() / denom


def kd_loss(student: jax.Array, teacher: jax.Array, weights: jax.Array, temperature: float,
            is_regression: bool) -> jax.Array:
    denom = jnp.maximum(weights.sum(), 1.0)
    if is_regression:
        per = jnp.square(student[:, 0] - teacher[:, 0])
    else:
        t = jax.nn.log_softmax(teacher / temperature)
        s = jax.nn.log_softmax(student / temperature)
        per = (jnp.exp(t) * (t - s)).sum(-1) * temperature**2
    return (per * weights).sum() / denom


# ------------------------------------------------------------------------------------------ optimizer
def _decay_mask(params):
    """AdamW weight decay on matrices only: never biases, LayerNorm or LSQ steps (`QuantScale`, 1-D or 2-D).

    Under `optax.partition` (single-level search) leaves of the other partition arrive as `MaskedNode`s
    without `ndim`; they are not decayed."""
    from nasq.quant.layers import QuantScale

    return jax.tree.map(lambda v: (not isinstance(v, QuantScale)) and getattr(v.get_value(), "ndim", 0) >= 2,
                        params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def lr_schedule(train_cfg: TrainConfig, steps: int, peak: float | None = None) -> optax.Schedule:
    """Linear warmup to `peak` over `warmup_frac * steps`, then linear decay to 0 (HF `get_linear_schedule`)."""
    peak = train_cfg.lr if peak is None else peak
    warm = int(train_cfg.warmup_frac * steps)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, max(warm, 1)), optax.linear_schedule(peak, 0.0, max(steps - warm, 1))],
        [max(warm, 1)],
    )


def weight_optimizer(train_cfg: TrainConfig, steps: int) -> optax.GradientTransformation:
    parts = [optax.clip_by_global_norm(train_cfg.grad_clip)] if train_cfg.grad_clip else []
    parts.append(optax.adamw(lr_schedule(train_cfg, steps), b1=0.9, b2=0.999, eps=1e-8,
                             weight_decay=train_cfg.weight_decay, mask=_decay_mask))
    return optax.chain(*parts)


# ------------------------------------------------------------------------------ flat trees for orbax
def _keystr(path) -> str:
    """Dotted name of a pytree key path: `bert.encoder.layer.0.attention.self.query.kernel`."""
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            if k.name != "value":
                parts.append(k.name)
        else:
            parts.append(str(k))
    return ".".join(parts)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """`{dotted_keypath: leaf}` for any pytree (stable order), used for checkpoints and safetensors."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {prefix + _keystr(p): v for p, v in leaves}


def unflatten_like(template: Any, flat: dict[str, Any], prefix: str = "") -> Any:
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    missing = [prefix + _keystr(p) for p, _ in leaves if prefix + _keystr(p) not in flat]
    if missing:
        raise NasqError(f"checkpoint is missing {len(missing)} arrays (e.g. {missing[:3]}); it was written by a "
                        "different model or search space.")
    return jax.tree_util.tree_unflatten(
        treedef, [jnp.asarray(flat[prefix + _keystr(p)], dtype=v.dtype) for p, v in leaves]
    )


# -------------------------------------------------------------------------------------- prediction
def make_predict_fn(model: nnx.Module):
    """A jitted `batch -> logits` for `model` (recompiles once per bucket length)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def fwd(state, input_ids, token_type_ids, attention_mask):
        return nnx.merge(graphdef, state)(input_ids, token_type_ids, attention_mask)

    return lambda b: fwd(state, b.input_ids, b.token_type_ids, b.attention_mask)


def predict_logits(model: nnx.Module, encoded: Encoded, batch_size: int, buckets, shard=None) -> np.ndarray:
    """Logits `[N, num_labels]` in the order of `encoded`; `shard` places each batch (`nasq.parallel`)."""
    return collect_logits(make_predict_fn(model), encoded, batch_size, buckets, shard)


def collect_logits(fn, encoded: Encoded, batch_size: int, buckets, shard=None) -> np.ndarray:
    """Run `fn(batch) -> logits` over one ordered pass of `encoded`; logits `[N, C]` in example order."""
    out = None
    for b in eval_batches(encoded, batch_size, buckets):
        logits = np.asarray(fn(b if shard is None else shard(b)))
        if out is None:
            out = np.zeros((len(encoded), logits.shape[-1]), np.float32)
        real = b.index >= 0
        out[b.index[real]] = logits[real]
    return out


def metrics_from_logits(task: TaskSpec, logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    preds = logits[:, 0] if task.is_regression else logits.argmax(-1)
    return compute_metrics(task, preds, labels)


def evaluate(model: nnx.Module, data: TaskData, batch_size: int, shard=None) -> dict[str, float]:
    return metrics_from_logits(data.task, predict_logits(model, data.dev, batch_size, data.buckets, shard),
                               data.dev.labels)


# ------------------------------------------------------------------------------------ saving models
MODEL_META = "nasq_model.json"
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def save_model_dir(out: Path, model: nnx.Module, *, source_model_dir: Path, num_labels: int, task: str,
                   plan: dict | None = None) -> None:
    """Write a self-contained model directory: weights (safetensors, our state paths), config, tokenizer."""
    from safetensors.numpy import save

    out.mkdir(parents=True, exist_ok=True)
    state = nnx.state(model, nnx.Param)
    arrays = {k: np.asarray(v) for k, v in flatten(state).items()}
    write_atomic(out / "state.safetensors", save(arrays))
    write_atomic(out / "config.json", json.dumps(model.config.to_dict(), indent=2))
    meta = {"format": "nasq-model", "version": 1, "num_labels": num_labels, "task": task,
            "quantized": plan is not None}
    write_atomic(out / MODEL_META, json.dumps(meta, indent=2))
    if plan is not None:
        write_atomic(out / "plan.json", json.dumps(plan, indent=2))
    for name in TOKENIZER_FILES:
        if (source_model_dir / name).is_file():
            shutil.copyfile(source_model_dir / name, out / name)


def model_dir_of(run: str | Path) -> Path:
    """The model directory of a run (`RUN/model/`), or `run` itself when it is one."""
    run = Path(run)
    return run / "model" if (run / "model" / MODEL_META).is_file() else run


def load_model_dir(path: str | Path) -> tuple[nnx.Module, dict]:
    """Load a model saved by `save_model_dir` (a run dir or its `model/`); returns (model, meta)."""
    from safetensors.numpy import load_file

    from nasq.models.bert import BertConfig, BertForSequenceClassification

    path = model_dir_of(path)
    if not (path / MODEL_META).is_file():
        raise NasqError(f"{path}: not a nasq model (no {MODEL_META}); pass a finished finetune/qat run directory.")
    meta = json.loads((path / MODEL_META).read_text())
    cfg = BertConfig.from_json(path / "config.json")
    model = BertForSequenceClassification(cfg, meta["num_labels"], rngs=nnx.Rngs(0))
    if meta.get("quantized"):
        from nasq.plan import Plan, apply_plan

        model = apply_plan(model, Plan.load(path / "plan.json"))
    flat = load_file(str(path / "state.safetensors"))
    state = nnx.state(model, nnx.Param)
    nnx.update(model, unflatten_like(state, flat))
    return model, meta
