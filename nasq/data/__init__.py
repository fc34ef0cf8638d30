"""GLUE loading, tokenization/bucketing and metrics."""

from nasq.data.batching import (
    DEFAULT_BUCKETS,
    Batch,
    Encoded,
    buckets_for,
    encode,
    epoch_plan,
    eval_batches,
    heldout_split,
    iterate_batches,
    make_batch,
    steps_per_epoch,
)
from nasq.data.glue import TASKS, TaskSpec, get_task, load_split
from nasq.data.metrics import compute_metrics, main_metric_value

__all__ = [
    "DEFAULT_BUCKETS", "TASKS", "Batch", "Encoded", "TaskSpec", "buckets_for", "compute_metrics", "encode",
    "epoch_plan", "eval_batches", "get_task", "heldout_split", "iterate_batches", "load_split",
    "main_metric_value", "make_batch", "steps_per_epoch",
]
