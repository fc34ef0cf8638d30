#!/usr/bin/env python
"""The resumable results grid: every (task, budget, method) cell of `experiments/grid.yaml` through the `nasq` CLI.

Usage (from the repo root)::

    python experiments/grid.py [--config experiments/grid.yaml] [--only task=sst2,budget=avg2,method=nasq]
                               [--dry-run] [--collect-only] [--runs runs/grid] [--results experiments/results]
                               [--data-dir DIR] [--no-plot] [--ray [--ray-address ADDR] [--cpus-per-stage N]]

``--only`` keeps the cells matching every given key (``task``, ``budget``, ``method``, ``seed``; alternatives with
``|``: ``method=nasq|uniform``); the fp32 teacher of a selected cell's task is always run first when missing.

Seeds and protocol (``experiments/protocol.yaml``, issue 16): a config with ``seeds: [0, 1, 2]`` runs every
quantized cell once per seed in ``.../{method}/seed{N}/`` (one teacher per task, seed ``seed``), and its results page
reports mean ± std over seeds, nasq's margin over the best baseline (a result only beyond the spread) and the QAT
dev curves. ``protocol:`` switches: ``equal_compute`` (baselines' QAT gets the search's ``max_steps`` on top),
``spend_leftover`` (``nasq finalize --spend-leftover``), ``init_from_search`` (nasq's QAT ``--init-from`` its
search).
``extends: OTHER.yaml`` (relative to the config) merges the config over OTHER's, mappings key by key: e.g.
``experiments/protocol_qat2x.yaml`` is the protocol with ``stages: {qat: {max_steps: 1300}}``.
``--dry-run`` prints the commands that would run. ``--collect-only`` only rebuilds the results table and plot.

``--ray`` runs the same cells on Ray (``pip install -e '.[sweep]'``; :func:`run_grid_ray`): an embedded local Ray
by default, a cluster with ``--ray-address``; every stage is a Ray task declaring the CPUs of the config's
``resources: {search: {num_cpus: 4}, ...}`` (default ``--cpus-per-stage``), the teachers first, then every
selected cell at once. Same commands, same RUNS layout, same resume and results as without Ray.

Every stage is a subprocess running exactly the ``nasq ...`` command line written to ``RUNS/grid.log`` (and to
each cell's ``timing.json``), from the current directory, with ``NASQ_NO_PROGRESS=1``. Layout::

    RUNS/grid.log                               every command line, skip and failure, per invocation
    RUNS/_spaces/<space>_choices<..>.yaml       derived spaces (budgets' `space_choices`, e.g. uniform 3 bits)
    RUNS/{task}/fp32/                           teacher (`nasq finetune`), + timing.json
    RUNS/{task}/logs/fp32.log                   its output
    RUNS/{task}/{budget}/{method}/plan.json     `nasq baseline ...` or `nasq finalize search/`
    RUNS/{task}/{budget}/nasq/search/           `nasq search` (searched methods only)
    RUNS/{task}/{budget}/nasq_hinit/init_plan.json  `nasq baseline hessian` (the search's initial gates)
    RUNS/{task}/{budget}/nasq_minit/init_plan.json  `nasq baseline measured` (the same, held with logit 8)
    RUNS/{task}/{budget}/nasq_mprior/init_plan.json `nasq baseline measured` (its damages: the gates' prior)
    RUNS/{task}/{budget}/nasq_mprior10/init_plan.json  the same, the prior weighted 10
    RUNS/{task}/{budget}/nasq_front/plan.json   `nasq finalize RUNS/{task}/{front_from}/nasq/search --avg-bits ..`
    RUNS/{task}/{budget}/{method}/qat/          `nasq finetune --plan plan.json --teacher ...` (QAT + KD)
    RUNS/{task}/{budget}/{method}/model.nasq/   `nasq export qat`
    RUNS/{task}/{budget}/{method}/eval.json     stdout of `nasq eval qat --artifact model.nasq ...`
    RUNS/{task}/{budget}/{method}/timing.json   per stage: command, wall seconds, rc, git revision, date
    RUNS/{task}/{budget}/{method}/logs/*.log    per stage output
    (with ``seeds``: every RUNS/{task}/{budget}/{method}/... path above sits in .../{method}/seed{N}/)

Resuming: a cell whose eval.json exists is skipped; a stage whose output is complete is skipped (run dir with
run.json status "done", plan.json, model.nasq/manifest.json); an unfinished run dir is continued with
``--resume`` (from its last checkpoint), an export without manifest redone with ``--overwrite``. Nothing is
recomputed when its output exists: after changing a recipe, delete the affected cells. A failing stage is
logged, its cell is marked failed and the grid goes on; the exit status is 1 if any stage failed.

Results (``RESULTS/results.csv``, ``RESULTS/results.md``, ``RESULTS/pareto.png`` via ``nasq plot --pareto``, and
with ``plot.main_methods`` ``RESULTS/pareto_main.png`` of those methods only):
one row per cell of the config, missing cells included ("not run"). ``metric`` is the task's main dev metric
through the integer artifact (fp32 rows: the teacher's dev metric from its run.json), ``fake_quant_metric`` the
QAT model's (with ``train.ema_decay`` its weight average; ``raw_weights_metric`` / ``raw_dev_curve`` then the
raw weights' final metric and curve, from the same run), sizes from the plan's totals (fp32 rows: the teacher's fp32 tensors),
``latency_ms`` (latency budgets only: ``latency_ms: T`` with ``latency_table: PATH``) the plan's latency on the
budget's table, which decides ``within_budget`` there (uniform and rule cells run without a budget flag, as
references; magnitude prunes to the latency), ``search_s`` the wall time of
the plan stages (search + finalize, or the baseline command), ``finetune_s`` of the QAT run (fp32: the
teacher's). ``rank`` orders the measured within-budget quantized methods of a (task, budget) by metric (ties
share a rank); the md table bolds rank 1 and flags baselines at or above nasq. The notes column also reports
run dirs whose config.yaml differs from the grid's recipe (e.g. adopted runs).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import functools
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nasq.config import deep_update, load_yaml
from nasq.contract.cost import load_latency_table, plan_latency_ms
from nasq.contract.damage import plan_prediction
from nasq.contract.plan import Plan
from nasq.errors import NasqError
from nasq.io import git_rev, write_atomic
from nasq.pipeline import output_complete

REPO = Path(__file__).resolve().parents[1]
METHODS = ("fp32", "uniform", "rule", "hessian", "hessian_t", "fisher", "fisher_t", "measured", "random",
           "magnitude", "nasq", "nasq_hinit", "nasq_minit", "nasq_mprior", "nasq_mprior10", "nasq_gumbel",
           "nasq_gkd", "nasq_gadam", "nasq_front", "nasq_measured", "nasq_ge4", "nasq_pm", "nasq_frozen",
           "nasq_pmfrozen", "measured_hs", "nasq_ikd", "measured_fs", "fisher_w", "fisher_ws")
# hessian_t: the Hessian baseline with HAWQ's per-layer trace (`nasq baseline hessian --granularity tensor`): each
# group scored by its tensor's Tr(H)/n, the hessian recipe updated by the `hessian_t` stage's (more probes): the
# per-group estimates of the hessian recipe barely agree between independent draws, its per-tensor ones only
# partly (experiments/hessian_reliability.py)
# fisher, fisher_t: the Hessian baseline with the loss's Gauss-Newton matrix (the Fisher of the model's predictions)
# in place of the Hessian (`--curvature fisher`: exact over the rows, never negative), per row group and per tensor,
# on the `fisher` stage's rows (over `hessian`'s recipe): a second-order baseline whose traces are neither probe
# noise nor negative
# the Hessian baseline's variants: `nasq baseline hessian` flags, and the stage whose recipe updates `hessian`'s
HESSIAN_VARIANTS = {"hessian": ([], "hessian"), "hessian_t": (["--granularity", "tensor"], "hessian_t"),
                    "fisher": (["--curvature", "fisher"], "fisher"),
                    "fisher_t": (["--curvature", "fisher", "--granularity", "tensor"], "fisher"),
                    "fisher_w": (["--curvature", "fisher", "--granularity", "weight"], "fisher"),
                    "fisher_ws": (["--curvature", "fisher", "--granularity", "weight", "--shrinkage", "0.5"],
                                  "fisher")}
# the searched methods (the rest are baselines): nasq, nasq with its gates started on the same seed's Hessian
# plan (`search.gate_init=plan`, issue 16's gate-initialisation lever), nasq with Gumbel-sampled gates
# (`search.gumbel=true`: the forward sees near-discrete choices, so the gates feel each choice's own loss rather
# than the loss of the averaged weight), nasq with KD to the teacher in the gate step (`search.gate_loss=task_kd`:
# a dense signal where held-out labels of a well-fit model say little), nasq with one second moment for all gate
# logits (`search.gate_optimizer=global_adam`: a larger loss gradient moves its gate faster), and nasq_front: the
# nasq search of the budget `front_from` (same seed) finalized at this budget (issue 16's "one search, a whole
# front"); nasq_mprior: nasq with the same seed's measured damages in its gate loss (`search.damage_prior`: the
# expected measured output KL of the gates' widths, the curvature the first-order gate gradient misses), weighted
# 1 (the same nats as the task loss) or 10 (nasq_mprior10: at weight 1 the seed-0 gates still followed the task
# gradient, NOTES.md)
SEARCHED = ("nasq", "nasq_hinit", "nasq_minit", "nasq_mprior", "nasq_mprior10", "nasq_gumbel", "nasq_gkd",
            "nasq_gadam", "nasq_front", "nasq_ge4", "nasq_pm", "nasq_frozen", "nasq_pmfrozen", "nasq_ikd")
# nasq_ikd: nasq distilling the teacher's internals in the search (issue 16's "hidden-state and attention
# distillation in the search"): kd.hidden_beta=1 and kd.attention_beta=1 in the weight step, and with KD in the
# gate step (search.gate_loss=task_kd) in the gate step too; its QAT is nasq's (logits KD)
# nasq_frozen: the gates alone on the frozen teacher (`search.train_weights=false`, KD in the gate loss): they
# see the joint output damage of the teacher at their widths (what `measured` measures one tensor at a time),
# not weights co-adapted to the mixture. It trains no weights, so its QAT is a baseline's: from the teacher, with
# the search's steps on top (equal compute)
# nasq_pmfrozen: nasq_frozen with one gate per encoder matrix (nasq_pm's space): the gates alone on the frozen
# teacher, moving whole tensors as the measured allocation does, but seeing the joint damage of all of them at once
TEACHER_QAT = ("nasq_frozen", "nasq_pmfrozen")
# nasq_ge4: nasq with one gate step per 4 weight steps (`search.gate_every=4`, issue 17's cheaper search
# iteration); the same weight steps, so the same compute for the baselines
# nasq_measured: a search over whole plans by measurement, not by gates: the measured allocation refined
# (`nasq baseline measured --refine-rounds`: each tensor's damage re-measured with the others at the previous
# plan's widths, re-solved; the plan of least measured output KL kept). It trains nothing before QAT, so like a
# baseline it gets the search's steps as extra QAT steps (equal compute), and it is compared with the baselines
# in the summary as nasq's searches are
# measured_hs: the measured allocation with each tensor's measured damage split over its row groups by the Hessian
# estimate (`nasq baseline measured --spread hessian`, the hessian recipe's probes), so a tensor's most sensitive
# rows can keep more bits, as in the Hessian plans; compared with the baselines (measured among them) as nasq's
# variants are
REFINE_ROUNDS = 2
# measured_fs: the same split by the Gauss-Newton traces (`--spread fisher`: exact on the measured rows, never
# negative; the Hutchinson shares of measured_hs are mostly noise per group, experiments/hessian_reliability.py)
# fisher_w: the Fisher allocation per weight (`--granularity weight`: each weight's Gauss-Newton diagonal times its
# own quantization error, summed over the group, Optimal Brain Damage's estimate), on the `fisher` stage's rows: a
# candidate for nasq's default, compared with the baselines as nasq's variants are; the baselines' QAT length
# fisher_ws: fisher_w with each weight's curvature shrunk halfway toward its tensor's mean (`--shrinkage 0.5`: the
# damage the mean of the per-weight and the per-tensor estimates); neither granularity won at every row, and a
# weight's own diagonal counts only the rows drawn; the baselines' QAT length
OURS = (*SEARCHED, "nasq_measured", "measured_hs", "measured_fs", "fisher_w", "fisher_ws")
# baselines whose cell another budget may share (`budgets.B.METHOD.same_as`): the same plan and recipe, run once
SHARABLE = ("uniform", "magnitude")
# the search settings of the variants of nasq's recipe; nasq_minit: the gates start on the same seed's measured
# plan with a logit of 8 (nasq_hinit's default 2 was forgotten in 300 gate steps), so the search refines it
VARIANT_SETS = {"nasq_gumbel": ["--set", "search.gumbel=true"], "nasq_gkd": ["--set", "search.gate_loss=task_kd"],
                "nasq_gadam": ["--set", "search.gate_optimizer=global_adam"],
                "nasq_minit": ["--set", "search.init_plan_logit=8"],
                "nasq_mprior10": ["--set", "search.damage_weight=10"],
                "nasq_ge4": ["--set", "search.gate_every=4"],
                "nasq_ikd": ["--set", "kd.hidden_beta=1", "--set", "kd.attention_beta=1", "--set",
                             "search.gate_loss=task_kd"], "nasq_pm": ["--set", "search.gate_every=4"],
                "nasq_frozen": ["--set", "search.train_weights=false", "--set", "search.gate_loss=task_kd"]}
# nasq_pm: nasq_ge4 with one gate per encoder matrix instead of one per 128 rows (the same choices; scales stay per
# row): the 128-row gates spread each tensor's groups over every width, where the measured allocation moves whole
# tensors; one gate per matrix hears the gate signal summed over its tensor
SEARCH_SPACE = {"nasq_pm": {"aqbert_128g_w1234": "per_matrix_w1234"}}
# nasq_pmfrozen: nasq_frozen's settings in nasq_pm's space
VARIANT_SETS["nasq_pmfrozen"], SEARCH_SPACE["nasq_pmfrozen"] = VARIANT_SETS["nasq_frozen"], SEARCH_SPACE["nasq_pm"]
# the searched methods that read a baseline plan of the same seed (that baseline cell's command, init_plan.json):
# their gates start on it (search.gate_init=plan), or nasq_mprior's gate loss takes its measured damages
INIT_PLAN = {"nasq_hinit": "hessian", "nasq_minit": "measured", "nasq_mprior": "measured",
             "nasq_mprior10": "measured"}
PLAN_AS_PRIOR = ("nasq_mprior", "nasq_mprior10")
STAGE_KEYS = {
    "finetune": {"max_steps", "epochs", "train_subset", "lr", "set"},
    "search": {"max_steps", "epochs", "train_subset", "lr", "set", "mode"},
    "hessian": {"train_subset", "n_batches", "n_probes", "set"},
    "hessian_t": {"train_subset", "n_batches", "n_probes", "set"},  # over `hessian`'s recipe
    "fisher": {"train_subset", "n_batches", "set"},  # over `hessian`'s recipe
    "qat": {"max_steps", "epochs", "train_subset", "lr", "set"},
}
# `protocol:` switches (all default false), see experiments/protocol.yaml:
PROTOCOL_KEYS = {
    "equal_compute": "baselines' QAT runs the search's max_steps more steps (the search's training counts)",
    "init_from_search": "nasq's QAT starts from the search's weights and steps (`--init-from`)",
    "spend_leftover": "`nasq finalize --spend-leftover`: the plan spends the bytes the knapsack leaves unused",
}
# Stage names of a cell (`Stage.name`); `resources.<stage>.num_cpus` declares what each needs on Ray.
STAGE_NAMES = ("teacher", "plan", "search", "finalize", "qat", "export", "eval")
# Config keys that do not change results: not reported as recipe mismatches of existing runs.
LOGGING_KEYS = {"train.log_every", "train.checkpoint_every", "train.eval_every"}
# the baselines that allocate by bytes only (`nasq baseline` refuses them a latency budget; magnitude takes one)
BYTE_ONLY = ("uniform", "rule")
# a budget is exactly one of these (`latency_ms` with its `latency_table`: the plans' latency on that table)
BUDGET_KINDS = ("avg_bits", "budget_mb", "ratio", "latency_ms")
CSV_COLUMNS = ["task", "method", "budget", "seed", "status", "metric_name", "metric", "fake_quant_metric",
               "raw_weights_metric", "prediction_agreement", "encoder_mb", "artifact_mb", "avg_bits", "latency_ms",
               "within_budget", "rank", "predicted_kl", "predicted_removed", "search_s", "finetune_s", "qat_steps", "dev_curve",
               "raw_dev_curve", "command", "git_rev", "date", "note"]


class GridError(Exception):
    """A problem with the grid config or the command line (exit 2, no traceback)."""


# ------------------------------------------------------------------------------------------------ config


def _fmt(v: Any) -> str:
    """A YAML value as a `--set KEY=VALUE` / flag value that nasq parses back to the same value."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list | tuple | dict):
        return json.dumps(v, separators=(",", ":"))
    return str(v)


