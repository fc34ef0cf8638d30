"""Plots of a bit allocation (matplotlib ``Figure`` + Agg canvas, never pyplot, so importing this module does not
change a notebook's backend; PNGs saved with ``bbox_inches="tight"``).

* :func:`plot_heatmap` -- bits per row group: one row per tensor (layer x module), one column per group index,
  a discrete colour per bit width (pruned = black), colour bar ticks = the bit values;
* :func:`plot_module_bits` -- average bits (row-weighted, pruned = 0) per module type across layers;
* :func:`plot_trajectory` -- a search run's ``metrics.jsonl``: expected vs budget size, the budget price lambda,
  the temperature tau and the held-out gate loss against the step;
* :func:`plot_pareto` -- size (MB) vs metric per method from ``results.csv`` rows (the fp32 teacher a reference line);
* :func:`write_report` -- the PNGs that apply to a source plus a static ``report.html`` (relative ``<img>`` paths).
"""

from __future__ import annotations

import csv
import html
import json
import math
from collections.abc import Collection, Sequence
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.figure import Figure

from nasq.contract.plan import Plan
from nasq.errors import NasqError
from nasq.report.inspect import MODULE_ORDER, SourcedPlan, as_sourced_plan, format_table, tensor_stats

__all__ = [
    "bit_levels",
    "method_styles",
    "plot_heatmap",
    "plot_module_bits",
    "plot_pareto",
    "plot_trajectory",
    "read_metrics",
    "read_results",
    "write_report",
]

STANDARD_BITS = (0, 1, 2, 3, 4, 8)
PRUNED_COLOR = "#000000"


def _label(r: dict) -> str:
    return r["module"] if r["layer"] is None else f"L{r['layer']} {r['module']}"


def bit_levels(plan: Plan) -> list[int]:
    """The bit values the colour bar shows: 0/1/2/3/4/8 plus any other width the plan's choices use."""
    used = {b for t in plan.tensors for b in (*t.choices, *t.bits)}
    return sorted(set(STANDARD_BITS) | used)


def _figure(figsize: tuple[float, float]) -> Figure:
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    return out


def plot_heatmap(plan: Plan | SourcedPlan, out: str | Path, title: str | None = None) -> Path:
    """Bits per subgroup: rows = tensors (layer x module), columns = group index; tensors with fewer groups
    leave the remaining cells blank (light grey). Pruned groups are black."""
    a = as_sourced_plan(plan)
    stats = tensor_stats(a.plan)
    levels = bit_levels(a.plan)
    gmax = max(r["groups"] for r in stats)
    idx = {b: i for i, b in enumerate(levels)}
    grid = np.full((len(stats), gmax), np.nan)
    for i, r in enumerate(stats):
        grid[i, : r["groups"]] = [idx[b] for b in r["bits"]]
    cmap_colors = [PRUNED_COLOR] + list(matplotlib.colormaps["viridis"](np.linspace(0.08, 1.0, len(levels) - 1)))
    cmap = ListedColormap(cmap_colors)
    cmap.set_bad("#eeeeee")
    norm = BoundaryNorm(np.arange(len(levels) + 1) - 0.5, cmap.N)
    h = min(max(2.5, 0.22 * len(stats) + 1.2), 60)
    w = min(max(5.0, 0.09 * gmax + 3.5), 30)
    fig = _figure((w, h))
    ax = fig.subplots()
    im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    ax.set_yticks(range(len(stats)))
    ax.set_yticklabels([_label(r) for r in stats], fontsize=8 if len(stats) < 40 else 6)
    ax.set_xlabel("row group index (output features, in order)")
    ax.set_ylabel("layer x module")
    if gmax <= 16:
        ax.set_xticks(range(gmax))
    ax.set_title(title or f"bits per row group: {a.source}" + (" (pre-repair argmax)" if a.kind == "search" else ""),
                 fontsize=9)
    cb = fig.colorbar(im, ax=ax, ticks=range(len(levels)), fraction=0.04, pad=0.02)
    cb.ax.set_yticklabels([f"{b} (pruned)" if b == 0 else str(b) for b in levels])
    cb.set_label("bits")
    return _save(fig, out)


