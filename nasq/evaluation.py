"""Side-by-side evaluation of a run's fake-quant (or fp32) model and its exported integer artifact."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from nasq.config import Config
from nasq.train.common import (
    load_model_dir,
    load_task_data,
    metrics_from_logits,
    model_dir_of,
    predict_logits,
)


def compare_run_and_artifact(run: str | Path, artifact: str | Path, cfg: Config, data=None) -> dict:
    """Dev metrics of the run's model (fake-quant) and of the artifact (int kernels), and their agreement.

    `data` (a `TaskData`) skips reading and tokenizing the task again when the caller has it."""
    from nasq.export.artifact import load_artifact
    from nasq.export.artifact import predict_logits as int_logits

    data = data or load_task_data(cfg, model_dir=model_dir_of(run))
    model, _ = load_model_dir(run)
    t0 = time.time()
    fq = predict_logits(model, data.dev, cfg.data.eval_batch_size, data.buckets)
    t_fq = time.time() - t0
    int_model = load_artifact(artifact)
    t0 = time.time()
    il = int_logits(int_model, data.dev, cfg.data.eval_batch_size, data.buckets)
    t_int = time.time() - t0
    out = {
        "task": data.task.name, "dev_rows": len(data.dev),
        "fake_quant": metrics_from_logits(data.task, fq, data.dev.labels),
        "int_artifact": metrics_from_logits(data.task, il, data.dev.labels),
        "max_abs_logit_diff": float(np.abs(fq - il).max()),
        "eval_wall_s": {"fake_quant": round(t_fq, 2), "int_artifact": round(t_int, 2)},
    }
    if not data.task.is_regression:
        out["prediction_agreement"] = float((fq.argmax(-1) == il.argmax(-1)).mean())
    return out