def read_grid_yaml(path: Path, _seen: tuple[Path, ...] = ()) -> dict:
    """The grid YAML at ``path`` with its ``extends: OTHER.yaml`` (a path relative to this file) resolved: this
    file's keys merged over OTHER's (mappings key by key, e.g. ``stages: {qat: {max_steps: N}}`` changes one
    recipe value; lists and scalars replace)."""
    try:
        cfg = load_yaml(path)  # the same reader (and messages) as `nasq --config`
    except NasqError as e:
        raise GridError(str(e)) from None
    if "extends" not in cfg:
        return cfg
    base = cfg.pop("extends")
    if not isinstance(base, str) or not base:
        raise GridError(f"{path}: `extends` must be the path of another grid YAML (relative to this file)")
    seen, base_path = (*_seen, Path(path).resolve()), (Path(path).parent / base).resolve()
    if base_path in seen:
        raise GridError(f"{path}: `extends: {base}` makes a cycle")
    return deep_update(read_grid_yaml(base_path, seen), cfg)


def load_grid(path: Path) -> dict:
    """Read and validate the grid YAML (``extends`` resolved); errors name the file and key."""
    cfg = read_grid_yaml(path)
    allowed = {"model", "data_dir", "seed", "seeds", "tasks", "common", "stages", "budgets", "methods", "plot",
               "protocol", "resources"}
    if extra := set(cfg) - allowed:
        raise GridError(f"{path}: unknown keys {sorted(extra)}; allowed: {sorted(allowed)}")
    for k in ("model", "tasks", "budgets", "methods"):
        if not cfg.get(k):
            raise GridError(f"{path}: `{k}` is required")
    tasks = cfg["tasks"]
    if isinstance(tasks, list):
        tasks = {t: {} for t in tasks}
    if not isinstance(tasks, dict):
        raise GridError(f"{path}: `tasks` must be a list of task names or a mapping task -> stage overrides")
    cfg["tasks"] = {str(t): (o or {}) for t, o in tasks.items()}
    stages = cfg.setdefault("stages", {}) or {}
    cfg["stages"] = stages
    for scope, st in [("stages", stages)] + [(f"tasks.{t}", o) for t, o in cfg["tasks"].items()]:
        if not isinstance(st, dict):
            raise GridError(f"{path}: `{scope}` must be a mapping of stage -> recipe")
        for name, rec in st.items():
            if name not in STAGE_KEYS:
                raise GridError(f"{path}: `{scope}.{name}`: unknown stage; stages are {sorted(STAGE_KEYS)}")
            if bad := set(rec or {}) - STAGE_KEYS[name]:
                raise GridError(f"{path}: `{scope}.{name}`: unknown keys {sorted(bad)}; allowed: "
                                f"{sorted(STAGE_KEYS[name])}")
    methods = list(cfg["methods"])
    if bad := [m for m in methods if m not in METHODS]:
        raise GridError(f"{path}: `methods`: unknown {bad}; choose from {list(METHODS)}")
    cfg["methods"] = methods
    if not isinstance(cfg["budgets"], dict):
        raise GridError(f"{path}: `budgets` must be a mapping name -> {{avg_bits|budget_mb, space, uniform}}")
    for name, b in cfg["budgets"].items():
        where = f"{path}: `budgets.{name}`"
        if not isinstance(b, dict):
            raise GridError(f"{where} must be a mapping")
        if extra := set(b) - {"avg_bits", "budget_mb", "ratio", "latency_ms", "latency_table", "convention", "space",
                              "uniform", "rule", "magnitude", "front_from"}:
            raise GridError(f"{where}: unknown keys {sorted(extra)}")
        if (src := b.get("front_from")) is not None:  # nasq_front: another budget's nasq search, same space
            other = cfg["budgets"].get(src)
            if src == name or not isinstance(other, dict) or "front_from" in other:
                raise GridError(f"{where}.front_from: {src!r} must be another budget that runs its own search")
            if str(other.get("space", "aqbert_128g")) != str(b.get("space", "aqbert_128g")):
                raise GridError(f"{where}.front_from: budget {src!r} searches in space "
                                f"{other.get('space', 'aqbert_128g')!r}, this budget's space is "
                                f"{b.get('space', 'aqbert_128g')!r}: a search finalizes in its own space only")
        if sum(k in b for k in BUDGET_KINDS) != 1:
            raise GridError(f"{where}: give exactly one of {' / '.join(BUDGET_KINDS)}")
        if ("latency_ms" in b) != ("latency_table" in b) or ("latency_ms" in b and (
                isinstance(b["latency_ms"], bool) or not isinstance(b["latency_ms"], int | float)
                or not b["latency_ms"] > 0 or not isinstance(b["latency_table"], str))):
            raise GridError(f"{where}: a latency budget is `latency_ms: T` (ms, > 0) with `latency_table: PATH` (a "
                            "`nasq profile` table, relative to the repository root), both or neither")
        if "latency_ms" in b and (b.get("front_from") or b.get("convention")):
            raise GridError(f"{where}: a latency budget takes no front_from or convention (it covers the searched "
                            "tensors on its table)")
        u = b.get("uniform")
        if "uniform" in methods and u is None:
            raise GridError(f"{where}: method uniform needs `uniform: {{bits: B}}` (or `{{skip: reason}}`)")
        if u is not None:
            if not isinstance(u, dict):
                raise GridError(f"{where}.uniform must be a mapping {{bits, space_choices, budget, note}} or "
                                "{skip: reason}")
            if extra := set(u) - {"bits", "space", "space_choices", "budget", "note", "skip", "same_as"}:
                raise GridError(f"{where}.uniform: unknown keys {sorted(extra)}")
            if "skip" not in u and not isinstance(u.get("bits"), int):
                raise GridError(f"{where}.uniform.bits: an integer bit width is required")
        r = b.get("rule")  # a hand allocation by module type: `nasq baseline rule` (no rule: the cell is skipped)
        if r is not None and (not isinstance(r, dict) or set(r) - {"bits", "rule_bits", "note"}
                              or not isinstance(r.get("bits"), int) or not isinstance(r.get("rule_bits"), dict)
                              or not r["rule_bits"]
                              or not all(isinstance(v, int) and not isinstance(v, bool) for v in r["rule_bits"].values())):
            raise GridError(f"{where}.rule must be {{bits: B, rule_bits: {{RULE: BITS, ...}}, note}} (the space's "
                            "rules by name), e.g. {bits: 2, rule_bits: {attention_qkv: 3, attention_output: 3}}")
        m = b.get("magnitude")  # magnitude pruning: `nasq baseline magnitude` (no entry: the cell is skipped)
        if m is not None and (not isinstance(m, dict) or set(m) - {"bits", "note", "same_as"}
                              or not isinstance(m.get("bits"), int) or isinstance(m.get("bits"), bool)):
            raise GridError(f"{where}.magnitude must be {{bits: B, note, same_as}}: every group at B bits, the groups "
                            "of least weight magnitude pruned until the plan fits its bytes or latency (the space "
                            "must offer 0 bits)")
    # {uniform,magnitude}.same_as: another budget's cell of that method is this one (run once). It asserts that both
    # budgets' plans are the same: checked here are the bits (and for magnitude, whose plan is cut to the budget,
    # the budget); the spaces must cover the same tensors in the same row groups (aqbert_128g and its _w234 /
    # _w1234 variants do), which needs the model to check, so it is on the config's author.
    for name, b in cfg["budgets"].items():
        for method in SHARABLE:
            ref = (b.get(method) or {}).get("same_as")
            if ref is None:
                continue
            where = f"{path}: `budgets.{name}.{method}.same_as`"
            ob = cfg["budgets"].get(ref) if ref != name else None
            other = (ob or {}).get(method)
            if not isinstance(other, dict) or "skip" in other or "same_as" in other:
                raise GridError(f"{where}: {ref!r} must be another budget with its own {method} cell")
            if other.get("bits") != b[method].get("bits") or other.get("space_choices") != b[method].get(
                    "space_choices"):
                raise GridError(f"{where}: budget {ref!r} runs {method} {other.get('bits')}-bit, not "
                                f"{b[method].get('bits')}-bit: only the same plan can be shared")
            if method == "magnitude" and budget_flags(ob) != budget_flags(b):
                raise GridError(f"{where}: budget {ref!r} is {budget_flags(ob)}, this one {budget_flags(b)}: a "
                                "magnitude plan is pruned to its budget, so only the same budget can share it")
    cfg.setdefault("common", {})
    cfg["common"] = cfg["common"] or {}
    cfg.setdefault("plot", {})
    cfg["plot"] = cfg["plot"] or {}
    if not isinstance(cfg["plot"], dict) or set(cfg["plot"]) - {"size", "main_methods"}:
        raise GridError(f"{path}: plot takes size and main_methods, got {cfg['plot']!r}")
    main = cfg["plot"].get("main_methods")
    if main is not None and (not isinstance(main, list) or not main
                             or not all(isinstance(m, str) and m in METHODS for m in main)):
        raise GridError(f"{path}: plot.main_methods must be a list of the grid's methods ({', '.join(METHODS)}), "
                        f"got {main!r}")
    cfg.setdefault("data_dir", "../shared/data/glue")
    cfg.setdefault("seed", 0)
    seeds = cfg.get("seeds")
    if seeds is not None and (not isinstance(seeds, list) or not seeds or
                              not all(isinstance(x, int) and not isinstance(x, bool) for x in seeds)
                              or len(set(seeds)) != len(seeds)):
        raise GridError(f"{path}: `seeds` must be a non-empty list of distinct integers, got {seeds!r}")
    proto = cfg.get("protocol") or {}
    if not isinstance(proto, dict) or (bad := set(proto) - set(PROTOCOL_KEYS)):
        raise GridError(f"{path}: `protocol` must be a mapping with keys from {sorted(PROTOCOL_KEYS)}")
    if bad := [k for k, v in proto.items() if not isinstance(v, bool)]:
        raise GridError(f"{path}: `protocol.{bad[0]}` must be true or false")
    cfg["protocol"] = {k: bool(proto.get(k, False)) for k in PROTOCOL_KEYS}
    res = cfg.get("resources") or {}
    if not isinstance(res, dict) or (bad := set(res) - set(STAGE_NAMES)):
        raise GridError(f"{path}: `resources` must map stages {list(STAGE_NAMES)} to {{num_cpus: N}}")
    for name, r in res.items():
        if not isinstance(r, dict) or set(r) - {"num_cpus"} or not isinstance(r.get("num_cpus"), (int, float)) \
                or isinstance(r.get("num_cpus"), bool) or r["num_cpus"] <= 0:
            raise GridError(f"{path}: `resources.{name}` must be {{num_cpus: N}} with N > 0, got {r!r}")
    cfg["resources"] = {k: dict(v) for k, v in res.items()}
    return cfg


