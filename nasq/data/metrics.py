"""GLUE metrics in plain numpy.

Degenerate inputs (empty sets, zero variance, no positives) give 0.0 instead of NaN, so metrics stay finite
and comparable in search loops.
"""

from __future__ import annotations

import numpy as np

from nasq.data.glue import TaskSpec, get_task


def accuracy(pred, labels) -> float:
    r"""Fraction of exact matches: :math:`\frac1N\sum_i [\hat y_i = y_i]`."""
    p, y = np.asarray(pred), np.asarray(labels)
    return float(np.mean(p == y)) if y.size else 0.0


def f1(pred, labels) -> float:
    r"""Binary F1 of the positive class 1: :math:`\frac{2TP}{2TP + FP + FN}`."""
    p, y = np.asarray(pred) == 1, np.asarray(labels) == 1
    tp = np.sum(p & y)
    denom = 2 * tp + np.sum(p & ~y) + np.sum(~p & y)
    return float(2 * tp / denom) if denom else 0.0


def matthews_corrcoef(pred, labels) -> float:
    r"""Multiclass Matthews correlation from the confusion matrix :math:`C`.

    With :math:`t_k` true counts, :math:`p_k` predicted counts, :math:`c=\mathrm{tr}\,C`, :math:`s=N`:
    :math:`\mathrm{MCC} = \frac{cs - \sum_k p_k t_k}{\sqrt{(s^2-\sum_k p_k^2)(s^2-\sum_k t_k^2)}}`
    (binary case: :math:`\frac{TP\,TN - FP\,FN}{\sqrt{(TP+FP)(TP+FN)(TN+FP)(TN+FN)}}`).
    """
    p, y = np.asarray(pred).ravel(), np.asarray(labels).ravel()
    if y.size == 0:
        return 0.0
    classes, inv = np.unique(np.concatenate([p, y]), return_inverse=True)
    k = len(classes)
    cm = np.zeros((k, k), dtype=np.float64)
    np.add.at(cm, (inv[p.size:], inv[:p.size]), 1.0)  # rows: true, cols: predicted
    t, q = cm.sum(axis=1), cm.sum(axis=0)
    c, s = np.trace(cm), cm.sum()
    denom = np.sqrt((s * s - q @ q) * (s * s - t @ t))
    return float((c * s - q @ t) / denom) if denom > 0 else 0.0


def pearson(x, y) -> float:
    r""":math:`r = \frac{\sum (x-\bar x)(y-\bar y)}{\sqrt{\sum (x-\bar x)^2 \sum (y-\bar y)^2}}`."""
    a, b = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    if a.size < 2:
        return 0.0
    a, b = a - a.mean(), b - b.mean()
    denom = np.sqrt((a @ a) * (b @ b))
    return float(np.clip((a @ b) / denom, -1.0, 1.0)) if denom > 0 else 0.0


def rankdata(x) -> np.ndarray:
    """1-based ranks; ties get the average of the ranks they span."""
    a = np.asarray(x, dtype=np.float64).ravel()
    order = np.argsort(a, kind="mergesort")
    sa = a[order]
    starts = np.flatnonzero(np.r_[True, sa[1:] != sa[:-1]])
    ends = np.r_[starts[1:], a.size]
    avg = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(a.size, dtype=np.float64)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def spearman(x, y) -> float:
    """Pearson correlation of the average-tie ranks."""
    return pearson(rankdata(x), rankdata(y))


def compute_metrics(task: TaskSpec | str, predictions, labels) -> dict[str, float]:
    """All of ``task.metric_names``. Classification ``predictions`` are class ids, or ``[N, C]`` logits
    (argmaxed); regression predictions are floats (``[N]`` or ``[N, 1]``)."""
    spec = get_task(task)
    pred = np.asarray(predictions)
    y = np.asarray(labels)
    if spec.is_regression:
        pred = pred.reshape(-1).astype(np.float64)
    elif pred.ndim == 2:
        pred = pred.argmax(axis=-1)
    if pred.shape[0] != y.shape[0]:
        raise ValueError(f"{pred.shape[0]} predictions for {y.shape[0]} labels")
    out: dict[str, float] = {}
    for name in spec.metric_names:
        if name == "accuracy":
            out[name] = accuracy(pred, y)
        elif name == "f1":
            out[name] = f1(pred, y)
        elif name == "matthews":
            out[name] = matthews_corrcoef(pred, y)
        elif name == "pearson":
            out[name] = pearson(pred, y)
        elif name == "spearman":
            out[name] = spearman(pred, y)
        elif name == "pearson_spearman":
            out[name] = 0.5 * (pearson(pred, y) + spearman(pred, y))
        else:  # pragma: no cover - registry and this table are kept in sync by tests
            raise KeyError(name)
    return out


def main_metric_value(task: TaskSpec | str, metrics: dict[str, float]) -> float:
    """The task's headline number (``task.main_metric``) out of a `compute_metrics` dict."""
    return float(metrics[get_task(task).main_metric])
