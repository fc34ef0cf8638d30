"""What training minimises and how, shared by fine-tuning, QAT, search and the Hessian baseline: the losses,
the weight optimizer, its learning-rate schedule and the run length.

Losses (per-example weights `w_i` mask padding rows of a fixed-shape batch):

    task (classification)  = sum_i w_i * CE(softmax(z_i), y_i) / sum_i w_i
    task (regression)      = sum_i w_i * (z_i - y_i)^2 / sum_i w_i
    KD (Hinton)            = T^2 * sum_i w_i * KL(softmax(t_i/T) || softmax(z_i/T)) / sum_i w_i
                             (regression: MSE between student and teacher outputs)
    hidden-state KD        = MSE of every hidden state (hidden_kd_loss; TinyBERT, TernaryBERT)
    attention KD           = KL of every attention distribution (attention_kd_loss; MiniLM)
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.scipy.special import xlogy

from nasq.config import TrainConfig
from nasq.data.batching import steps_per_epoch
from nasq.data.tasks import TaskData
from nasq.quant.layers import QuantScale

__all__ = ["attention_kd_loss", "hidden_kd_loss", "kd_loss", "lr_schedule", "task_loss", "total_steps",
           "weight_optimizer"]


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


def hidden_kd_loss(student: list[jax.Array], teacher: list[jax.Array], attention_mask: jax.Array,
                   weights: jax.Array) -> jax.Array:
    r"""Hidden-state distillation (TinyBERT, TernaryBERT): the mean over the ``L + 1`` hidden states (embeddings
    output, then every layer) of the per-token mean squared error, over real tokens of weighted rows:

    .. math:: \frac{1}{L+1} \sum_{l=0}^{L} \frac{\sum_{b,s} w_b m_{bs} \lVert h^S_{l,bs} - h^T_{l,bs} \rVert^2 / d}
              {\sum_{b,s} w_b m_{bs}}

    ``student`` / ``teacher``: lists of ``[batch, seq, d]`` (the teacher's are treated as constants);
    ``attention_mask`` ``[batch, seq]`` (1 = real token); ``weights`` ``[batch]`` (0 = padding row).
    """
    if len(student) != len(teacher):
        raise ValueError(f"{len(student)} student hidden states vs {len(teacher)} of the teacher")
    return _token_mean_over_layers([jnp.mean(jnp.square(s - jax.lax.stop_gradient(t)), axis=-1)
                                    for s, t in zip(student, teacher, strict=True)], attention_mask, weights)


def _token_mean_over_layers(per_token: list[jax.Array], attention_mask: jax.Array, weights: jax.Array) -> jax.Array:
    """The mean over layers of each layer's ``[batch, seq]`` values averaged over real tokens of weighted rows."""
    m = attention_mask.astype(jnp.float32) * weights[:, None]
    denom = jnp.maximum(m.sum(), 1.0)
    return jnp.mean(jnp.stack([(x * m).sum() / denom for x in per_token]))


def attention_kd_loss(student: list[jax.Array], teacher: list[jax.Array], attention_mask: jax.Array,
                      weights: jax.Array) -> jax.Array:
    r"""Attention distillation as MiniLM (Wang et al. 2020; nasq's default model descends from it) does it: the KL
    divergence of the student's attention distribution from the teacher's, for every layer ``l``, head ``h`` and
    real query token, averaged over layers and heads and over real query tokens of weighted rows:

    .. math:: \frac{1}{L H} \sum_{l,h} \frac{\sum_{b,q} w_b m_{bq} \mathrm{KL}(A^T_{lbhq} \Vert A^S_{lbhq})}
              {\sum_{b,q} w_b m_{bq}}, \qquad
              \mathrm{KL}(t \Vert s) = \sum_k t_k (\log t_k - \log s_k)

    ``student`` / ``teacher``: lists of attention probabilities ``[batch, heads, query, key]`` (``Internals.
    attention``; the teacher's are constants); padded keys have teacher probability 0 and add nothing.
    ``attention_mask`` ``[batch, seq]`` (1 = real token); ``weights`` ``[batch]`` (0 = padding row). TinyBERT and
    TernaryBERT take the MSE of the unnormalised scores instead; the KL needs no choice of value for masked keys.
    """
    if len(student) != len(teacher):
        raise ValueError(f"{len(student)} student attention maps vs {len(teacher)} of the teacher")
    per_query = []
    for s, t in zip(student, teacher, strict=True):
        t = jax.lax.stop_gradient(t)
        # xlogy: 0 log 0 = 0 at padded keys; the floor keeps log s finite where the student's probability
        # underflows (its gradient there is 0, as is the teacher's weight on a padded key)
        kl = (xlogy(t, t) - t * jnp.log(jnp.maximum(s, 1e-30))).sum(-1)  # [b, h, q]
        per_query.append(kl.mean(1))  # mean over heads
    return _token_mean_over_layers(per_query, attention_mask, weights)


def internals_kd(student, teacher, attention_mask: jax.Array, weights: jax.Array, *, hidden_beta: float,
                 attention_beta: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The internals' distillation term of a loss and its parts, from the student's and the teacher's
    ``Internals`` (``model(..., return_internals=True)``; the teacher's are constants)::

        hidden_beta * hidden_kd_loss + attention_beta * attention_kd_loss

    each part computed, and reported as ``hidden_kd_loss`` / ``attention_kd_loss``, only when its beta is > 0.
    Fine-tuning / QAT and the search's weight (and ``task_kd`` gate) steps use this one definition."""
    total, terms = jnp.float32(0), {}
    if hidden_beta > 0:
        terms["hidden_kd_loss"] = hidden_kd_loss(student.hidden, teacher.hidden, attention_mask, weights)
        total = total + hidden_beta * terms["hidden_kd_loss"]
    if attention_beta > 0:
        terms["attention_kd_loss"] = attention_kd_loss(student.attention, teacher.attention, attention_mask, weights)
        total = total + attention_beta * terms["attention_kd_loss"]
    return total, terms


# ------------------------------------------------------------------------------------------ optimizer
def _decay_mask(params):
    """AdamW weight decay on matrices only: never biases, LayerNorm or LSQ steps (`QuantScale`, 1-D or 2-D).

    Under `optax.partition` (single-level search) leaves of the other partition arrive as `MaskedNode`s
    without `ndim`; they are not decayed."""
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


class GlobalAdamState(NamedTuple):
    """State of :func:`scale_by_global_adam`: step count, per-parameter first moment, ONE second moment."""

    count: jax.Array
    mu: optax.Updates
    nu: jax.Array


def scale_by_global_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> optax.GradientTransformation:
    """Adam with one second moment for the whole tree (the gate optimizer ``search.gate_optimizer=global_adam``):

        m_t = b1 m_{t-1} + (1 - b1) g_t                  (per parameter)
        v_t = b2 v_{t-1} + (1 - b2) mean_i g_{t,i}^2      (one scalar: the mean over every parameter)
        u_t = m_t / (1 - b1^t) / (sqrt(v_t / (1 - b2^t)) + eps)

    Adam divides each parameter's gradient by that parameter's own RMS, so every gate logit moves at about the
    same speed whatever the size of its gradient: the sign's consistency sets the allocation, and how much a
    group's width changes the loss is lost. Here only the overall scale is normalised: a gate whose gradient is
    10x larger moves 10x faster, so the budget price trades bytes against loss, group against group. With one
    parameter this is Adam.
    """

    def init(params):
        return GlobalAdamState(jnp.zeros([], jnp.int32), jax.tree.map(jnp.zeros_like, params),
                               jnp.zeros([], jnp.float32))

    def update(updates, state, params=None):
        del params
        leaves = jax.tree.leaves(updates)
        n = sum(x.size for x in leaves)
        mean_sq = sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves) / max(n, 1)
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
        nu = b2 * state.nu + (1 - b2) * mean_sq
        count = state.count + 1
        t = count.astype(jnp.float32)
        denom = jnp.sqrt(nu / (1 - b2**t)) + eps
        out = jax.tree.map(lambda m: (m / (1 - b1**t) / denom).astype(m.dtype), mu)
        return out, GlobalAdamState(count, mu, nu)

    return optax.GradientTransformation(init, update)


def gate_optimizer(name: str, lr: float) -> optax.GradientTransformation:
    """The search's gate-logit optimizer: ``adam`` (per-parameter, as DARTS and AQ-BERT) or ``global_adam``
    (:func:`scale_by_global_adam`)."""
    if name == "adam":
        return optax.adam(lr)
    if name == "global_adam":
        return optax.chain(scale_by_global_adam(), optax.scale(-lr))
    raise ValueError(f"unknown gate optimizer {name!r}: adam or global_adam")