def recipe(cfg: dict, task: str, stage: str) -> dict:
    """The stage recipe for a task: `stages.<stage>` merged with `tasks.<task>.<stage>`, plus `common.set`."""
    r = deep_update(cfg["stages"].get(stage) or {}, cfg["tasks"][task].get(stage) or {})
    r["set"] = {**(cfg["common"].get("set") or {}), **(r.get("set") or {})}
    return r


def recipe_flags(r: dict, seed: int | None) -> list[str]:
    out: list[str] = []
    if r.get("max_steps") is not None:
        out += ["--max-steps", _fmt(r["max_steps"])]
    if r.get("train_subset") is not None:
        out += ["--train-subset", _fmt(r["train_subset"])]
    if seed is not None:
        out += ["--seed", _fmt(seed)]
    if r.get("mode") is not None:
        out += ["--mode", _fmt(r["mode"])]
    for key, k in (("lr", "train.lr"), ("epochs", "train.epochs")):
        if r.get(key) is not None:
            out += ["--set", f"{k}={_fmt(r[key])}"]
    for k, v in (r.get("set") or {}).items():
        out += ["--set", f"{k}={_fmt(v)}"]
    return out


def recipe_expectations(r: dict, seed: int | None) -> dict[str, Any]:
    """Dotted config keys (as in a run's config.yaml) the recipe sets, for the mismatch check."""
    exp = {f"train.{k}" if k in ("max_steps", "lr", "epochs") else "data.train_subset": r[k]
           for k in ("max_steps", "lr", "epochs", "train_subset") if k in r}  # explicit null: expect null
    if seed is not None:
        exp["train.seed"] = seed
    if r.get("mode") is not None:
        exp["search.mode"] = r["mode"]
    exp.update({k: v for k, v in (r.get("set") or {}).items()})
    return {k: v for k, v in exp.items() if k not in LOGGING_KEYS}


def budget_flags(b: dict) -> list[str]:
    """The `nasq baseline` / `nasq search` flags of budget ``b`` (a latency budget: its table as a config key)."""
    out = []
    for k in BUDGET_KINDS:
        if k in b:
            out += [f"--{k.replace('_', '-')}", _fmt(b[k])]
    if "latency_ms" in b:
        out += ["--set", f"search.latency_table={b['latency_table']}"]
    if b.get("convention"):
        out += ["--convention", b["convention"]]
    return out


# ------------------------------------------------------------------------------------------------ cells


@dataclass
class Stage:
    name: str  # teacher | plan | search | finalize | qat | export | eval
    argv: list[str]  # canonical command (no --resume / --overwrite)
    out: Path
    kind: str  # run | plan | export | eval
    stdout_to: Path | None = None  # eval: stdout -> this JSON file


@dataclass
class Cell:
    task: str
    budget: str | None  # None for fp32
    method: str
    dir: Path
    seed: int = 0
    stages: list[Stage] = field(default_factory=list)
    skip: str | None = None  # configured skip reason
    note: str = ""
    spaces: dict[Path, str] = field(default_factory=dict)  # derived space files this cell needs

    seeded: bool = False  # the config lists `seeds`: the cell lives in a seed{N} directory

    @property
    def label(self) -> str:
        if not self.budget:
            return f"{self.task}/fp32"
        return f"{self.task}/{self.budget}/{self.method}" + (f"/seed{self.seed}" if self.seeded else "")

    @property
    def budget_label(self) -> str:
        return self.budget or "fp32"


def derived_space(base: str, choices: list[int], runs: Path) -> tuple[Path, str]:
    """(path, YAML text) of `base` (a space name or YAML path) with every rule's choices replaced."""
    from nasq.contract.space import search_spaces_dir

    p = Path(base)
    src = p if p.suffix in (".yaml", ".yml") else search_spaces_dir() / f"{base}.yaml"
    if not src.is_file():
        raise GridError(f"space {base!r} not found (looked for {src})")
    data = yaml.safe_load(src.read_text())
    suffix = "choices" + "_".join(str(c) for c in choices)
    data["name"] = f"{data.get('name', p.stem)}_{suffix}"
    data["description"] = f"{src.name} with every rule's choices set to {list(choices)} (experiments/grid.py)"
    for rule in data.get("rules", []):
        rule["choices"] = list(choices)
    text = f"# Derived by experiments/grid.py from {src.name}; do not edit.\n" + yaml.safe_dump(data, sort_keys=False)
    return runs / "_spaces" / f"{data['name']}.yaml", text


def teacher_cell(cfg: dict, task: str, runs: Path, data_dir: str) -> Cell:
    tdir = runs / task / "fp32"
    argv = ["nasq", "finetune", "--model", str(cfg["model"]), "--task", task, "--data-dir", data_dir,
            *recipe_flags(recipe(cfg, task, "finetune"), cfg["seed"]), "--out", str(tdir)]
    c = Cell(task, None, "fp32", tdir, seed=cfg["seed"])
    c.stages = [Stage("teacher", argv, tdir, "run")]
    return c


