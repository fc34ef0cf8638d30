"""`nasq pipeline`: finetune(fp32) -> allocate -> finetune(QAT+KD) -> export -> eval, in one command.

The plan comes from one of three allocators (``--allocator``):

* ``fisher`` (the default): the Fisher allocation per tensor (``nasq baseline fisher``, which is ``nasq baseline
  hessian --curvature fisher --granularity tensor``: each tensor scored by the trace of the loss's Gauss-Newton
  matrix per weight times each width's quantization error, then the exact knapsack), on the preset's
  ``fisher_batches`` train batches (the protocol's 16); about a minute, and it trains nothing. Under the fair
  protocol (3 seeds a cell, README Results) it is level with the best baseline or ahead of it beyond the seeds'
  spread at every row it ran, and level with the measured allocation or ahead of it, in a fifth of the time.
  ``granularity="weight"`` (``--granularity weight``): each weight's own Gauss-Newton diagonal times its own error,
  summed per row group (the default for a few hours of 2026-12-05): level with per tensor at most rows, ahead
  beyond the spread at some (SST-2 avg 1.5 and 8 MB), behind at one (CoLA 10 MB); README Results lists them.
  ``shrinkage=S`` (``--shrinkage S``, per weight only): each weight's curvature shrunk toward its tensor's mean,
  the two granularities' damages blended ``(1-S) : S`` (S=1 gives the per-tensor plan).
* ``measured``: the measured allocation (:mod:`nasq.baselines.measured`: each tensor's output damage measured at
  every width on the preset's ``measure_batches`` train batches, then the same knapsack; minutes;
  ``--refine-rounds R`` re-measures around the plan R times, which did not help on SST-2). nasq's default until
  2026-12-04; its damages give the plan of any other budget without a forward (``nasq baseline measured
  --damage-from``).
* ``search``: the supernet search (DARTS-style gates under the budget) and finalize.

Every allocator takes a size budget or a latency budget (``--set search.latency_ms=T --set
search.latency_table=lat.json``, a ``nasq profile`` table; the plan's latency on it is within the budget).

Each stage writes its own output under `OUT/` and is skipped when that output is already complete, so an
interrupted pipeline continues where it stopped (`--resume`). Stage outputs:

    OUT/teacher/      fp32 fine-tune run (skipped when --teacher RUN is given)
    OUT/search/       supernet search run (--allocator search only)
    OUT/plan.json     the measured or Fisher plan, or the finalized searched plan (within the budget, guaranteed)
    OUT/qat/          quantization-aware fine-tune of the plan with KD from the teacher (logits and, by default,
                      attention distributions: :data:`QAT_ATTENTION_KD`)
    OUT/model.nasq/   exported integer artifact
    OUT/summary.json  dev metrics (teacher, fake-quant, integer path), prediction agreement, sizes

Presets set step counts, subsets, the budget (avg 2 bits) and the measured and Fisher allocators' batches. The space
follows the budget unless the user names one (:func:`budget_space`: widths within a bit or two of the budget's
uniform width, nothing pruned, as in the protocol's best results; pruned rows re-fit worst under QAT). Presets are
*quick* recipes for a 2-core CPU, not the full recipe: `smoke` (a few minutes, CI / first run) and `quick` (MiniLM +
an SST-2 subset). A preset adapts to the task (:func:`fit_preset_to_task`: train subset capped to the split, max
length from the task's token lengths).

The user's ``--config`` / ``--set`` apply to every stage; a ``stages`` section applies to one stage:
``--set stages.qat.train.max_steps=800 --set stages.search.train.lr=1e-5`` (or ``stages: {qat: {train: ...}}``
in the YAML file).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from nasq.baselines.allocators import (
    FISHER_BATCHES,
    allocate_plan,
    check_hessian_options,
    check_measured_options,
    resolve_recipe,
)
from nasq.config import BUDGET_KEYS, Config, SearchConfig, build_config
from nasq.contract.cost import load_latency_table
from nasq.contract.model_dir import load_model_dir
from nasq.contract.plan import Plan
from nasq.data.glue import load_split
from nasq.data.tasks import fitting_max_len, load_task_data
from nasq.errors import NasqError
from nasq.evaluation import evaluate
from nasq.export.reader import compare_with_run, read_manifest
from nasq.export.writer import export_artifact
from nasq.io import check_output_path, mark_nasq_made, read_json, write_atomic
from nasq.run import run_finished
from nasq.search.finalize import finalize_run
from nasq.search.loop import search
from nasq.train.finetune import finetune

# Per-stage overrides of the config; the user's --config/--set apply on top of every stage. `measure_batches`: the
# train batches the measured allocator runs each (tensor, width) on (the protocol's 8; smoke: 2, CI time);
# `fisher_batches`: the train batches the Fisher allocator sums its traces over (the protocol's fisher cells: 16).
# Attention distillation in every preset's QAT (``kd.attention_beta``: objectives.attention_kd_loss, MiniLM's KL of
# the student's attention distributions to the teacher's; the teacher runs beside the student, about 7% more per
# QAT step on MiniLM): the pipeline's default since 2026-12-06 by the rule in experiments/results/protocol/NOTES.md
# (README Results, "attention KD in QAT"). ``--set kd.attention_beta=0`` turns it off.
QAT_ATTENTION_KD = 1.0
PRESETS: dict[str, dict] = {
    "smoke": {
        "common": {"model": {"name": "minilm-l6", "max_len": 64}, "data": {"task": "sst2", "train_subset": 512,
                                                                           "heldout": 0.25}},
        "finetune": {"train": {"max_steps": 24, "lr": 5e-5, "log_every": 4, "checkpoint_every": 1000}},
        "search": {"train": {"max_steps": 16, "lr": 2e-5, "log_every": 4, "checkpoint_every": 1000},
                   "search": {"avg_bits": 2.0}},
        "qat": {"train": {"max_steps": 16, "lr": 5e-5, "log_every": 4, "checkpoint_every": 1000},
                "kd": {"attention_beta": QAT_ATTENTION_KD}},
        "measure_batches": 2,
        "fisher_batches": 2,
    },
    "quick": {
        "common": {"model": {"name": "minilm-l6", "max_len": 64}, "data": {"task": "sst2", "train_subset": 8000,
                                                                           "heldout": 0.2}},
        "finetune": {"train": {"max_steps": 250, "lr": 5e-5, "log_every": 25, "checkpoint_every": 100}},
        "search": {"train": {"max_steps": 150, "lr": 2e-5, "log_every": 10, "checkpoint_every": 50},
                   "search": {"avg_bits": 2.0}},
        "qat": {"train": {"max_steps": 250, "lr": 5e-5, "log_every": 25, "checkpoint_every": 100},
                "kd": {"attention_beta": QAT_ATTENTION_KD}},
        "measure_batches": 8,
        "fisher_batches": FISHER_BATCHES,
    },
}


def output_complete(kind: str, out: str | Path) -> bool:
    """Whether a stage's output is complete, so the stage is skipped on a rerun: ``run`` a run directory whose
    run.json says done; ``plan`` a file that is a nasq plan; ``export`` an artifact (its manifest is written last,
    after every other file)."""
    out = Path(out)
    if kind == "run":
        return run_finished(out)
    if kind == "plan":
        try:
            return read_json(out, what="plan", expect=None).get("format") == "nasq-plan"
        except (NasqError, AttributeError):
            return False
    if kind == "export":
        return (out / "manifest.json").is_file()
    raise ValueError(f"unknown stage output kind {kind!r}")


STAGES = ("finetune", "search", "qat")


def split_stage_layers(user_layers: list[tuple[str, dict]]) -> list[tuple[str, dict, dict]]:
    """``(source, common, per-stage)`` of each user layer: a layer's ``stages: {finetune|search|qat: {...}}``
    section applies to that stage only (``--set stages.qat.train.max_steps=800``); the rest to every stage."""
    out = []
    for source, layer in user_layers:
        layer = dict(layer or {})
        stages = layer.pop("stages", None) or {}
        if not isinstance(stages, dict) or any(k not in STAGES or not isinstance(v, dict) for k, v in stages.items()):
            bad = sorted(stages) if isinstance(stages, dict) else [type(stages).__name__]
            raise NasqError(f"{source}: stages: expected a mapping of {', '.join(STAGES)} to config sections, "
                            f"got {bad}; e.g. --set stages.qat.train.max_steps=800")
        out.append((source, layer, stages))
    return out


def stage_config(preset: dict, stage: str, user_layers: list[tuple[str, dict]], extra: dict | None = None) -> Config:
    """A stage's config: the preset's common and stage sections, the user's layers (their ``stages.<stage>``
    sections after their common part), then ``extra`` (what the pipeline wires: teacher, plan)."""
    layers = [("preset (common)", preset.get("common", {})), (f"preset ({stage})", preset.get(stage, {}))]
    for source, common, stages in split_stage_layers(user_layers):
        layers.append((source, common))
        if stage in stages:
            layers.append((f"{source} (stages.{stage})", stages[stage]))
    if extra:
        layers.append((f"pipeline ({stage})", extra))
    return build_config(*layers)


def _user_sets(user_layers: list[tuple[str, dict]], section: str, key: str) -> bool:
    """Whether the user set ``section.key``, for every stage or for one."""
    return any(key in (part.get(section) or {}) for _, common, stages in split_stage_layers(user_layers)
               for part in (common, *stages.values()))


def fit_preset_to_task(preset: dict, cfg: Config, user_layers: list[tuple[str, dict]], log=print) -> dict:
    """A preset adapted to the task (a new dict; the preset is not modified), except where the user set the key:

    * the train subset is a cap: on a task whose train split is smaller (MRPC has about 3,700 rows, the
      ``quick`` preset draws 8,000) every row is used instead;
    * the max length comes from the task's token lengths (``nasq.data.tasks.fitting_max_len``: the longest dev
      row and sampled train row, rounded up to 16), instead of the preset's 64, which cuts a fifth of MRPC;
    * a budget the user gives (``search.budget_mb``, ``avg_bits``, ``ratio`` or ``latency_ms``) replaces the
      preset's ``avg_bits`` (a search takes exactly one budget).
    """
    common = {k: dict(v) for k, v in preset.get("common", {}).items()}
    subset = common.get("data", {}).get("train_subset")
    if subset is not None and not _user_sets(user_layers, "data", "train_subset"):
        n = len(load_split(cfg.data.task, "train", cfg.data.data_dir))
        if subset > n:
            log(f"preset train subset {subset:,} > the {n:,} train rows of {cfg.data.task}: using every row")
            common["data"]["train_subset"] = None
    if "max_len" in common.get("model", {}) and not _user_sets(user_layers, "model", "max_len"):
        max_len, longest = fitting_max_len(cfg)
        if max_len != common["model"]["max_len"]:
            log(f"max length {max_len} for {cfg.data.task} (longest sampled example: {longest} tokens; "
                f"the preset's was {common['model']['max_len']})")
        common["model"]["max_len"] = max_len
    fitted = {**preset, "common": common}
    if any(_user_sets(user_layers, "search", k) for k in BUDGET_KEYS):
        search = {k: dict(v) for k, v in preset.get("search", {}).items()}
        for k in BUDGET_KEYS:
            search.get("search", {}).pop(k, None)
        fitted["search"] = search
    return fitted


# The space of an average-bits budget when the user names none: the protocol's evidence (README Results, 3 seeds
# each, SST-2 and CoLA): at avg 1.5 and 2 the measured allocation was best in {1,2,3,4}; at avg 2.5 and 3 in
# {2,3,4}; at avg 4 in {3,4,5,6} (above uniform 4-bit's mean, where {2,3,4,8} was below it). Above 6 bits (not
# measured) the widest widths are 8. Whole-artifact budgets: the word embeddings searched too, {2,3,4} beside
# the encoder's {1,2,3,4} (CoLA at 8 MB). Other size budgets (encoder MB, ratio) keep the search's default.
BUDGET_SPACES = ((2.0, "aqbert_128g_w1234"), (3.0, "aqbert_128g_w234"), (6.0, "aqbert_128g_w3456"),
                 (8.0, "aqbert_128g_w12348"))
ARTIFACT_SPACE = "whole_model_w1234"


def budget_space(search: SearchConfig) -> str | None:
    """The space :data:`BUDGET_SPACES` gives the budget of ``search`` (the first whose bound is ``>= avg_bits``),
    :data:`ARTIFACT_SPACE` for a whole-artifact budget, None for other budgets."""
    if search.convention == "artifact":
        return ARTIFACT_SPACE
    if search.avg_bits is None:
        return None
    return next(name for bound, name in BUDGET_SPACES if search.avg_bits <= bound)


def pipeline_configs(preset: dict, user_layers: list[tuple[str, dict]], out: Path, teacher: str | None,
                     log=print) -> dict[str, Config]:
    """Every stage's config (``finetune``, ``search``, ``qat``, ``eval``), the preset fitted to the task first;
    the search and QAT distil from ``teacher`` (default ``OUT/teacher``), QAT trains ``OUT/plan.json``."""
    teacher_dir = str(out / "teacher") if teacher is None else teacher
    p = fit_preset_to_task(preset, stage_config(preset, "finetune", user_layers), user_layers, log)
    search_extra: dict = {"kd": {"teacher": teacher_dir}}
    if not _user_sets(user_layers, "search", "space"):
        space = budget_space(stage_config(p, "search", user_layers).search)
        if space is not None:
            log(f"search space {space} for this budget (set search.space to choose another)")
            search_extra["search"] = {"space": space}
    return {"finetune": stage_config(p, "finetune", user_layers),
            "search": stage_config(p, "search", user_layers, search_extra),
            "qat": stage_config(p, "qat", user_layers, {"kd": {"teacher": teacher_dir},
                                                        "plan": str(out / "plan.json")}),
            "eval": stage_config(p, "qat", user_layers)}


def evaluate_stages(cfg: Config, teacher: str | Path, qat_dir: Path, art: Path, plan: Plan) -> dict:
    """The summary's dev metrics: the teacher, the fake-quant QAT model and the integer artifact, their prediction
    agreement, and the plan's / artifact's sizes."""
    manifest = read_manifest(art)
    data = load_task_data(cfg, model_dir=qat_dir / "model")
    cmp = compare_with_run(qat_dir, art, cfg, data=data)
    teacher_model, _ = load_model_dir(teacher)
    return {
        "task": cmp["task"], "dev_rows": cmp["dev_rows"],
        "teacher": evaluate(teacher_model, data, cfg.data.eval_batch_size),
        "fake_quant": cmp["fake_quant"], "int_artifact": cmp["int_artifact"],
        "fake_quant_vs_int_agreement": cmp.get("prediction_agreement"),
        "max_abs_logit_diff_fake_vs_int": cmp["max_abs_logit_diff"],
        "plan_totals": plan.totals, "budget": plan.budget,
        "artifact_tensor_bytes": manifest.get("tensor_bytes"),
        "predicted_bytes": manifest.get("predicted_bytes"),
        "artifact_vs_predicted": manifest.get("payload_vs_predicted"),
    }


ALLOCATORS = ("fisher", "measured", "search")  # the first is the default
SIZE_ALLOCATORS = ("fisher", "measured")  # allocate from the teacher (size or latency budget), training nothing


def plan_allocator(provenance: dict) -> str:
    """Which ``--allocator`` made a plan, from its provenance (a resumed pipeline must keep its allocator)."""
    method = provenance.get("method")
    if method == "measured":
        return "measured"
    if method == "hessian":
        return "fisher" if provenance.get("curvature") == "fisher" else "hessian"
    return "search"


def check_allocator_options(allocator: str, refine_rounds: int = 0, measure_batches: int | None = None,
                            granularity: str | None = None, shrinkage: float = 0.0) -> None:
    """The allocator's name and its own options; run first, before any data is read, so a bad flag costs nothing."""
    if allocator not in ALLOCATORS:
        raise NasqError(f"unknown allocator {allocator!r}; choose one of {', '.join(ALLOCATORS)}")
    check_measured_options(allocator, refine_rounds=refine_rounds)
    if granularity is not None or shrinkage != 0.0:
        if allocator != "fisher":
            flag = "--granularity" if granularity is not None else "--shrinkage"
            raise NasqError(f"{flag} is for the fisher allocator, not {allocator}")
        check_hessian_options("hessian", resolve_recipe("fisher", granularity)[1], "fisher", shrinkage=shrinkage)
    if measure_batches is not None:
        if allocator not in SIZE_ALLOCATORS:
            raise NasqError(f"--measure-batches is for the measured and fisher allocators, not {allocator}")
        if isinstance(measure_batches, bool) or not isinstance(measure_batches, int) or measure_batches < 1:
            raise NasqError(f"--measure-batches must be an integer >= 1, got {measure_batches!r}")


