"""The Python API: every stage of nasq as a function, and a loaded integer model to call.

The CLI commands and this module call the same library functions; this module only gives them one calling
convention: a stage takes a :class:`~nasq.config.Config` (build one with :func:`make_config`) or a path, writes its
output where you say, and returns the path (or the plan / model) it made::

    import nasq

    cfg = nasq.make_config(task="sst2", data_dir="../shared/data/glue", teacher="runs/teacher",
                           **{"search.avg_bits": 2.0, "train.max_steps": 300})
    plan = nasq.allocate(cfg, "runs/plan.json")                   # Fisher allocation under the budget, or:
    run = nasq.run_search(cfg, "runs/search")                     # supernet search under the budget
    plan = nasq.finalize(run, "runs/plan.json", avg_bits=2.5, overwrite=True)  # its plan, here at another budget
    qat = nasq.finetune(cfg, "runs/qat", plan="runs/plan.json")   # QAT + KD from the teacher
    art = nasq.export_artifact(qat, "runs/model.nasq")            # bit-packed integer artifact
    model = nasq.load(art)
    model.predict(["a gripping, funny film"])                     # [{"label": ..., "scores": [...]}]

`nasq.<name>` resolves lazily to these functions (``import nasq`` does not import JAX). Their names differ from
nasq's subpackages (``nasq.search``, ``nasq.export``, ``nasq.config`` are modules).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nasq.config import Config, build_config
from nasq.contract.plan import Plan
from nasq.errors import NasqError

__all__ = ["Model", "allocate", "evaluate", "export_artifact", "export_onnx", "finalize", "finetune", "inspect", "load",
           "make_config", "run_search"]


def make_config(*, task: str | None = None, model: str | None = None, data_dir: str | None = None,
           teacher: str | None = None, file: str | Path | None = None, **overrides: Any) -> Config:
    """A validated :class:`~nasq.config.Config`: defaults < ``file`` (YAML) < the keyword arguments.

    ``overrides`` use the dotted keys of ``--set`` (``**{"train.lr": 1e-4}``) or whole sections
    (``train={"lr": 1e-4}``). Unknown keys raise :class:`~nasq.errors.NasqError` naming the key.
    """
    from nasq.config import load_yaml

    layers: list[tuple[str, dict]] = []
    if file is not None:
        layers.append((str(file), load_yaml(file)))
    named: dict[str, Any] = {}
    if task is not None:
        named.setdefault("data", {})["task"] = task
    if data_dir is not None:
        named.setdefault("data", {})["data_dir"] = str(data_dir)
    if model is not None:
        named.setdefault("model", {})["name"] = str(model)
    if teacher is not None:
        named.setdefault("kd", {})["teacher"] = str(teacher)
    layers.append(("arguments", named))
    nested: dict[str, Any] = {}
    for key, value in overrides.items():  # "train.lr" -> {"train": {"lr": ...}}; a section name as is
        *parents, leaf = key.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    layers.append(("keyword arguments", nested))
    return build_config(*layers)


def run_search(cfg: Config, out: str | Path, *, resume: bool = False, overwrite: bool = False, log=print) -> Path:
    """Run the supernet search of ``cfg`` (its ``search.*`` budget) into the run directory ``out``."""
    from nasq.search.loop import search as _search

    return Path(_search(cfg, out, resume=resume, overwrite=overwrite, log=log))


def allocate(cfg: Config, out: str | Path, *, method: str = "fisher", bits: int | None = None,
             rule_bits: dict[str, int] | None = None, n_batches: int | None = None, overwrite: bool = False,
             log=print, **options: Any) -> Plan:
    """A plan for ``cfg.kd.teacher`` under ``cfg.search``'s size budget and space, without a search, saved to
    ``out`` (``nasq baseline METHOD``): ``"fisher"`` (the default, as in ``nasq pipeline``: each tensor's
    Gauss-Newton trace times each width's quantization error, summed over ``n_batches`` train batches (default 16),
    then the exact knapsack; ``granularity="weight"``: each weight's own curvature times its own error instead),
    ``"measured"`` (each tensor's output KL measured at every width on ``n_batches`` train batches (default 8),
    then the exact knapsack; level with ``"fisher"`` after QAT under the protocol, and slower), ``"hessian"``,
    ``"uniform"`` / ``"rule"`` / ``"magnitude"`` (need ``bits``; ``rule`` also ``rule_bits``) or ``"random"``.
    ``options``: ``n_probes``, ``time_limit``, ``damage_from``, ``refine_rounds``, ``min_tokens``, ``spread``,
    ``granularity``, ``curvature``, ``traces_from``, ``shrinkage`` (per weight: each weight's curvature shrunk
    toward its tensor's mean by that fraction) (:func:`nasq.baselines.allocators.baseline_plan`; e.g.
    ``traces_from="fisher2.json"``: the Fisher plan of another budget from the errors (or traces) that plan
    recorded, no data read)."""
    from nasq.baselines.allocators import allocate_plan
    from nasq.io import check_output_path

    check_output_path(out, overwrite)
    plan = allocate_plan(method, cfg, bits=bits, rule_bits=rule_bits, n_batches=n_batches, log=log, **options)
    plan.save(out, overwrite=overwrite)
    return plan


def finalize(run: str | Path, out: str | Path, *, avg_bits: float | None = None, budget_mb: float | None = None,
             ratio: float | None = None, convention: str | None = None, spend_leftover: bool = False,
             overwrite: bool = False, time_limit: float = 20.0) -> Plan:
    """A search run's gates -> a discrete plan within its size or latency budget (or the size budget given here),
    saved to ``out``.

    ``convention``: whether ``budget_mb`` covers the searched tensors (``"encoder"``) or the whole artifact's
    (``"artifact"``); None: the search run's own.
    ``spend_leftover``: upgrade groups into the bytes the optimal plan leaves unused (equal-bytes comparisons)."""
    from nasq.search.finalize import finalize_run, run_budget

    if sum(x is not None for x in (avg_bits, budget_mb, ratio)) > 1:
        raise NasqError("give at most one of avg_bits, budget_mb, ratio")
    override = run_budget(run, budget_mb=budget_mb, avg_bits=avg_bits, ratio=ratio, convention=convention)
    return finalize_run(run, out, overwrite=overwrite, budget_override=override, time_limit=time_limit,
                        spend_leftover=spend_leftover)


def finetune(cfg: Config, out: str | Path, *, plan: str | Path | None = None, init_from: str | Path | None = None,
             resume: bool = False, overwrite: bool = False, log=print) -> Path:
    """Fine-tune into ``out``: fp32 without a plan, else quantization-aware (KD from ``cfg.kd.teacher``)."""
    from nasq.train.finetune import finetune as _finetune

    upd = {k: str(v) for k, v in (("plan", plan), ("init_from", init_from)) if v is not None}
    if upd:
        cfg = Config.model_validate({**cfg.model_dump(), **upd})
    return Path(_finetune(cfg, out, resume=resume, overwrite=overwrite, log=log))


def export_artifact(run: str | Path, out: str | Path, *, overwrite: bool = False,
                    eval_config: Config | None = None) -> Path:
    """A finished QAT run -> the bit-packed integer artifact directory ``out`` (``docs/ARTIFACT_FORMAT.md``).

    ``eval_config`` (e.g. ``make_config(data_dir=...)``): measure the dev metrics through the integer path
    before the artifact is moved into place, and write them into its model card (README.md)."""
    from nasq.export import writer

    return Path(writer.export_artifact(run, out, overwrite=overwrite, eval_config=eval_config))


def export_onnx(artifact: str | Path, out: str | Path, *, overwrite: bool = False) -> dict:
    """An artifact directory -> one ONNX file ``out`` for ONNX Runtime (needs ``pip install 'nasq[onnx]'``);
    returns the byte report (``docs/ARTIFACT_FORMAT.md``, "ONNX"). Run it with ``nasq.export.onnx.load_onnx``."""
    from nasq.export import onnx

    return onnx.export_onnx(artifact, out, overwrite=overwrite).as_dict()


@dataclass
class Model:
    """A loaded integer artifact: the model (a pytree), its tokenizer and manifest."""

    path: Path
    int_model: Any  # nasq.kernels.int_bert.IntBert
    tokenizer: Any

    @property
    def manifest(self) -> dict:
        return self.int_model.manifest

    @property
    def num_labels(self) -> int:
        return int(self.int_model.num_labels)

    def logits(self, input_ids, token_type_ids=None, attention_mask=None) -> np.ndarray:
        """fp32 ``[batch, num_labels]`` from token ids ``int [batch, seq]`` (masks default to all ones / zeros)."""
        ids = np.asarray(input_ids, np.int32)
        tt = np.zeros_like(ids) if token_type_ids is None else np.asarray(token_type_ids, np.int32)
        am = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, np.int32)
        return np.asarray(self.int_model(ids, tt, am))

    def predict(self, texts: list[str], pairs: list[str] | None = None, *, max_len: int = 128) -> list[dict]:
        """Classify raw texts (sentence pairs with ``pairs``): one ``{"label", "scores"}`` per text."""
        from nasq.export.reader import predict_with

        return predict_with(self.int_model, self.tokenizer, list(texts), pairs, max_len=max_len, source=self.path)

    def evaluate(self, cfg: Config | None = None) -> dict:
        """Dev-set metrics through the integer path (task: the manifest's unless ``cfg`` sets one)."""
        from nasq.export.reader import evaluate_with

        return evaluate_with(self.int_model, self.tokenizer, cfg or make_config(), source=self.path)


def load(path: str | Path) -> Model:
    """Load and verify an artifact directory (every file checked, see ``nasq.export.reader.load_artifact``)."""
    from nasq.export.reader import load_artifact
    from nasq.models.loading import load_tokenizer

    path = Path(path)
    return Model(path, load_artifact(path), load_tokenizer(path))


def inspect(source: str | Path):
    """The bit allocation of a plan.json, search run (its gates' pre-repair argmax), QAT run or artifact, as a
    ``nasq.report.inspect.SourcedPlan`` (``.plan``, ``.kind``, ``.source``, ``.note``): what ``nasq inspect``
    prints; ``nasq.report.inspect.format_markdown`` / ``nasq.report.plots.write_report`` render it."""
    from nasq.report.inspect import load_sourced_plan

    return load_sourced_plan(source)


def evaluate(artifact: str | Path, cfg: Config | None = None) -> dict:
    """Dev-set metrics of an artifact through the integer path."""
    from nasq.export.reader import evaluate_artifact

    return evaluate_artifact(artifact, cfg or make_config())