def seeds_of(cfg: dict) -> list[int]:
    """The seeds every quantized cell runs with: `seeds` (one seed{N} directory each) or the single `seed`."""
    return list(cfg.get("seeds") or [cfg["seed"]])


def qat_recipe(cfg: dict, task: str, method: str) -> dict:
    """The QAT recipe of a method: `protocol.equal_compute` gives the baselines (and the searches that train no
    weights, `TEACHER_QAT`) the search's steps on top."""
    r = recipe(cfg, task, "qat")
    if cfg["protocol"]["equal_compute"] and (method not in SEARCHED or method in TEACHER_QAT):
        extra = recipe(cfg, task, "search").get("max_steps")
        if extra is None or r.get("max_steps") is None:
            raise GridError(f"protocol.equal_compute needs max_steps in the search and qat recipes of {task}")
        r["max_steps"] = int(r["max_steps"]) + int(extra)
    return r


def quant_cell(cfg: dict, task: str, budget: str, method: str, runs: Path, data_dir: str,
               seed: int | None = None) -> Cell:
    b = cfg["budgets"][budget]
    seeded = "seeds" in cfg and cfg["seeds"] is not None
    seed = cfg["seed"] if seed is None else seed
    d = runs / task / budget / method / (f"seed{seed}" if seeded else "")  # pathlib drops the empty part
    teacher = str(runs / task / "fp32")
    common = ["--task", task, "--data-dir", data_dir]
    proto = cfg["protocol"]
    space = str(b.get("space", "aqbert_128g"))
    c = Cell(task, budget, method, d, seed=seed, seeded=seeded)
    plan = d / "plan.json"
    sdir = d / "search"  # the search run of a searched method (nasq_front: another budget's)
    bflags = budget_flags(b)
    if "latency_ms" in b and method in BYTE_ONLY:  # they allocate by bytes and refuse a latency budget
        bflags = []  # a reference plan, unchecked by `nasq baseline`: its row's within_budget is its latency's
    if method in SHARABLE and (ref_name := (b.get(method) or {}).get("same_as")):
        # the same plan and recipe as another budget's cell of this method: run (and read) it once
        ref = quant_cell(cfg, task, str(ref_name), method, runs, data_dir, seed)
        c.dir, c.stages, c.spaces = ref.dir, ref.stages, ref.spaces
        c.note = f"the {ref_name} cell (the same {b[method]['bits']}-bit plan and QAT recipe, run once)"
        return c
    if method == "uniform":
        u = b.get("uniform") or {}
        if "skip" in u:
            c.skip = str(u["skip"])
            return c
        if u.get("space"):
            space = str(u["space"])
        if u.get("space_choices"):
            sp, text = derived_space(space, list(u["space_choices"]), runs)
            c.spaces[sp] = text
            space = str(sp)
        if u.get("budget") is False:
            bflags = []
        c.note = str(u.get("note", ""))
        setf = recipe_flags({"set": cfg["common"].get("set")}, None)
        c.stages.append(Stage("plan", ["nasq", "baseline", "uniform", "--teacher", teacher, *common, "--space", space,
                                       "--bits", _fmt(u["bits"]), *bflags, *setf, "--out", str(plan)], plan, "plan"))
    elif method in ("rule", "magnitude"):  # a budget's own settings for these baselines; none: the cell is skipped
        r = b.get(method)
        if r is None:
            c.skip = f"no `{method}` for this budget in the config"
            return c
        c.note = str(r.get("note", ""))
        rb = ["--rule-bits", ",".join(f"{k}={_fmt(v)}" for k, v in r["rule_bits"].items())] if method == "rule" else []
        setf = recipe_flags({"set": cfg["common"].get("set")}, None)
        c.stages.append(Stage("plan", ["nasq", "baseline", method, "--teacher", teacher, *common, "--space", space,
                                       "--bits", _fmt(r["bits"]), *rb, *bflags, *setf, "--out", str(plan)], plan,
                              "plan"))
    elif method in (*HESSIAN_VARIANTS, "measured", "random", "nasq_measured", "measured_hs", "measured_fs"):
        flags, stage = HESSIAN_VARIANTS.get(method, ([], "hessian"))
        probes = method in ("hessian", "hessian_t", "measured_hs")
        extra = hessian_flags(cfg, task, seed, probes=probes, stage=stage) \
            if method != "random" else recipe_flags({"set": cfg["common"].get("set")}, seed)
        extra += flags
        base = {"nasq_measured": "measured", "measured_hs": "measured", "measured_fs": "measured"}.get(
            method, "hessian" if method in HESSIAN_VARIANTS else method)
        if method == "nasq_measured":
            extra += ["--refine-rounds", str(REFINE_ROUNDS)]
        if method in ("measured_hs", "measured_fs"):
            extra += ["--spread", "hessian" if method == "measured_hs" else "fisher"]
        c.stages.append(Stage("plan", ["nasq", "baseline", base, "--teacher", teacher, *common, "--space", space,
                                       *bflags, *extra, "--out", str(plan)], plan, "plan"))
    elif method == "nasq_front":
        src = b.get("front_from")
        if src is None:
            c.skip = "no `front_from` budget for this budget in the config"
            return c
        ref = quant_cell(cfg, task, str(src), "nasq", runs, data_dir, seed)
        sdir = ref.dir / "search"
        c.stages.append(next(st for st in ref.stages if st.name == "search"))  # run there if missing (shared)
        c.stages.append(Stage("finalize", ["nasq", "finalize", str(sdir), *bflags, "--out", str(plan),
                                           *(["--spend-leftover"] if proto["spend_leftover"] else [])], plan, "plan"))
        c.note = f"the {src} nasq search of this seed, finalized at this budget (one search, a whole front)"
    elif method in SEARCHED:
        init = VARIANT_SETS.get(method, [])  # nasq's recipe plus the variant's search settings
        if method in INIT_PLAN:  # the same seed's baseline plan (that baseline cell's command) as initial gates
            ip, base = d / "init_plan.json", INIT_PLAN[method]
            c.stages.append(Stage("init_plan", ["nasq", "baseline", base, "--teacher", teacher, *common,
                                                "--space", space, *bflags,
                                                *hessian_flags(cfg, task, seed, probes=base == "hessian"),
                                                "--out", str(ip)], ip, "plan"))
            init = ([*init, "--set", f"search.damage_prior={ip}"] if method in PLAN_AS_PRIOR else
                    [*init, "--set", "search.gate_init=plan", "--set", f"search.init_plan={ip}"])
        if method in SEARCH_SPACE:  # the variant's own space for the budget's (a budget it has none for: skipped)
            if space not in SEARCH_SPACE[method]:
                c.skip = f"{method} has no space for {space}"
                return c
            space = SEARCH_SPACE[method][space]
        c.stages.append(Stage("search", ["nasq", "search", "--teacher", teacher, *common, "--space", space, *bflags,
                                         *recipe_flags(recipe(cfg, task, "search"), seed), *init,
                                         "--out", str(sdir)], sdir, "run"))
        c.stages.append(Stage("finalize", ["nasq", "finalize", str(sdir), "--out", str(plan),
                                           *(["--spend-leftover"] if proto["spend_leftover"] else [])], plan, "plan"))
    else:  # pragma: no cover - validated
        raise GridError(f"unknown method {method}")
    qat, art = d / "qat", d / "model.nasq"
    init = (["--init-from", str(sdir)] if method in SEARCHED and method not in TEACHER_QAT and proto["init_from_search"]
            else [])
    c.stages += [
        Stage("qat", ["nasq", "finetune", "--plan", str(plan), "--teacher", teacher, *init, *common,
                      *recipe_flags(qat_recipe(cfg, task, method), seed), "--out", str(qat)], qat, "run"),
        Stage("export", ["nasq", "export", str(qat), "--out", str(art)], art, "export"),
        Stage("eval", ["nasq", "eval", str(qat), "--artifact", str(art), *common], d / "eval.json", "eval",
              stdout_to=d / "eval.json"),
    ]
    return c


def hessian_flags(cfg: dict, task: str, seed: int | None, probes: bool = True, stage: str = "hessian") -> list[str]:
    """`nasq baseline hessian` flags of the config's hessian recipe (the hessian cells and nasq_hinit's init);
    without ``probes``, those of `nasq baseline measured` (the same train rows, no Hutchinson probes);
    ``stage``: the hessian recipe updated by that stage's (`hessian_t`, `fisher`: those cells)."""
    h = recipe(cfg, task, "hessian")
    if stage != "hessian":
        h = deep_update(h, recipe(cfg, task, stage))
    extra = recipe_flags({k: v for k, v in h.items() if k in ("train_subset", "set")}, seed)
    for k in ("n_batches", "n_probes") if probes else ("n_batches",):
        if h.get(k) is not None:
            extra += [f"--{k.replace('_', '-')}", _fmt(h[k])]
    return extra


def all_cells(cfg: dict, runs: Path, data_dir: str) -> list[Cell]:
    cells = []
    for task in cfg["tasks"]:
        if "fp32" in cfg["methods"]:
            cells.append(teacher_cell(cfg, task, runs, data_dir))
        for budget in cfg["budgets"]:
            for seed in seeds_of(cfg):
                for method in cfg["methods"]:
                    if method != "fp32":
                        cells.append(quant_cell(cfg, task, budget, method, runs, data_dir, seed))
    return cells


def parse_only(spec: str | None, cfg: dict) -> dict[str, set[str]]:
    if not spec:
        return {}
    valid = {"task": list(cfg["tasks"]), "budget": list(cfg["budgets"]), "method": cfg["methods"],
             "seed": [str(x) for x in seeds_of(cfg)]}
    out: dict[str, set[str]] = {}
    for part in spec.split(","):
        if "=" not in part:
            raise GridError(f"--only {spec!r}: expected KEY=VALUE[|VALUE...] pairs separated by commas, e.g. "
                            "task=sst2,budget=avg2,method=nasq")
        k, v = (s.strip() for s in part.split("=", 1))
        if k not in valid:
            raise GridError(f"--only: unknown key {k!r}; keys are task, budget, method, seed")
        vals = {x.strip() for x in v.split("|") if x.strip()}
        if bad := sorted(vals - set(valid[k])):
            raise GridError(f"--only {k}: unknown {bad}; the config has {valid[k]}")
        out.setdefault(k, set()).update(vals)
    return out


def selected(cell: Cell, only: dict[str, set[str]]) -> bool:
    """A filter key does not apply to a cell without it (the fp32 teacher has no budget)."""
    vals = {"task": cell.task, "budget": cell.budget, "method": cell.method,
            "seed": None if cell.method == "fp32" else str(cell.seed)}
    return all(vals[k] is None or vals[k] in v for k, v in only.items())


# ------------------------------------------------------------------------------------------------ state


def read_json(p: Path) -> dict | None:
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def stage_done(s: Stage) -> bool:
    if s.kind in ("run", "plan", "export"):
        return output_complete(s.kind, s.out)  # the pipeline's own checks
    return read_json(s.out) is not None  # eval


