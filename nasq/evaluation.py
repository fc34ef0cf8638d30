"""Side-by-side evaluation of a run's fake-quant (or fp32) model and its exported integer artifact."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from nasq.config import Config
from nasq.data.batching import eval_batches
from nasq.train.common import load_model_dir, load_task_data, metrics_from_logits, predict_logits


def compare_run_and_artifact(run: str | Path, artifact: str | Path, cfg: Config, data=None) -> dict:
    """Dev metrics of the run's model (fake-quant) and of the artifact (int kernels), and their agreement.

    `data` (a `TaskData`) skips reading and tokenizing the task again when the caller has it."""
    from nasq.export.artifact import load_artifact

    run = Path(run)
    model_dir = run / "model" if (run / "model").is_dir() else run
    data = data or load_task_data(cfg, model_dir=model_dir)
    model, _ = load_model_dir(run)
    t0 = time.time()
    fq = predict_logits(model, data.dev, cfg.data.eval_batch_size, data.buckets)
    t_fq = time.time() - t0
    int_model = load_artifact(artifact)
    t0 = time.time()
    il = np.zeros_like(fq)
    for b in eval_batches(data.dev, cfg.data.eval_batch_size, data.buckets):
        lg = np.asarray(int_model(b.input_ids, b.token_type_ids, b.attention_mask))
        real = b.index >= 0
        il[b.index[real]] = lg[real]
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
