"""One typed config for every command: pydantic models, YAML files, `--set a.b=c` overrides.

Precedence (lowest to highest): defaults < preset < `--config FILE` < dedicated CLI flags < `--set`.
Unknown keys are errors that name the key and list the valid ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from nasq.errors import NasqError, validation_problems
from nasq.io import read_yaml


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ModelConfig(_Section):
    name: str = "minilm-l6"  # alias, local directory or hub id
    max_len: int = Field(64, ge=8, le=512)


class DataConfig(_Section):
    task: str = "sst2"
    data_dir: str | None = None  # local GLUE directory (standard layout); None = hub
    buckets: tuple[int, ...] = (16, 32, 64)
    train_subset: int | None = Field(None, ge=1)  # draw N train rows (seeded) before anything else
    heldout: float = Field(0.1, gt=0, lt=1)  # share of (subset) train held out for search gates
    eval_batch_size: int = Field(64, ge=1)


class TrainConfig(_Section):
    batch_size: int = Field(32, ge=1)
    lr: float = Field(5e-5, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_frac: float = Field(0.06, ge=0, lt=1)
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1)  # overrides epochs
    seed: int = 0
    log_every: int = Field(10, ge=1)
    eval_every: int | None = Field(None, ge=1)  # None = only at the end
    checkpoint_every: int = Field(200, ge=1)
    grad_clip: float | None = 1.0
    # exponential moving average of the weights (fine-tune / QAT): ema <- d * ema + (1 - d) * params after every
    # step, started at the initial weights; the averaged weights are the ones evaluated, saved and exported (the
    # raw weights' dev metric is logged beside them as `raw_<metric>`); 0 = off (the raw weights)
    ema_decay: float = Field(0.0, ge=0, lt=1)


class KDConfig(_Section):
    teacher: str | None = None  # fp32 run directory
    beta: float = Field(1.0, ge=0)  # weight of the KD term
    temperature: float = Field(1.0, gt=0)
    # weight of hidden-state distillation (objectives.hidden_kd_loss; fine-tune / QAT, and the search's weight
    # step, its gate step too with search.gate_loss=task_kd): the teacher runs alongside the student on every step
    # (about +40% step time); 0 = logits only
    hidden_beta: float = Field(0.0, ge=0)
    # weight of attention distillation (objectives.attention_kd_loss, MiniLM's KL of attention distributions;
    # where hidden_beta applies; the teacher runs alongside as for hidden_beta); 0 = off
    attention_beta: float = Field(0.0, ge=0)


BUDGET_KEYS = ("budget_mb", "avg_bits", "ratio", "latency_ms")  # a search's budget: exactly one of them


class SearchConfig(_Section):
    space: str = "aqbert_128g"  # name in search_spaces/ or a YAML path
    budget_mb: float | None = Field(None, gt=0)
    avg_bits: float | None = Field(None, gt=0, le=8)
    ratio: float | None = Field(None, gt=1)
    latency_ms: float | None = Field(None, gt=0)
    latency_table: str | None = None  # JSON from `nasq profile`
    convention: Literal["encoder", "artifact"] = "encoder"
    mode: Literal["bilevel", "single"] = "bilevel"
    gate_lr: float = Field(0.05, gt=0)
    tau_start: float = Field(5.0, gt=0)
    tau_end: float = Field(0.2, gt=0)
    gumbel: bool = False
    # initial gate logits: all equal ("uniform"), +2 on the widest choice ("high_bits"), or +`init_plan_logit`
    # on the width a plan gives each group ("plan", with `init_plan`: e.g. a Hessian baseline's plan.json)
    gate_init: Literal["uniform", "high_bits", "plan"] = "uniform"
    init_plan: str | None = None
    init_plan_logit: float = Field(2.0, gt=0)
    # The budget is enforced by an exact dual price solved every step (nasq.search.loop): no penalty weight.
    warmup_steps: int = Field(0, ge=0)  # weight-only steps before gates move
    # bilevel: one gate step per `gate_every` weight steps (1 = every step). The gate step is a second forward +
    # backward: at 4 an iteration costs 1.44x an fp32 step, at 1 2.42x (`nasq bench search-step`); plans at 4 were
    # no worse on CoLA at avg 2 bits (3 seeds, experiments/results/protocol/NOTES.md)
    gate_every: int = Field(1, ge=1)
    # bilevel: the gate step's loss. "task": the task loss on held-out labels (AQ-BERT); "task_kd": plus
    # `kd.beta` x KD to the teacher's logits on the held-out rows (needs `kd.teacher`): a dense signal of how far
    # each width moves the student's outputs from the teacher's, where the labels of a well-fit model say little
    gate_loss: Literal["task", "task_kd"] = "task"
    # the gate logits' optimizer: "adam" (per-parameter: every gate moves at about the same speed whatever its
    # gradient's size) or "global_adam" (one second moment for all gates: the gradients' ratios are kept, so the
    # budget price trades bytes against how much each group's width changes the loss; nasq.objectives)
    gate_optimizer: Literal["adam", "global_adam"] = "adam"
    # a measured plan (`nasq baseline measured`, same model and space) whose damages D_t(c) enter the gate loss as
    # + damage_weight * sum_g sum_c p_{g,c} D_t(c) rows_g / rows_t: the expected output KL of the gates' widths,
    # measured, which the gate gradient (first order, at one point) misses where the damage is curvature
    damage_prior: str | None = None
    damage_weight: float = Field(1.0, gt=0)
    # bilevel: false = the gates only, on the frozen starting weights (the teacher, MSE-initialised steps): no
    # weight step, a gate step every step. The gates then see the joint output damage of the teacher quantized at
    # their widths (as `nasq baseline measured` does one tensor at a time), not weights co-adapted to the mixture;
    # QAT starts from the teacher. Needs mode=bilevel and gate_every=1.
    train_weights: bool = True

    @model_validator(mode="after")
    def _one_budget(self):
        given = [k for k in BUDGET_KEYS if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give exactly one budget, got {given}")
        if (self.gate_init == "plan") != (self.init_plan is not None):
            raise ValueError("gate_init=plan and init_plan=PLAN.json go together (set both or neither)")
        if not self.train_weights and (self.mode != "bilevel" or self.gate_every != 1 or self.warmup_steps):
            raise ValueError("train_weights=false (gates only) needs mode=bilevel, gate_every=1 and warmup_steps=0, "
                             f"got mode={self.mode}, gate_every={self.gate_every}, warmup_steps={self.warmup_steps}")
        return self


class ParallelConfig(_Section):
    """Data parallelism over a 1-D device mesh (`nasq.parallel`, docs/SCALING.md)."""

    data_parallel: int | Literal["all"] = 1  # devices on the "data" axis; 1 = single device
    compute_dtype: Literal["float32", "bfloat16"] = "float32"  # bf16 matmul passes; fp32 weights/losses/quant
    coordinator_address: str | None = None  # multi-host: HOST:PORT of process 0
    num_processes: int | None = Field(None, ge=1)
    process_id: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _check(self):
        if self.data_parallel != "all" and self.data_parallel < 1:
            raise ValueError(f"data_parallel must be >= 1 or 'all', got {self.data_parallel}")
        if self.num_processes is not None and self.process_id is not None and self.process_id >= self.num_processes:
            raise ValueError(f"process_id {self.process_id} must be < num_processes {self.num_processes} "
                             f"(ids are 0..{self.num_processes - 1})")
        return self


class Config(_Section):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    kd: KDConfig = KDConfig()
    search: SearchConfig = SearchConfig()
    parallel: ParallelConfig = ParallelConfig()
    plan: str | None = None  # plan.json for QAT fine-tuning
    # search run directory: QAT starts from its trained weights and steps (nasq.search.restore), not the teacher's
    init_from: str | None = None

    @model_validator(mode="after")
    def _init_from_needs_plan(self):
        if self.init_from is not None and self.plan is None:
            raise ValueError(f"init_from={self.init_from!r} needs a plan (--plan PLAN.json): it initialises a "
                             "quantization-aware fine-tune from a search run")
        return self

    @model_validator(mode="after")
    def _gate_kd_needs_teacher(self):
        if self.search.gate_loss == "task_kd" and (self.kd.teacher is None or self.kd.beta <= 0):
            raise ValueError("search.gate_loss=task_kd distils the teacher's logits in the gate step: give a teacher "
                             "(--teacher RUN_DIR) and kd.beta > 0, or use search.gate_loss=task")
        if not self.search.train_weights and self.kd.teacher is None:
            raise ValueError("search.train_weights=false searches the gates on frozen weights, which must be a "
                             "fine-tuned teacher (a pretrained checkpoint has an untrained task head): give "
                             "--teacher RUN_DIR")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _format_validation(e: ValidationError, source: str) -> str:
    return "\n".join(f"{source}: {p}" for p in validation_problems(e))


def deep_update(base: dict, upd: dict) -> dict:
    out = dict(base)
    for k, v in upd.items():
        out[k] = deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_set(items: list[str]) -> dict:
    """`["train.lr=1e-4", "search.gumbel=true"]` -> nested dict with YAML-parsed values."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise NasqError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.lr=1e-4")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` as a string
            try:
                value = float(value)
            except ValueError:
                pass
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def load_yaml(path: str | Path) -> dict:
    """A YAML config file: a mapping of sections (model, data, train, ...), bounded and checked (``nasq.io``)."""
    path = Path(path)
    if not path.exists():
        raise NasqError(f"config file {path} not found.")
    return read_yaml(path, what="config file", max_bytes=2**24)


def build_config(*layers: tuple[str, dict[str, Any]]) -> Config:
    """Merge (source_name, dict) layers in order and validate once; errors name the layer and key."""
    merged: dict = {}
    for _, layer in layers:
        merged = deep_update(merged, layer)
    try:
        return Config.model_validate(merged)
    except ValidationError as e:
        # Re-validate layer by layer to name the culprit source.
        acc: dict = {}
        for source, layer in layers:
            acc = deep_update(acc, layer)
            try:
                Config.model_validate(acc)
            except ValidationError as e2:
                raise NasqError(_format_validation(e2, source)) from None
        raise NasqError(_format_validation(e, "config")) from None


def load_config(path: str | Path) -> Config:
    return build_config((str(path), load_yaml(path)))