def plot_module_bits(plan: Plan | SourcedPlan, out: str | Path, title: str | None = None) -> Path:
    """Average bits per module type (q, k, v, o, ffn_in, ffn_out) against the layer index, one line each;
    tensors outside the encoder layers (embeddings, ...) are drawn as horizontal dashed lines."""
    a = as_sourced_plan(plan)
    stats = tensor_stats(a.plan)
    fig = _figure((7, 4))
    ax = fig.subplots()
    mods = [m for m in MODULE_ORDER if any(r["module"] == m and r["layer"] is not None for r in stats)]
    mods += sorted({r["module"] for r in stats if r["layer"] is not None} - set(mods))
    for m in mods:
        pts = sorted((r["layer"], r["avg_bits"]) for r in stats if r["module"] == m and r["layer"] is not None)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
    for r in stats:
        if r["layer"] is None:
            ax.axhline(r["avg_bits"], ls="--", lw=1, color="grey", label=f"{r['module']} ({r['path']})")
    layers = sorted({r["layer"] for r in stats if r["layer"] is not None})
    if layers:
        ax.set_xticks(layers)
    ax.set_xlabel("encoder layer")
    ax.set_ylabel("average bits (row-weighted, pruned = 0)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_title(title or f"average bits per module: {a.source}", fontsize=9)
    return _save(fig, out)


def read_metrics(path: str | Path) -> list[dict]:
    """The JSON lines of a ``metrics.jsonl`` (blank/partial trailing lines are skipped)."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise NasqError(f"{path} not found; a search run writes metrics.jsonl as it logs")
    recs = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line being written while we read
        if isinstance(rec, dict) and "step" in rec:
            recs.append(rec)
    if not recs:
        raise NasqError(f"{path} has no metric records yet")
    return recs


def plot_trajectory(metrics: str | Path | Sequence[dict], out: str | Path, title: str | None = None) -> Path:
    """Search trajectory against the step: expected size vs budget (MB; the normalised cost ratio for a latency
    budget), the budget price lambda, the temperature tau, and the held-out gate loss (train task loss dashed)."""
    recs = read_metrics(metrics) if isinstance(metrics, str | Path) else list(metrics)
    step = [r["step"] for r in recs]

    def col(k):
        return [r.get(k, math.nan) if r.get(k) is not None else math.nan for r in recs]

    fig = _figure((10, 6.5))
    axes = fig.subplots(2, 2, sharex=True)
    ax = axes[0, 0]
    if any("expected_mb" in r for r in recs):
        ax.plot(step, col("expected_mb"), label="expected size")
        ax.plot(step, col("budget_mb"), ls="--", color="red", label="budget")
        ax.set_ylabel("MB (searched tensors)")
    else:
        ax.plot(step, col("cost_ratio"), label="expected cost / budget")
        ax.axhline(1.0, ls="--", color="red", label="budget")
        ax.set_ylabel("expected cost / budget")
    ax.set_title("expected size vs budget")
    # Keep +-10% of the budget in view: a curve sitting on the budget must not be stretched into noise.
    ref = [v for v in (col("budget_mb") if any("expected_mb" in r for r in recs) else [1.0]) if not math.isnan(v)]
    if ref:
        lo, hi = ax.get_ylim()
        ax.set_ylim(min(lo, 0.9 * min(ref)), max(hi, 1.1 * max(ref)))
    ax.ticklabel_format(axis="y", useOffset=False)
    ax.legend(fontsize=8)
    axes[0, 1].plot(step, col("lambda"), color="tab:purple")
    axes[0, 1].set_title("budget price lambda")
    axes[0, 1].set_ylabel("lambda")
    axes[1, 0].plot(step, col("tau"), color="tab:orange")
    axes[1, 0].set_title("temperature tau")
    axes[1, 0].set_ylabel("tau")
    ax = axes[1, 1]
    ax.plot(step, col("gate_loss"), label="held-out gate loss")
    if any("task_loss" in r for r in recs):
        ax.plot(step, col("task_loss"), ls="--", alpha=0.7, label="train task loss")
    ax.set_title("loss")
    ax.set_ylabel("loss")
    ax.legend(fontsize=8)
    for a in axes.ravel():
        a.grid(alpha=0.3)
    for a in axes[1]:
        a.set_xlabel("step")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, out)


def read_results(source: str | Path) -> list[dict]:
    """Rows of a results CSV, or of every ``*.csv`` under a directory (``method``, ``metric`` and
    ``artifact_mb`` or ``encoder_mb`` required; others such as ``task``, ``metric_name`` kept as strings)."""
    p = Path(source)
    files = sorted(p.rglob("*.csv")) if p.is_dir() else [p]
    if not files or not all(f.is_file() for f in files):
        raise NasqError(f"{p}: no results CSV found (expected columns method, metric, artifact_mb or encoder_mb, "
                        "as in experiments/results/results.csv)")
    rows = []
    for f in files:
        with f.open(newline="") as fh:
            reader = csv.DictReader(fh)
            cols = set(reader.fieldnames or ())
            if not {"method", "metric"} <= cols or not cols & {"artifact_mb", "encoder_mb"}:
                raise NasqError(f"{f}: columns {sorted(cols)} lack method, metric and artifact_mb/encoder_mb")
            rows += [dict(r, _file=str(f)) for r in reader]
    return rows


def _num(x) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def pareto_points(rows: Sequence[dict], size: str) -> dict[tuple[str, str], list[tuple[float, float, float, int]]]:
    """``{(task, method): [(size, mean metric, sample std, n), ...]}`` sorted by size: the rows of one
    ``(task, method, budget)`` (one per seed) become one point, its std 0 for a single row."""
    groups: dict[tuple[str, str, str], list[tuple[float, float]]] = {}
    for r in rows:
        key = (r.get("task") or "", r["method"], str(r.get("budget") or ""))
        groups.setdefault(key, []).append((_num(r[size]), _num(r["metric"])))
    out: dict[tuple[str, str], list[tuple[float, float, float, int]]] = {}
    for (task, method, _), pts in groups.items():
        xs, ys = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])
        std = float(ys.std(ddof=1)) if len(ys) > 1 else 0.0
        out.setdefault((task, method), []).append((float(xs.mean()), float(ys.mean()), std, len(ys)))
    return {k: sorted(v) for k, v in out.items()}


_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<")  # 9 markers against 20 colours: unique for 180 methods


def method_styles(methods: Sequence[str]) -> dict[str, tuple[str, str]]:
    """``{method: (colour, marker)}``: one style per method, the same in every panel and distinct for up to 20
    methods (tab20's colours; markers cycle with a different period, so colour + marker stay unique beyond)."""
    cmap = matplotlib.colormaps["tab20"]
    names = sorted(set(methods))
    return {m: (matplotlib.colors.to_hex(cmap(i % 20)), _MARKERS[i % len(_MARKERS)]) for i, m in enumerate(names)}


def plot_pareto(source: str | Path | Sequence[dict], out: str | Path, *, size: str = "auto",
                title: str | None = None, reference: str = "fp32", budgets: Collection[str] | None = None,
                methods: Collection[str] | None = None) -> Path:
    """Size (MB) vs metric, one line (sorted by size) per method, one panel per task; the seeds of a
    ``(method, budget)`` are one point, mean ± sample std (:func:`pareto_points`). Each method keeps its colour and
    marker in every panel (:func:`method_styles`). Rows of method ``reference`` (the fp32 teacher) are drawn as a
    dashed horizontal line labelled with their size, so the size axis spans the compressed models only; it is
    logarithmic when those sizes span more than 10x.

    ``size``: ``artifact_mb``, ``encoder_mb`` or ``auto`` (``artifact_mb`` where every row has it, else
    ``encoder_mb``). ``budgets``: draw only the rows of these budget names (and the reference's), e.g. the
    budgets stated on the size that is the x axis (a whole-artifact budget drawn on encoder bytes would sit among
    encoder budgets it was never compared with). ``methods``: draw only these methods (and the reference), e.g. a
    readable plot of the main ones beside the plot of every variant."""
    rows = read_results(source) if isinstance(source, str | Path) else list(source)
    if budgets is not None:
        keep = set(budgets)
        rows = [r for r in rows if r["method"] == reference or str(r.get("budget") or "") in keep]
        if all(r["method"] == reference for r in rows):
            raise NasqError(f"no result rows of budget(s) {', '.join(sorted(keep))} to plot")
    if methods is not None:
        keep = set(methods)
        rows = [r for r in rows if r["method"] == reference or r["method"] in keep]
        if all(r["method"] == reference for r in rows):
            raise NasqError(f"no result rows of method(s) {', '.join(sorted(keep))} to plot")
    if size == "auto":
        size = "artifact_mb" if rows and all(not math.isnan(_num(r.get("artifact_mb"))) for r in rows) else \
            "encoder_mb"
    rows = [r for r in rows if not math.isnan(_num(r.get(size))) and not math.isnan(_num(r.get("metric")))]
    if not rows:
        raise NasqError(f"no result rows with numeric {size} and metric to plot")
    points = pareto_points(rows, size)
    # a panel per task with a compressed model (a task with only its teacher's row is left out)
    tasks = sorted({r.get("task") or "" for r in rows if r["method"] != reference}
                   or {r.get("task") or "" for r in rows})
    styles = method_styles([r["method"] for r in rows if r["method"] != reference])
    fig = _figure((6 * len(tasks), 4.5))
    axes = fig.subplots(1, len(tasks), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        tr = [r for r in rows if (r.get("task") or "") == task]
        for method in sorted({r["method"] for r in tr}):
            pts = points[(task, method)]
            n = max(p[3] for p in pts)
            label = method + (f" (mean ± std, n <= {n})" if n > 1 else "")
            if method == reference:
                ax.axhline(pts[-1][1], color="black", linestyle="--", linewidth=1,
                           label=f"{method} ({pts[-1][0]:.4g} MB)" + (f", mean of {n}" if n > 1 else ""))
                continue
            colour, marker = styles[method]
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker=marker,
                        color=colour, capsize=3, label=label)
        xs = [_num(r[size]) for r in tr if r["method"] != reference] or [_num(r[size]) for r in tr]
        if min(xs) > 0 and max(xs) / min(xs) > 10:
            from matplotlib.ticker import NullFormatter, ScalarFormatter

            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
        names = sorted({r.get("metric_name") or "metric" for r in tr})
        ax.set_xlabel(f"{size.replace('_mb', '')} size (MB)")
        ax.set_ylabel(" / ".join(names))
        ax.set_title(task or "results", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, out)


def write_report(source: SourcedPlan | Plan | str | Path, out_dir: str | Path) -> dict[str, Path]:
    """Heatmap + module lines (+ trajectory for a search run) as PNGs and a ``report.html`` with the text
    table and the images (relative paths). Returns ``{name: path}``."""
    a = as_sourced_plan(source)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"heatmap": plot_heatmap(a, out_dir / "bits_heatmap.png"),
             "modules": plot_module_bits(a, out_dir / "module_bits.png")}
    if a.run_dir is not None and (a.run_dir / "metrics.jsonl").is_file():
        files["trajectory"] = plot_trajectory(a.run_dir / "metrics.jsonl", out_dir / "trajectory.png",
                                              title=f"search trajectory: {a.run_dir}")
    captions = {"heatmap": "bits per row group (black = pruned)", "modules": "average bits per module type",
                "trajectory": "search trajectory (metrics.jsonl)"}
    imgs = "\n".join(f'<h2>{captions[k]}</h2>\n<img src="{html.escape(p.name)}" alt="{captions[k]}">'
                     for k, p in files.items())
    page = (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>nasq report: {html.escape(a.source)}"
            f"</title>\n<style>body{{font-family:sans-serif;margin:2em}} img{{max-width:100%}} "
            f"pre{{font-size:12px;background:#f6f6f6;padding:1em;overflow-x:auto}}</style></head><body>\n"
            f"<h1>nasq report: {html.escape(a.source)}</h1>\n<pre>{html.escape(format_table(a))}</pre>\n{imgs}\n"
            f"</body></html>\n")
    files["html"] = out_dir / "report.html"
    files["html"].write_text(page)
    return files