def exec_argv(s: Stage) -> list[str]:
    """The command actually run: the canonical one + --resume / --overwrite for a partial output."""
    if s.kind == "run" and (s.out / "config.yaml").is_file():
        return [*s.argv, "--resume"]
    if s.kind in ("run", "export") and s.out.exists():
        return [*s.argv, "--overwrite"]
    return list(s.argv)


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def nasq_prefix() -> list[str]:
    """How to start `nasq`: the console script beside this Python, else on PATH, else `python -m nasq.cli`."""
    here = Path(sys.executable).parent / "nasq"
    if here.is_file():
        return [str(here)]
    found = shutil.which("nasq")
    return [found] if found else [sys.executable, "-m", "nasq.cli"]


# ------------------------------------------------------------------------------------------------ running


class Runner:
    def __init__(self, runs: Path, dry_run: bool, rev: str | None = None):
        self.runs, self.dry_run = runs, dry_run
        self.rev = rev or git_rev(REPO, describe=True) or "unknown"
        self.failures: list[str] = []
        self.ran = 0
        self._log = None
        if not dry_run:
            runs.mkdir(parents=True, exist_ok=True)
            self._log = (runs / "grid.log").open("a")

    def log(self, msg: str) -> None:
        line = f"[grid {time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        if self._log:
            self._log.write(line + "\n")
            self._log.flush()

    def cell_ready(self, cell: Cell, teacher_ok: bool) -> bool:
        """Whether the cell has stages to run (logs why not); writes the derived spaces it needs."""
        if cell.skip:
            self.log(f"skip {cell.label}: configured skip ({cell.skip})")
            return False
        last = cell.stages[-1]
        if last.kind == "eval" and stage_done(last):
            self.log(f"skip {cell.label}: {last.out} exists")
            return False
        if cell.method != "fp32" and not teacher_ok:
            self.log(f"skip {cell.label}: its teacher {self.runs / cell.task / 'fp32'} is not done")
            return False
        for path, text in cell.spaces.items():
            if not self.dry_run and (not path.is_file() or path.read_text() != text):
                write_atomic(path, text)
        return True

    def run_cell(self, cell: Cell, teacher_ok: bool) -> None:
        if not self.cell_ready(cell, teacher_ok):
            return
        timing_path = cell.dir / "timing.json"
        for s in cell.stages:
            if stage_done(s):
                self.log(f"skip {cell.label} {s.name}: {s.out} is complete")
                continue
            if not self.run_stage(cell, s, timing_path):
                return

    def run_stage(self, cell: Cell, s: Stage, timing_path: Path) -> bool:
        argv = exec_argv(s)
        shown = shlex.join(argv) + (f" > {shlex.quote(str(s.stdout_to))}" if s.stdout_to else "")
        if self.dry_run:
            print(f"$ {shown}")
            return True
        self.log(f"run {cell.label} {s.name}: $ {shown}")
        logdir = (cell.dir.parent / "logs") if cell.method == "fp32" else cell.dir / "logs"
        logdir.mkdir(parents=True, exist_ok=True)
        logfile = logdir / f"{'fp32' if cell.method == 'fp32' else s.name}.log"
        env = {**os.environ, "NASQ_NO_PROGRESS": os.environ.get("NASQ_NO_PROGRESS", "1")}
        cmd = nasq_prefix() + argv[1:]
        t0 = time.time()
        interrupted = False
        with logfile.open("a") as lf:
            lf.write(f"\n# {now()} $ {shown}\n")
            lf.flush()
            p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=lf if s.stdout_to else subprocess.STDOUT,
                                 text=True, env=env)
            assert p.stdout is not None
            out = ""
            try:
                if s.stdout_to:
                    out = p.stdout.read()
                else:
                    for line in p.stdout:
                        lf.write(line)
                        print(f"    {line}", end="", flush=True)
                rc = p.wait()
            except KeyboardInterrupt:  # the child got the SIGINT too: let it save and stop, record the attempt
                interrupted = True
                try:
                    p.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    p.kill()
                rc = 130
        wall = time.time() - t0
        if rc == 0 and s.stdout_to:
            res = _parse_json_output(out)
            if res is None:
                rc = -1
                with logfile.open("a") as lf:
                    lf.write(f"grid: no JSON object in the stdout of `{shown}`:\n{out}\n")
            else:
                write_atomic(s.stdout_to, json.dumps(res, indent=2) + "\n")
        self.ran += 1
        timing = read_json(timing_path) or {}
        entry = timing.get(s.name) or {"wall_s": 0.0, "attempts": []}
        entry["attempts"].append({"cmd": shown, "wall_s": round(wall, 2), "rc": rc, "git_rev": self.rev,
                                  "finished": now()})
        entry["wall_s"] = round(sum(a["wall_s"] for a in entry["attempts"]), 2)
        entry.update(cmd=shlex.join(s.argv), rc=rc, git_rev=self.rev, finished=now())
        timing[s.name] = entry
        write_atomic(timing_path, json.dumps(timing, indent=2) + "\n")
        if interrupted:
            self.log(f"interrupted {cell.label} {s.name} after {wall:.1f}s; rerun the same grid command to go on "
                     "(unfinished runs continue with --resume)")
            raise KeyboardInterrupt
        if rc != 0:
            self.failures.append(f"{cell.label} {s.name} (rc {rc}, log {logfile})")
            self.log(f"FAILED {cell.label} {s.name}: rc {rc} after {wall:.1f}s; see {logfile}")
            return False
        self.log(f"done {cell.label} {s.name} in {wall:.1f}s")
        return True


def _parse_json_output(text: str) -> dict | None:
    dec = json.JSONDecoder()
    pos = 0
    lines = text.splitlines(keepends=True)
    for line in lines:
        if line.startswith("{"):
            try:
                obj, _ = dec.raw_decode(text[pos:])
                if isinstance(obj, dict):
                    return obj
            except ValueError:
                pass
        pos += len(line)
    return None


# ------------------------------------------------------------------------------------------------ collect


def main_metric(task: str) -> str:
    from nasq.data.glue import get_task

    return get_task(task).main_metric


_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def safetensors_sizes(path: Path) -> tuple[int, int] | None:
    """(bytes of all tensors, bytes of the encoder linears' weights + biases) of a safetensors file, from its
    header (nothing is loaded)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            sizes = {k: math.prod(f.get_slice(k).get_shape()) * _ITEMSIZE[f.get_slice(k).get_dtype()]
                     for k in f.keys()}  # noqa: SIM118 - safe_open has keys(), no iteration
    except (OSError, ValueError, TypeError, Exception):  # noqa: BLE001 - a missing or unreadable file: no sizes
        return None
    total = sum(sizes.values())
    enc = sum(n for k, n in sizes.items() if ".encoder." in f".{k}" and "LayerNorm" not in k)
    return total, enc


def config_mismatches(run: Path, expected: dict[str, Any]) -> list[str]:
    p = run / "config.yaml"
    if not p.is_file():
        return []
    try:
        conf = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError:
        return [f"{p}: unreadable"]
    out = []
    for key, want in expected.items():
        node: Any = conf
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        same = node == want
        if not same and isinstance(node, list | tuple) and isinstance(want, list | tuple):
            same = list(node) == list(want)
        if not same and isinstance(node, int | float) and isinstance(want, int | float):
            same = math.isclose(float(node), float(want), rel_tol=1e-9)
        if not same:
            out.append(f"{key}={node!r} (grid {want!r})")
    return out


def _num(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


def _wall(timing: dict, names: list[str], run_dirs: list[Path | None]) -> float | None:
    """Sum of the stages' recorded walls; a stage without timing (e.g. an adopted run) falls back to its
    run.json wall_s; `finalize` (seconds) may be missing."""
    total, have = 0.0, False
    for name, rd in zip(names, run_dirs, strict=True):
        if name in timing and timing[name].get("rc") == 0:
            total += float(timing[name]["wall_s"])
            have = True
        elif rd is not None and (w := (read_json(rd / "run.json") or {}).get("wall_s")) is not None:
            total += float(w)
            have = True
        elif name != "finalize":
            return None
    return round(total, 1) if have else None


def dev_curve(metrics: Path, metric_name: str) -> str:
    """``"step:metric ..."`` of a run's dev evaluations (``train.eval_every`` and the final one), or ''."""
    points = {}
    try:
        lines = metrics.read_text().splitlines()
    except OSError:
        return ""
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if (isinstance(rec, dict) and rec.get("split") == "dev" and isinstance(rec.get("step"), int)
                and _num(rec.get(metric_name)) is not None):
            points[int(rec["step"])] = float(rec[metric_name])  # a resumed run may repeat a step: keep the last
    return " ".join(f"{k}:{v:.4f}" for k, v in sorted(points.items()))


def _latency_table(path: str):
    """The latency table at ``path``, read and validated once per version of the file (every row of a budget
    shares it; a file changed or removed since is read again)."""
    try:
        st = os.stat(path)
    except OSError:
        return load_latency_table(path)  # its clear error
    return _latency_table_version(path, st.st_ino, st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=8)
def _latency_table_version(path: str, inode: int, mtime_ns: int, size: int):
    return load_latency_table(path)


def plan_latency(plan: Plan, table: str) -> float:
    """``plan``'s latency in ms on the latency table at ``table`` (the same sum the allocators keep within a
    latency budget, :func:`nasq.contract.cost.plan_latency_ms`)."""
    try:
        return plan_latency_ms(plan.searched_tensors(), plan.bits_per_group(), _latency_table(table))
    except NasqError as e:
        raise GridError(f"the latency of {plan.source}: {e}") from None


def _plan_or_none(path: Path) -> Plan | None:
    """The cell's validated plan (``Plan.load``), or None while it is missing or unreadable."""
    try:
        return Plan.load(path)
    except NasqError:
        return None