def check_allocator_budget(cfg: Config, allocator: str) -> None:
    """A budget for ``measured`` and ``fisher`` (size or latency), and a loadable latency table; run before any
    stage, so a missing budget costs no training."""
    s = cfg.search
    if allocator in SIZE_ALLOCATORS and (s.avg_bits, s.budget_mb, s.ratio, s.latency_ms) == (None,) * 4:
        raise NasqError(f"--allocator {allocator}{' (the default)' * (allocator == ALLOCATORS[0])} needs a "
                        "budget: --set search.avg_bits=B (or search.budget_mb, search.ratio, or search.latency_ms "
                        "with search.latency_table)")
    if s.latency_ms is not None:  # a missing or invalid table fails here, not after the teacher's training
        if not s.latency_table:
            raise NasqError("search.latency_ms needs a latency table: run `nasq profile --out lat.json` on the "
                            "target machine, then pass --set search.latency_table=lat.json")
        load_latency_table(s.latency_table)


def allocation_batches(preset: dict, allocator: str, measure_batches: int | None = None) -> int:
    """The train batches a size allocator runs on: ``measure_batches`` when given, else the preset's
    ``fisher_batches`` (``fisher``) or ``measure_batches`` (``measured``)."""
    if measure_batches is not None:
        return measure_batches
    return preset["fisher_batches" if allocator == "fisher" else "measure_batches"]


