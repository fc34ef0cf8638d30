"""How much of a dev-metric difference is the dev set's own sampling error? A paired bootstrap over dev rows.

The protocol (issue 16) calls a difference between two methods a result only beyond the larger std over seeds.
That spread is training noise on one fixed dev set. This script measures the other noise: which rows happen to
be in the dev set. For integer artifacts ``A, B, ...`` of one task it scores each on the dev split (the same
integer forward `nasq eval --artifact` runs), then draws ``R`` resamples of the dev rows with replacement, the
same resamples for every artifact (paired), and reports

    metric_std      = std over resamples of the artifact's metric                      (its sampling error)
    diff_mean/std   = mean/std over resamples of metric(X) - metric(A) for X after A    (paired: shared rows)
    p_better        = share of resamples where metric(X) > metric(A)
    disagree        = dev rows where X and A predict different labels

A comma-joined argument ``A0.nasq,A1.nasq,A2.nasq`` is one *group* (e.g. a method's seeds of one results row):
its metric on a resample is the mean of its members' metrics there, so ``diff_std`` between two groups is the dev
set's sampling error of the difference of the row's means, the figure to set beside the seeds' spread
(``disagree`` is then the members' mean, paired by position).

Usage (repo root):

    python experiments/dev_bootstrap.py --task cola --data-dir ../shared/data/glue A.nasq B.nasq [...] \
        [--resamples 2000] [--max-len 64] [--seed 0]

Prints one JSON line; the first artifact (or group) is the reference of the differences.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from nasq.config import build_config
from nasq.data.metrics import compute_metrics
from nasq.data.tasks import get_task
from nasq.errors import NasqError
from nasq.evaluation import predict_logits, predictions_from_logits
from nasq.export.reader import artifact_dev_set, load_artifact, load_tokenizer
from nasq.timing import environment


def resample_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    """``[resamples, n]`` row indices drawn with replacement (one shared draw, so comparisons are paired)."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def resampled_metric(task, preds: np.ndarray, labels: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """The task's main metric of ``preds`` on every resample of rows ``idx`` (``[R]``)."""
    key = task.main_metric
    return np.array([compute_metrics(task, preds[i], labels[i])[key] for i in idx])


def paired_summary(task, preds: dict[str, np.ndarray | list[np.ndarray]], labels: np.ndarray,
                   idx: np.ndarray) -> dict:
    """Per artifact (or group) its metric and sampling std; per one after the first, the paired difference to it.

    A value of ``preds`` is one artifact's predictions, or a list of them (a group: its metric is its members'
    mean, on the full dev set and on each resample).
    """
    groups = {k: [np.asarray(p)] if np.ndim(p) == 1 else [np.asarray(q) for q in p] for k, p in preds.items()}
    names = list(groups)
    key = task.main_metric
    boot = {k: np.mean([resampled_metric(task, p, labels, idx) for p in ps], axis=0) for k, ps in groups.items()}
    full = {k: float(np.mean([compute_metrics(task, p, labels)[key] for p in ps])) for k, ps in groups.items()}
    ref = names[0]
    out = {"reference": ref, "metric": key, "rows": len(labels), "resamples": len(idx), "artifacts": {}}
    for k in names:
        row = {"metric": full[k], "metric_std": float(np.std(boot[k], ddof=1))}
        if len(groups[k]) > 1:
            row["members"] = len(groups[k])
        if k != ref:
            d = boot[k] - boot[ref]
            row.update(diff=full[k] - full[ref], diff_mean=float(d.mean()), diff_std=float(np.std(d, ddof=1)),
                       p_better=float((d > 0).mean()))
            if len(groups[k]) == len(groups[ref]):
                dis = [int((p != q).sum()) for p, q in zip(groups[k], groups[ref])]
                row["disagree"] = dis[0] if len(dis) == 1 else float(np.mean(dis))
        out["artifacts"][k] = row
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("artifacts", nargs="+",
                    help=".nasq artifacts of one task, or comma-joined groups of them; the first is the reference")
    ap.add_argument("--task", required=True)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--max-len", type=int, default=64, help="as the artifacts were evaluated (MRPC: 112)")
    ap.add_argument("--resamples", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    try:
        out = bootstrap(a)
    except NasqError as e:  # a bad task, path or artifact: what was wrong, no traceback
        print(f"dev_bootstrap: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"bench": "dev-bootstrap", "task": a.task, **out, **environment(),
                      "command": " ".join(["python", *sys.argv])}))
    return 0


def bootstrap(a: argparse.Namespace) -> dict:
    """:func:`paired_summary` of the artifacts ``a.artifacts`` scored on ``a.task``'s dev split."""
    task = get_task(a.task)
    cfg = build_config(("dev_bootstrap", {"data": {"task": a.task, "data_dir": a.data_dir},
                                          "model": {"max_len": a.max_len}}))
    preds, labels = {}, None
    for arg in a.artifacts:
        members = [p for p in arg.split(",") if p]
        if not members:
            raise NasqError(f"empty artifact group {arg!r}: give .nasq paths, comma-joined for a group")
        group = []
        for path in members:
            model = load_artifact(path)
            _, dev, buckets = artifact_dev_set(model, load_tokenizer(path), cfg, source=path)
            logits = predict_logits(model, dev, cfg.data.eval_batch_size, buckets)
            group.append(predictions_from_logits(task, logits))
            if labels is not None and len(dev.labels) != len(labels):
                raise NasqError(f"{path}: its dev set has {len(dev.labels)} rows, the first artifact's {len(labels)}")
            labels = dev.labels
        preds[arg] = group[0] if len(group) == 1 else group
    return paired_summary(task, preds, labels, resample_indices(len(labels), a.resamples, a.seed))


if __name__ == "__main__":
    raise SystemExit(main())