def cell_row(cfg: dict, cell: Cell, date_fallback: str) -> dict:
    metric_name = main_metric(cell.task)
    row: dict[str, Any] = {"task": cell.task, "method": cell.method, "budget": cell.budget_label,
                           "seed": cell.seed if cell.method != "fp32" else cfg["seed"],
                           "metric_name": metric_name, "status": "not run", "_seeded": cell.seeded}
    notes = [cell.note] if cell.note else []
    timing = read_json(cell.dir / "timing.json") or {}
    if cell.skip:
        row.update(status=f"skipped: {cell.skip}")
        row["note"] = "; ".join(notes)
        return row
    qat_stage = next(s for s in cell.stages if s.name in ("qat", "teacher"))
    row["command"] = shlex.join(qat_stage.argv)
    exp = recipe_expectations(qat_recipe(cfg, cell.task, cell.method) if cell.method != "fp32"
                              else recipe(cfg, cell.task, "finetune"), cell.seed if cell.method != "fp32"
                              else cfg["seed"])
    if mism := config_mismatches(qat_stage.out, exp):
        notes.append(f"{qat_stage.out.name} config differs from the grid recipe: " + ", ".join(mism))
    if cell.method in SEARCHED:
        search = next(st for st in cell.stages if st.name == "search")
        sexp = recipe_expectations(recipe(cfg, cell.task, "search"), cell.seed)
        if mism := config_mismatches(search.out, sexp):
            notes.append("search config differs from the grid recipe: " + ", ".join(mism))
    failed = [n for n, t in timing.items() if isinstance(t, dict) and t.get("rc") not in (0, None)]
    done = [s.name for s in cell.stages if stage_done(s)]

    if cell.method == "fp32":
        info = read_json(cell.dir / "run.json") or {}
        if info.get("status") == "done":
            row["status"] = "done"
            row["metric"] = (info.get("dev") or {}).get(metric_name)
            sizes = safetensors_sizes(cell.dir / "model" / "state.safetensors")
            if sizes:
                row["artifact_mb"], row["encoder_mb"] = sizes[0] / 1e6, sizes[1] / 1e6
            row["avg_bits"] = 32
            row["finetune_s"] = _wall(timing, ["teacher"], [cell.dir])
            t = timing.get("teacher") or {}
            row["git_rev"] = t.get("git_rev", "")
            row["date"] = (t.get("finished") or info.get("created") or date_fallback)[:10]
    else:
        plan = _plan_or_none(cell.dir / "plan.json")
        ev = read_json(cell.dir / "eval.json")
        if plan:
            tot = plan.totals
            for col, key in (("encoder_mb", "encoder_linear_bytes"), ("artifact_mb", "artifact_tensor_bytes")):
                if tot.get(key) is not None:
                    row[col] = tot[key] / 1e6
            row["avg_bits"] = tot.get("avg_bits")
            row["within_budget"] = tot.get("within_budget")
            if "latency_ms" in (b := cfg["budgets"].get(cell.budget) or {}):
                row["latency_ms"] = plan_latency(plan, b["latency_table"])
                row["within_budget"] = row["latency_ms"] <= b["latency_ms"]
            row["_searched_bytes"] = tot.get("searched_bytes")
            row["_budget"] = plan.budget
            row["_plan_path"] = cell.dir / "plan.json"
        names = ["plan"]
        rds = [None]
        if cell.method in SEARCHED:
            names = ["init_plan", "search", "finalize"] if cell.method in INIT_PLAN else ["search", "finalize"]
            rds = [None] * (len(names) - 2) + [next(st.out for st in cell.stages if st.name == "search"), None]
        row["search_s"] = _wall(timing, names, rds)
        row["finetune_s"] = _wall(timing, ["qat"], [cell.dir / "qat"])
        qat_info = read_json(cell.dir / "qat" / "run.json") or {}
        row["qat_steps"] = qat_info.get("total_steps")
        row["dev_curve"] = dev_curve(cell.dir / "qat" / "metrics.jsonl", metric_name)
        row["raw_dev_curve"] = dev_curve(cell.dir / "qat" / "metrics.jsonl", "raw_" + metric_name)
        if ev:
            row["status"] = "done"
            row["metric"] = (ev.get("int_artifact") or {}).get(metric_name)
            row["fake_quant_metric"] = (ev.get("fake_quant") or {}).get(metric_name)
            raw = qat_info.get("dev_raw_weights")
            row["raw_weights_metric"] = raw.get(metric_name) if isinstance(raw, dict) else None
            row["prediction_agreement"] = ev.get("prediction_agreement")
            t = timing.get("eval") or timing.get("qat") or {}
            row["git_rev"] = t.get("git_rev") or (plan.provenance.get("git_rev") if plan else "") or ""
            fin = t.get("finished") or dt.datetime.fromtimestamp((cell.dir / "eval.json").stat().st_mtime,
                                                                   dt.UTC).isoformat()
            row["date"] = fin[:10]
    if row["status"] != "done":
        if failed:
            row["status"] = "failed: " + ", ".join(failed)
        elif done:
            row["status"] = "incomplete (done: " + ", ".join(done) + ")"
    row["note"] = "; ".join(notes)
    return row


def finish_rows(cfg: dict, rows: list[dict]) -> None:
    """Fill within_budget for plans made without a budget (vs a sibling's budget) and rank per (task, budget)."""
    groups: dict[tuple[str, str, Any], list[dict]] = {}
    for r in rows:
        if r["method"] != "fp32":
            groups.setdefault((r["task"], r["budget"], r["seed"]), []).append(r)
    for g in groups.values():
        ref = next((r["_budget"] for r in g if r.get("_budget")), None)
        for r in g:
            if r.get("within_budget") is None and ref and r.get("_searched_bytes") is not None and \
                    r.get("_budget") is None:
                r["within_budget"] = r["_searched_bytes"] <= ref["bytes"]
            if r.get("within_budget") is False and "over budget" not in (r.get("note") or "").split("; "):
                # a row kept from the old results.csv already says so: collecting again must not stack it
                r["note"] = "; ".join(x for x in ("over budget", r.get("note")) if x)
        measured = [r for r in g if r["status"] == "done" and _num(r.get("metric")) is not None
                    and r.get("within_budget") is not False]
        for r in measured:
            r["rank"] = 1 + sum(_num(o["metric"]) > _num(r["metric"]) for o in measured)
        nasq = next((r for r in measured if r["method"] == "nasq"), None)
        if nasq:
            at_least = [r for r in measured if r is not nasq and _num(r["metric"]) >= _num(nasq["metric"])]
            for r in at_least:
                r["_beats_nasq"] = True
            if at_least:
                nasq["_not_best"] = ", ".join(r["method"] for r in at_least)


def predict_rows(rows: list[dict]) -> int:
    """``predicted_kl`` / ``predicted_removed`` of every row whose plan is on this machine: its output KL before QAT
    (x1000 nats) as the additive model predicts it from the damages of the ``measured`` cell of the same (task,
    budget, seed), and the share of uniform's predicted damage (within the same budget) it removes
    (:func:`nasq.contract.damage.plan_prediction`). It comes from the plans alone, as it could have been written
    before QAT; beside the metric it shows, cell by cell, how far the measured damages rank the plans that QAT
    then ranks.
    A row with no measured sibling, or a plan the measurement does not cover (another row grouping, a width it
    did not measure), keeps what it had. Returns how many rows were predicted."""
    groups: dict[tuple[str, str, Any], list[dict]] = {}
    for r in rows:
        if r.get("_plan_path") is not None:
            groups.setdefault((r["task"], r["budget"], r["seed"]), []).append(r)
    done = 0
    for g in groups.values():
        src = next((r["_plan_path"] for r in g if r["method"] == "measured"), None)
        if src is None:
            continue
        for r in g:
            try:
                pred = plan_prediction(Plan.load(r["_plan_path"]), src)
            except NasqError:
                continue
            r["predicted_kl"], r["predicted_removed"] = pred["plan_kl_x1000"], pred["removed_share"]
            done += 1
    return done


def _cell_text(v: Any, digits: int) -> str:
    if v is None or v == "":
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


CSV_DIGITS = {"metric": 6, "fake_quant_metric": 6, "raw_weights_metric": 6, "prediction_agreement": 6,
              "encoder_mb": 6, "artifact_mb": 6,
              "avg_bits": 4, "latency_ms": 4, "predicted_kl": 3, "predicted_removed": 4, "search_s": 1,
              "finetune_s": 1}
MD_DIGITS = {"latency_ms": 2, "metric": 4, "fake_quant_metric": 4, "raw_weights_metric": 4, "prediction_agreement": 4,
             "encoder_mb": 3, "artifact_mb": 3,
             "avg_bits": 3, "predicted_kl": 1, "predicted_removed": 2, "search_s": 0, "finetune_s": 0}