def run_pipeline(out: str | Path, *, preset: str = "quick", user_layers: list[tuple[str, dict]] | None = None,
                 teacher: str | None = None, resume: bool = False, overwrite: bool = False, log=print,
                 allocator: str = ALLOCATORS[0], refine_rounds: int = 0, measure_batches: int | None = None,
                 granularity: str | None = None, shrinkage: float = 0.0) -> dict:
    """Run (or resume) every stage into ``out`` (module docstring); returns the summary written to
    ``OUT/summary.json``. ``measure_batches``: the measured and fisher allocators' train batches (None: the
    preset's ``measure_batches`` or ``fisher_batches``); ``granularity``: the fisher allocator's (None: its
    recipe's, per tensor; ``"weight"``: per weight); ``shrinkage``: per weight, each weight's curvature shrunk
    that far toward its tensor's mean (:func:`nasq.baselines.hessian.checked_shrinkage`; 0: none)."""
    if preset not in PRESETS:
        raise NasqError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}.")
    check_allocator_options(allocator, refine_rounds, measure_batches, granularity, shrinkage)
    p = PRESETS[preset]
    user_layers = user_layers or []
    out = Path(out)
    # Every stage's config is validated before --out is touched (a bad --set loses nothing).
    configs = pipeline_configs(p, user_layers, out, teacher, log)
    check_allocator_budget(configs["search"], allocator)
    n_measure = allocation_batches(p, allocator, measure_batches)
    fisher_per = resolve_recipe("fisher", granularity)[1] if allocator == "fisher" else None
    if teacher is not None and not (Path(teacher) / "model").is_dir():
        raise NasqError(f"--teacher {teacher}: not a finished fine-tune run (no model/ directory).")
    if not resume:
        check_output_path(out, overwrite)  # --overwrite replaces only a directory nasq made
        if out.exists() and overwrite:
            shutil.rmtree(out) if out.is_dir() and not out.is_symlink() else out.unlink()
    out.mkdir(parents=True, exist_ok=True)
    mark_nasq_made(out, "pipeline")
    times: dict[str, float] = {}
    log(f"nasq pipeline, preset {preset!r} (a quick recipe: subsets and few steps; see README for the full one)")

    # 1. fp32 teacher
    t0 = time.time()
    if teacher is None:
        teacher = str(out / "teacher")
        if not output_complete("run", teacher):
            log(f"[1/6] fp32 fine-tune -> {teacher}")
            finetune(configs["finetune"], teacher, resume=resume and (Path(teacher) / "config.yaml").is_file(),
                     overwrite=True)
    times["finetune_s"] = time.time() - t0

    # 2-3. search and finalize, or the Fisher or measured allocation
    t0 = time.time()
    search_dir, plan_path = out / "search", out / "plan.json"
    if output_complete("plan", plan_path):  # resumed: the plan there must be the chosen allocator's
        made = Plan.load(plan_path).provenance
        made_by = plan_allocator(made)
        if made_by != allocator:
            hint = f"resume with --allocator {made_by}, or " if made_by in ALLOCATORS else ""
            raise NasqError(f"{plan_path} was made by {made_by!r}, not by --allocator {allocator}; {hint}start a "
                            "new --out")
        if fisher_per is not None and made.get("granularity") != fisher_per:
            raise NasqError(f"{plan_path} was made by the fisher allocator per {made.get('granularity')}, not per "
                            f"{fisher_per}; resume with --granularity {made.get('granularity')}, or start a new --out")
        recorded = made.get("shrinkage", 0.0)  # absent: unshrunk; compared as recorded (JSON 0.5 == 0.5)
        if fisher_per is not None and recorded != shrinkage:
            raise NasqError(f"{plan_path} was made with --shrinkage {recorded}, not {shrinkage}; resume with "
                            f"--shrinkage {recorded}, or start a new --out")
    if allocator == "measured":
        if not output_complete("plan", plan_path):
            log(f"[2-3/6] measured allocation ({n_measure} batches, {refine_rounds} refinement rounds) -> {plan_path}")
            # nasq baseline measured for the teacher, under the search stage's budget and space (checked above)
            allocate_plan("measured", configs["search"], refine_rounds=refine_rounds,
                          n_batches=n_measure).save(plan_path, overwrite=True)
        times["allocate_s"] = time.time() - t0
    elif allocator == "fisher":
        if not output_complete("plan", plan_path):
            shrunk = f", shrunk {shrinkage:g} toward per tensor" if shrinkage else ""
            log(f"[2-3/6] Fisher allocation per {fisher_per}{shrunk} ({n_measure} batches) -> {plan_path}")
            allocate_plan("fisher", configs["search"], n_batches=n_measure, granularity=granularity,
                          shrinkage=shrinkage).save(plan_path, overwrite=True)
        times["allocate_s"] = time.time() - t0
    else:
        if not output_complete("run", search_dir):
            log(f"[2/6] search -> {search_dir}")
            search(configs["search"], search_dir, resume=resume and (search_dir / "config.yaml").is_file(),
                   overwrite=True)
        times["search_s"] = time.time() - t0
        if not output_complete("plan", plan_path):
            log(f"[3/6] finalize -> {plan_path}")
            finalize_run(search_dir, plan_path)
    plan = Plan.load(plan_path)

    # 4. QAT + KD
    t0 = time.time()
    qat_dir = out / "qat"
    if not output_complete("run", qat_dir):
        log(f"[4/6] QAT + KD -> {qat_dir}")
        finetune(configs["qat"], qat_dir, resume=resume and (qat_dir / "config.yaml").is_file(), overwrite=True)
    times["qat_s"] = time.time() - t0

    # 5. export
    art = out / "model.nasq"
    if not output_complete("export", art):
        log(f"[5/6] export -> {art}")
        export_artifact(qat_dir, art, overwrite=True, eval_config=configs["eval"])  # the card gets int metrics

    # 6. eval: teacher, fake-quant QAT model, integer artifact; agreement of fake-quant vs int predictions
    log("[6/6] eval (dev set)")
    summary = {"preset": preset, "allocator": allocator, **evaluate_stages(configs["eval"], teacher, qat_dir, art, plan),
               "stage_wall_s": {k: round(v, 1) for k, v in times.items()},
               "created": time.strftime("%Y-%m-%d %H:%M")}
    write_atomic(out / "summary.json", json.dumps(summary, indent=2))
    log(json.dumps({k: summary[k] for k in ("teacher", "fake_quant", "int_artifact", "fake_quant_vs_int_agreement",
                                            "artifact_vs_predicted")}, indent=2))
    log(f"pipeline done -> {out}/summary.json")
    return summary
