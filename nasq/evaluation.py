"""The one evaluation path: logits of any model over an encoded split, metrics from logits, side-by-side agreement.

A "model" is anything called as ``model(input_ids, token_type_ids, attention_mask) -> logits``: a Flax NNX
BERT (fp32, fake-quant or supernet; run under one ``jax.jit`` per bucket length) or the integer
``nasq.kernels.int_bert.IntBert`` of an exported artifact (jitted already).
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from nasq.data.batching import Encoded, eval_batches
from nasq.data.glue import TaskSpec
from nasq.data.metrics import compute_metrics
from nasq.data.tasks import TaskData

__all__ = ["collect_logits", "compare_logits", "evaluate", "make_predict_fn", "metrics_from_logits",
           "predict_logits", "predictions_from_logits"]


def make_predict_fn(model: nnx.Module):
    """A jitted `batch -> logits` for `model` (recompiles once per bucket length)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def fwd(state, input_ids, token_type_ids, attention_mask):
        return nnx.merge(graphdef, state)(input_ids, token_type_ids, attention_mask)

    return lambda b: fwd(state, b.input_ids, b.token_type_ids, b.attention_mask)


def predict_logits(model, encoded: Encoded, batch_size: int, buckets, shard=None) -> np.ndarray:
    """Logits `[N, num_labels]` in the order of `encoded`; `shard` places each batch (`nasq.parallel`).

    ``model``: an NNX module (jitted here) or any callable ``(input_ids, token_type_ids, attention_mask)``."""
    if isinstance(model, nnx.Module):
        fn = make_predict_fn(model)
    else:
        def fn(b):
            return model(b.input_ids, b.token_type_ids, b.attention_mask)
    return collect_logits(fn, encoded, batch_size, buckets, shard)


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


def predictions_from_logits(task: TaskSpec, logits: np.ndarray) -> np.ndarray:
    """The predictions in ``logits`` ``[N, C]``: class ids (argmax), or the value for regression."""
    return logits[:, 0] if task.is_regression else logits.argmax(-1)


def metrics_from_logits(task: TaskSpec, logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The task's metrics of the predictions in ``logits`` (:func:`predictions_from_logits`)."""
    return compute_metrics(task, predictions_from_logits(task, logits), labels)


def evaluate(model, data: TaskData, batch_size: int, shard=None) -> dict[str, float]:
    """Dev-set metrics of ``model`` (see :func:`predict_logits`)."""
    return metrics_from_logits(data.task, predict_logits(model, data.dev, batch_size, data.buckets, shard),
                               data.dev.labels)


def compare_logits(task: TaskSpec, reference: np.ndarray, other: np.ndarray, labels: np.ndarray,
                   names: tuple[str, str] = ("fake_quant", "int_artifact")) -> dict:
    """Metrics of two models' logits on the same rows, their largest logit difference and (classification) the
    share of rows where their predictions agree."""
    out = {names[0]: metrics_from_logits(task, reference, labels), names[1]: metrics_from_logits(task, other, labels),
           "max_abs_logit_diff": float(np.abs(reference - other).max())}
    if not task.is_regression:
        out["prediction_agreement"] = float((reference.argmax(-1) == other.argmax(-1)).mean())
    return out