def summary_table(rows: list[dict]) -> list[str]:
    """One line per (task, budget): each method's metric (best within-budget one bold; "over" for plans over the
    budget; the status where the cell has no result), the teacher's metric, nasq's rank."""
    methods = [m for m in METHODS if m != "fp32" and any(r["method"] == m for r in rows)]
    teacher = {r["task"]: r for r in rows if r["method"] == "fp32"}
    groups: dict[tuple[str, str], dict[str, dict]] = {}
    for r in rows:
        if r["method"] != "fp32":
            groups.setdefault((r["task"], r["budget"]), {})[r["method"]] = r

    def text(r: dict | None) -> str:
        if r is None:
            return ""
        if r["status"] != "done" or _num(r.get("metric")) is None:
            return r["status"].split(" (")[0].split(":")[0]
        v = _cell_text(r["metric"], 4)
        if r.get("within_budget") is False:
            return f"{v} (over)"
        return f"**{v}**" if r.get("rank") == 1 else v

    cols = ["task", "metric", "budget", "fp32 teacher", *methods, "nasq rank"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for (task, budget), g in groups.items():
        nasq_rank = g.get("nasq", {}).get("rank")
        n_ranked = sum(1 for r in g.values() if r.get("rank") is not None)
        cells = [task, next(iter(g.values()))["metric_name"], budget, text(teacher.get(task)),
                 *(text(g.get(m)) for m in methods),
                 f"{nasq_rank} of {n_ranked}" if nasq_rank is not None else ""]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return lines


def mean_std(xs: list[float]) -> tuple[float, float | None, int]:
    """(mean, sample standard deviation or None for n < 2, n)."""
    n = len(xs)
    m = sum(xs) / n
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else None
    return m, sd, n


PERCENT_METRICS = {"accuracy", "f1"}  # shown as percent with 2 decimals, as the README quotes them


def beyond_spread(diff: float, sd_a: float | None, sd_b: float | None) -> bool | None:
    """The protocol's rule for a claim: a difference of two means counts only when it exceeds the larger of the two
    sample stds; None (no claim either way) when either side has fewer than 2 seeds."""
    return None if sd_a is None or sd_b is None else abs(diff) > max(sd_a, sd_b)


def metric_text(metric_name: str, v: float, *, signed: bool = False) -> str:
    """``v`` (a metric, a std or a difference of ``metric_name``) in the units the README quotes, so figures are
    copied, never rounded again by hand: accuracy and F1 as percent with 2 decimals (0.87538 -> ``87.54``),
    other metrics (Matthews, correlations) with 3 decimals (0.23150 -> ``0.231``)."""
    sign = "+" if signed else ""
    return f"{100 * v:{sign}.2f}" if metric_name in PERCENT_METRICS else f"{v:{sign}.3f}"


def _stat_text(m: str, stats: dict, rows_by_method: dict, over: set, best: str | None, metric_name: str) -> str:
    if m not in stats:
        rs = rows_by_method.get(m) or []
        return rs[0]["status"].split(" (")[0].split(":")[0] if rs else ""
    mu, sd, n = stats[m]
    v = metric_text(metric_name, mu) + (f" ± {metric_text(metric_name, sd)}" if sd is not None else "") + f" (n={n})"
    return f"{v} (over)" if m in over else (f"**{v}**" if m == best else v)


def seed_summary(rows: list[dict]) -> list[str]:
    """Per (task, budget): every method's mean ± std (n seeds) of the main metric, best within-budget mean bold,
    and nasq's margin over the best within-budget baseline, called a result only when it exceeds the larger of
    the two standard deviations (and both have n >= 2)."""
    methods = [m for m in METHODS if m != "fp32" and any(r["method"] == m for r in rows)]
    teacher = {r["task"]: r for r in rows if r["method"] == "fp32"}
    groups: dict[tuple[str, str], dict[str, list[dict]]] = {}
    for r in rows:
        if r["method"] != "fp32":
            groups.setdefault((r["task"], r["budget"]), {}).setdefault(r["method"], []).append(r)
    cols = ["task", "metric", "budget", "fp32 teacher", *methods, "nasq - best baseline"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for (task, budget), g in groups.items():
        metric_name = next(iter(g.values()))[0]["metric_name"]
        stats: dict[str, tuple[float, float | None, int]] = {}
        over: set[str] = set()
        for m, rs in g.items():
            vals = [_num(r["metric"]) for r in rs if r["status"] == "done" and _num(r.get("metric")) is not None]
            if vals:
                stats[m] = mean_std(vals)
            if any(r.get("within_budget") is False for r in rs):
                over.add(m)
        ranked = {m: st for m, st in stats.items() if m not in over}
        best = max(ranked, key=lambda m: ranked[m][0]) if ranked else None

        margins = []
        bases = {m: st for m, st in ranked.items() if m not in OURS}
        for sm in (m for m in OURS if m in ranked and bases):
            bm = max(bases, key=lambda m: bases[m][0])
            (mu, sd, _), (bmu, bsd, _) = ranked[sm], bases[bm]
            d = mu - bmu
            verdict = {None: "n < 2: no claim", True: "beyond the spread",
                       False: "within the spread: no claim"}[beyond_spread(d, sd, bsd)]
            dt = metric_text(metric_name, d, signed=True)
            margins.append(f"{dt} vs {bm} ({verdict})" if sm == "nasq" else f"{sm}: {dt} vs {bm} ({verdict})")
        margin = "; ".join(margins)
        t = teacher.get(task)
        tt = metric_text(metric_name, _num(t.get("metric"))) if t and _num(t.get("metric")) is not None else ""
        cells = [task, metric_name + (" (%)" if metric_name in PERCENT_METRICS else ""), budget, tt,
                 *(_stat_text(m, stats, g, over, best, metric_name) for m in methods), margin]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return lines


def curve_table(rows: list[dict]) -> list[str]:
    """Mean dev metric over seeds at each QAT evaluation step, per (task, budget, method); a run that averaged its
    weights (``train.ema_decay``) also gives its raw weights' curve, as the method "(raw weights)"."""
    curves: dict[tuple[str, str, str], dict[int, list[float]]] = {}
    for r in rows:
        for col, suffix in (("dev_curve", ""), ("raw_dev_curve", " (raw weights)")):
            for point in (r.get(col) or "").split():
                step, v = point.split(":")
                curves.setdefault((r["task"], r["budget"], r["method"] + suffix), {}).setdefault(
                    int(step), []).append(float(v))
    if not curves:
        return []
    lines = ["| task | budget | method | QAT step: mean dev metric (n) |", "|---|---|---|---|"]
    for (task, budget, method), pts in curves.items():
        txt = ", ".join(f"{k}: {sum(v) / len(v):.4f} ({len(v)})" for k, v in sorted(pts.items()))
        lines.append(f"| {task} | {budget} | {method} | {txt} |")
    return lines


def write_results(rows: list[dict], results: Path, cfg_path: Path, runs: Path) -> tuple[Path, Path]:
    results.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = results / "results.csv", results / "results.md"
    tmp = csv_path.with_name(f".{csv_path.name}.tmp{os.getpid()}")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: _cell_text(r.get(c), CSV_DIGITS.get(c, 6)) for c in CSV_COLUMNS})
    os.replace(tmp, csv_path)

    seeded = any(r.get("_seeded") for r in rows)
    cols = ["task", "budget", "method", *(["seed"] if seeded else []), "status", "metric_name", "metric",
            "fake_quant_metric", *(["raw_weights_metric"] if any(_num(r.get("raw_weights_metric")) is not None
                                                                 for r in rows) else []), "prediction_agreement", "encoder_mb", "artifact_mb", "avg_bits",
            *(["latency_ms"] if any(_num(r.get("latency_ms")) is not None for r in rows) else []), "rank",
            "predicted_kl", "predicted_removed", "vs_nasq",
            "search_s", "finetune_s", *(["qat_steps"] if seeded else []), "note", "git_rev", "date", "command"]
    summary = [
        ("Summary over seeds: the main dev metric through the integer artifact, mean ± sample std (n seeds) per "
         "(task, budget), in the README's units (accuracy and F1 in percent, 2 decimals; Matthews 3 decimals; "
         "results.csv has the full precision); best within-budget mean bold, `(over)`: a plan exceeds the budget "
         "(not ranked). The last column is nasq's mean minus the best within-budget baseline's, a result only "
         "beyond the larger std."),
        "",
        *seed_summary(rows),
        "",
        ("QAT learning curves (fake-quant dev metric at each `train.eval_every` step; the QAT length is chosen "
         "from them):"),
        "",
        *curve_table(rows),
    ] if seeded else [
        ("Summary: the main dev metric through the integer artifact per (task, budget); best within-budget "
         "method bold, `(over)`: the plan exceeds the budget (not ranked)."),
        "",
        *summary_table(rows),
    ]
    lines = [
        "# Results grid",
        "",
        (f"Generated by `python experiments/grid.py --config {cfg_path}` from `{runs}` "
         f"(`results.csv` holds the same rows). Do not edit: rerun `experiments/grid.py --collect-only`."),
        "",
        ("`metric`: main dev metric through the integer artifact (fp32: the teacher); `fake_quant_metric`: the "
         "QAT model; sizes in MB (10^6 bytes) from the plan totals (`encoder_mb`: encoder linears, `artifact_mb`: "
         "all tensors of the artifact); `rank`: among the measured within-budget quantized methods of the (task, "
         "budget), best metric bold; `raw_weights_metric` (only where a QAT averaged its weights, `train.ema_decay`): "
         "the fake-quant metric of its raw weights, from the same run; `vs_nasq`: `>= nasq` where a baseline's metric is at least nasq's, on nasq "
         "rows the methods that reach it; `predicted_kl`: the plan's output KL before QAT (x1000 nats) as the "
         "additive model predicts it from the damages measured for the same (task, budget, seed)'s `measured` "
         "cell, `predicted_removed`: the share of uniform's predicted damage (same budget) it removes, both "
         "computed before QAT (`nasq inspect PLAN --damage-from MEASURED_PLAN`; blank where no measured plan of "
         "the seed is on the machine that collected); `search_s` / `finetune_s`: wall seconds of the plan and "
         "QAT stages."),
        "",
        *summary,
        "",
        "All cells" + (" (`rank` within a seed)" if seeded else "") + ":",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "|".join("---" for _ in cols) + "|",
    ]
    for r in rows:
        cells = []
        for c in cols:
            if c == "vs_nasq":
                v = ">= nasq" if r.get("_beats_nasq") else (
                    f"not best: {r['_not_best']}" if r.get("_not_best") else "")
            elif c == "command":
                v = f"`{r['command']}`" if r.get("command") else ""
            else:
                v = _cell_text(r.get(c), MD_DIGITS.get(c, 4))
            if c == "metric" and r.get("rank") == 1 and v:
                v = f"**{v}**"
            cells.append(v.replace("|", "\\|"))
        lines.append("| " + " | ".join(cells) + " |")
    write_atomic(md_path, "\n".join(lines) + "\n")
    return csv_path, md_path


KEPT_NOTE = "kept from results.csv"
_INT_COLUMNS = ("seed", "rank", "qat_steps")


def _row_from_csv(rec: dict[str, str]) -> dict:
    """A ``results.csv`` row as :func:`cell_row` builds it (``""`` -> None, booleans and numbers parsed)."""
    row: dict[str, Any] = {}
    for k, v in rec.items():
        if k not in CSV_COLUMNS:
            continue
        if v in ("", None):
            row[k] = None
        elif k == "within_budget" and v in ("yes", "no"):  # how _cell_text writes booleans
            row[k] = v == "yes"
        elif k in _INT_COLUMNS:
            row[k] = int(float(v)) if _num(v) is not None else v
        elif k in ("dev_curve", "raw_dev_curve", "command", "note", "git_rev", "date", "status") or _num(v) is None:
            row[k] = v
        else:  # an integer stays one (the teacher's avg_bits 32), so a kept row is written as it was read
            row[k] = int(v) if v.lstrip("-").isdigit() else float(v)
    return row


def previous_rows(csv_path: Path) -> dict[tuple[str, str, str, str], dict]:
    """The finished rows of an existing ``results.csv`` by (task, budget, method, seed); {} when there is none or
    it is unreadable (collect then reports only what the run directories hold)."""
    try:
        with csv_path.open(newline="") as f:
            recs = list(csv.DictReader(f))
    except (OSError, csv.Error, UnicodeDecodeError):
        return {}
    return {(r.get("task", ""), r.get("budget", ""), r.get("method", ""), str(r.get("seed", ""))): r
            for r in recs if r.get("status") == "done"}


def keep_previous(rows: list[dict], cells: list[Cell], previous: dict) -> int:
    """Replace each unfinished row by the same cell's finished row of the previous ``results.csv``: run
    directories stay on the machine that ran them (a fresh checkout has none, or a rerun has just started), and
    collecting there must not erase finished results. The kept row's note says so and gives this machine's
    status. A cell that shares its directory with another (``same_as``) takes that cell's row when it
    has none of its own (a budget added since). Returns how many rows were kept."""
    def key(row):
        return row["task"], row["budget"], row["method"], str(row["seed"])

    by_dir = {}  # cell directory -> a finished previous row of a cell in it
    for row, cell in zip(rows, cells, strict=True):
        if key(row) in previous:
            by_dir.setdefault(cell.dir, previous[key(row)])
    kept = 0
    for i, (row, cell) in enumerate(zip(rows, cells, strict=True)):
        prev = previous.get(key(row)) or by_dir.get(cell.dir)
        if row["status"] != "done" and not str(row["status"]).startswith("skipped") and prev is not None:
            old = _row_from_csv(prev)
            old["budget"] = row["budget"]
            old["_seeded"] = row.get("_seeded")
            here = "its run directory is not on this machine" if not cell.dir.exists() \
                else f"not finished on this machine: {row['status']}"
            base = (old.get("note") or "").split(f"; {KEPT_NOTE}")[0].split(KEPT_NOTE)[0].rstrip("; ")
            old["note"] = "; ".join(x for x in (base, f"{KEPT_NOTE} ({here})") if x)
            rows[i] = old
            kept += 1
    return kept


def pareto_commands(cfg: dict, csv_path: Path, results: Path) -> list[list[str]]:
    """The `nasq plot --pareto` command lines of a grid: one plot (RESULTS/pareto.png) on `plot.size`. When that
    is encoder_mb and some budgets are whole-artifact ones (`convention: artifact`), they are drawn apart, on
    artifact_mb (RESULTS/pareto_artifact.png): on the encoder axis a plan that spends an artifact budget on the
    encoder would sit among encoder budgets it was never compared with. Latency budgets are not size budgets and
    are drawn on no size plot (a grid with one gets `--budgets` naming the others). A plot whose budgets have no
    finished row yet is not drawn. With `plot.main_methods` (a list) each plot is drawn again with only those
    methods (RESULTS/pareto_main.png, pareto_artifact_main.png): every variant in one legend is hard to read."""
    size = str(cfg["plot"].get("size", "artifact_mb"))
    artifact = [n for n, b in cfg["budgets"].items() if b.get("convention") == "artifact"]
    latency = [n for n, b in cfg["budgets"].items() if "latency_ms" in b]
    plot = ["nasq", "plot", "--pareto", str(csv_path), "--out"]
    if size != "encoder_mb" or not artifact:
        plots = [([n for n in cfg["budgets"] if n not in latency], "pareto.png", size)]
    else:
        size_budgets = [n for n in cfg["budgets"] if n not in artifact and n not in latency]
        plots = [(size_budgets, "pareto.png", "encoder_mb"), (artifact, "pareto_artifact.png", "artifact_mb")]
    if not latency and len(plots) == 1:  # every budget on one plot: no --budgets needed
        cmds = [[*plot, str(results / "pareto.png"), "--size", size]]
    else:
        finished = {budget for (_, budget, _, _), r in previous_rows(csv_path).items() if r.get("metric")}
        drawn = [([n for n in names if n in finished], file, axis) for names, file, axis in plots]
        cmds = [[*plot, str(results / file), "--size", axis, "--budgets", ",".join(names)]
                for names, file, axis in drawn if names]
    main = cfg["plot"].get("main_methods")
    if main:
        cmds += [[*c[:5], c[5].removesuffix(".png") + "_main.png", *c[6:], "--methods", ",".join(main)]
                 for c in cmds]
    return cmds


def collect(cfg: dict, cells: list[Cell], results: Path, cfg_path: Path, runs: Path) -> tuple[Path, Path]:
    date = now()
    rows = [cell_row(cfg, c, date) for c in cells]
    if kept := keep_previous(rows, cells, previous_rows(results / "results.csv")):
        print(f"[grid] kept {kept} finished row(s) of {results / 'results.csv'} that are not finished "
              "here", flush=True)
    finish_rows(cfg, rows)
    predict_rows(rows)
    return write_results(rows, results, cfg_path, runs)


def task_teachers(cfg: dict, cells: list[Cell], runs: Path, data_dir: str) -> dict[str, Cell]:
    """The fp32 teacher cell of every task (built when the config's methods leave fp32 out)."""
    return {c.task: c for c in cells if c.method == "fp32"} or \
        {t: teacher_cell(cfg, t, runs, data_dir) for t in cfg["tasks"]}


def teacher_needed(teacher: Cell, task_cells: list[Cell]) -> bool:
    """Whether the teacher runs: it was selected itself, or a selected quantized cell of its task is unfinished."""
    return teacher in task_cells or any(
        not c.skip and not stage_done(c.stages[-1]) for c in task_cells if c.method != "fp32")


# -------------------------------------------------------------------------------------------- Ray backend


def unique_cells(cells: list[Cell]) -> list[Cell]:
    """The cells to execute, one per directory (a `same_as` cell shares its directory with the cell it
    names: running both at once would race), in order."""
    seen: set[Path] = set()
    out = []
    for c in cells:
        if c.dir not in seen:
            seen.add(c.dir)
            out.append(c)
    return out


def stage_cpus(cfg: dict, stage: str, default: float) -> float:
    return float((cfg.get("resources") or {}).get(stage, {}).get("num_cpus", default))


def run_grid_ray(args, cfg: dict, cells: list[Cell], only: dict, runs: Path, data_dir: str,
                 runner: Runner) -> None:
    """:func:`run_grid` on Ray: each cell is a lightweight coordinating task (0 CPUs) that runs its stages in
    order, each stage a Ray task declaring ``resources.<stage>.num_cpus`` (default: ``--cpus-per-stage``);
    the teachers run first, then every selected cell at once, as the cluster's CPUs allow.

    Local by default (``ray.init()`` starts an embedded Ray on this machine); ``--ray-address`` joins a running
    cluster, whose nodes must see the same checkout, data directory and RUNS directory (a shared filesystem):
    every stage is the same ``nasq`` subprocess as without Ray, and all state stays in RUNS, so an interrupted
    sweep resumes by running the same command again. Interrupting the driver shuts Ray down; a stage's ``nasq``
    process that Ray's workers started may outlive them (it finishes or is resumed; check with ``pgrep nasq``
    before rerunning on the same RUNS)."""
    try:
        import ray
    except ImportError:
        raise GridError("--ray needs Ray: pip install -e '.[sweep]'") from None
    ray.init(address=args.ray_address, include_dashboard=False, log_to_driver=True,
             runtime_env={"env_vars": {"NASQ_NO_PROGRESS": "1"}}, ignore_reinit_error=True)
    default, rev = float(args.cpus_per_stage), runner.rev  # the tasks capture these, never the driver's Runner
    runner.log(f"start (ray {ray.__version__}, {ray.cluster_resources().get('CPU', 0):g} CPUs): config "
               f"{args.config}, runs {runs}, only {args.only or 'all'}, git {runner.rev}")

    @ray.remote
    def stage_task(cell: Cell, stage: Stage) -> tuple[bool, list[str]]:
        r = Runner(runs, dry_run=False, rev=rev)
        ok = r.run_stage(cell, stage, cell.dir / "timing.json")
        return ok, r.failures

    @ray.remote(num_cpus=0)
    def cell_task(cell: Cell, teacher_ok: bool) -> tuple[int, list[str]]:
        r = Runner(runs, dry_run=False, rev=rev)
        if not r.cell_ready(cell, teacher_ok):
            return 0, []
        ran, failures = 0, []
        for s in cell.stages:
            if stage_done(s):
                r.log(f"skip {cell.label} {s.name}: {s.out} is complete")
                continue
            cpus = stage_cpus(cfg, s.name, default)
            ok, f = ray.get(stage_task.options(num_cpus=cpus, name=f"{cell.label}:{s.name}").remote(cell, s))
            ran, failures = ran + 1, failures + f
            if not ok:
                break
        return ran, failures

    def run_all(batch: list[tuple[Cell, bool]]) -> None:
        for ran, failures in ray.get([cell_task.options(name=c.label).remote(c, ok) for c, ok in batch]):
            runner.ran += ran
            runner.failures += failures

    todo = unique_cells([c for c in cells if selected(c, only)])
    teachers = task_teachers(cfg, cells, runs, data_dir)
    try:
        run_all([(teachers[t], True) for t in cfg["tasks"]
                 if teacher_needed(teachers[t], [c for c in todo if c.task == t])])
        run_all([(c, stage_done(teachers[c.task].stages[0])) for c in todo if c.method != "fp32"])
    finally:
        ray.shutdown()
    runner.log(f"end: {runner.ran} command(s) run, {len(runner.failures)} failed"
               + (": " + "; ".join(runner.failures) if runner.failures else ""))


# ------------------------------------------------------------------------------------------------ main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="experiments/grid.py", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("--config", default=str(REPO / "experiments" / "grid.yaml"), help="grid YAML")
    p.add_argument("--only", help="task=..,budget=..,method=.. (alternatives with |)")
    p.add_argument("--dry-run", action="store_true", help="print the commands that would run; run nothing")
    p.add_argument("--collect-only", action="store_true", help="only rebuild results.csv / results.md / plot")
    p.add_argument("--runs", default="runs/grid", help="grid run directory (default runs/grid)")
    p.add_argument("--results", default="experiments/results", help="results directory")
    p.add_argument("--data-dir", help="GLUE directory (default: the config's data_dir)")
    p.add_argument("--no-plot", action="store_true", help="skip `nasq plot --pareto`")
    r = p.add_argument_group("Ray (pip install -e '.[sweep]')")
    r.add_argument("--ray", action="store_true",
                   help="run the cells as Ray tasks, in parallel as the CPUs allow (embedded local Ray by default)")
    r.add_argument("--ray-address", help="join this Ray cluster (e.g. ray://head:10001 or auto) instead")
    r.add_argument("--cpus-per-stage", type=float, default=2,
                   help="CPUs a stage declares unless the config's resources.<stage>.num_cpus says (default 2)")
    return p


def run_grid(args, cfg: dict, cells: list[Cell], only: dict, runs: Path, data_dir: str, runner: Runner) -> None:
    """Run the selected cells, task by task, the teacher of a task first."""
    runner.log(f"start: config {args.config}, runs {runs}, only {args.only or 'all'}, git {runner.rev}")
    todo = [c for c in cells if selected(c, only)]
    teachers = task_teachers(cfg, cells, runs, data_dir)
    for task in cfg["tasks"]:
        task_cells = [c for c in todo if c.task == task]
        if not task_cells:
            continue
        t = teachers[task]
        if teacher_needed(t, task_cells):
            if t not in task_cells:
                runner.log(f"{t.label} (teacher) is needed by the selected cells of {task}")
            runner.run_cell(t, True)
        teacher_ok = args.dry_run or stage_done(t.stages[0])
        for c in task_cells:
            if c.method != "fp32":
                runner.run_cell(c, teacher_ok)
    runner.log(f"end: {runner.ran} command(s) run, {len(runner.failures)} failed"
               + (": " + "; ".join(runner.failures) if runner.failures else ""))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg_path = Path(args.config)
        cfg = load_grid(cfg_path)
        only = parse_only(args.only, cfg)
        runs, results = Path(args.runs), Path(args.results)
        data_dir = str(args.data_dir or cfg["data_dir"])
        cells = all_cells(cfg, runs, data_dir)
    except GridError as e:
        print(f"grid: error: {e}", file=sys.stderr)
        return 2
    runner = Runner(runs, dry_run=args.dry_run)
    try:
        if not args.collect_only:
            if args.ray or args.ray_address:
                if args.dry_run:
                    raise GridError("--dry-run prints the commands; drop --ray to see them")
                run_grid_ray(args, cfg, cells, only, runs, data_dir, runner)
            else:
                run_grid(args, cfg, cells, only, runs, data_dir, runner)
    except KeyboardInterrupt:
        runner.log("interrupted")
        return 130
    except GridError as e:
        print(f"grid: error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        return 0
    csv_path, md_path = collect(cfg, cells, results, cfg_path, runs)
    runner.log(f"wrote {csv_path} and {md_path}")
    for pargv in [] if args.no_plot else pareto_commands(cfg, csv_path, results):
        runner.log(f"$ {shlex.join(pargv)}")
        r = subprocess.run(nasq_prefix() + pargv[1:], check=False, capture_output=True, text=True)
        if r.returncode != 0:
            runner.log(f"plot failed (rc {r.returncode}): {(r.stderr or r.stdout).strip()}")
        else:
            runner.log(r.stdout.strip())
    return 1 if runner.failures else 0


if __name__ == "__main__":
    sys.exit(main())
