"""Model directories (``RUN/model/``): weights, HF config, tokenizer files and, for a quantized model, its plan.

Layout::

    model/state.safetensors   every nnx.Param of the model under its dotted state path (fp32; LSQ steps too)
    model/config.json         the HF BERT config
    model/nasq_model.json     {"format": "nasq-model", "version": 1, "num_labels", "task", "quantized"}
    model/plan.json           the plan a quantized (QAT) model was trained with
    model/vocab.txt, tokenizer.json, ...   the tokenizer files of the source checkpoint (those present)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from flax import nnx

from nasq.contract.plan import Plan
from nasq.errors import NasqError
from nasq.io import write_atomic
from nasq.models.bert import BertConfig, BertForSequenceClassification
from nasq.quant.apply import apply_plan
from nasq.tree import flatten, unflatten_like

__all__ = ["MODEL_META", "TOKENIZER_FILES", "load_model_dir", "model_dir_of", "save_model_dir"]

MODEL_META = "nasq_model.json"
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def save_model_dir(out: Path, model: nnx.Module, *, source_model_dir: Path, num_labels: int, task: str,
                   plan: dict | None = None) -> None:
    """Write a self-contained model directory: weights (safetensors, our state paths), config, tokenizer."""
    from safetensors.numpy import save

    out.mkdir(parents=True, exist_ok=True)
    state = nnx.state(model, nnx.Param)
    arrays = {k: np.asarray(v) for k, v in flatten(state).items()}
    write_atomic(out / "state.safetensors", save(arrays))
    write_atomic(out / "config.json", json.dumps(model.config.to_dict(), indent=2))
    meta = {"format": "nasq-model", "version": 1, "num_labels": num_labels, "task": task,
            "quantized": plan is not None}
    write_atomic(out / MODEL_META, json.dumps(meta, indent=2))
    if plan is not None:
        write_atomic(out / "plan.json", json.dumps(plan, indent=2))
    for name in TOKENIZER_FILES:
        if (source_model_dir / name).is_file():
            shutil.copyfile(source_model_dir / name, out / name)


def model_dir_of(run: str | Path) -> Path:
    """The model directory of a run (`RUN/model/`), or `run` itself when it is one."""
    run = Path(run)
    return run / "model" if (run / "model" / MODEL_META).is_file() else run


def load_model_dir(path: str | Path) -> tuple[nnx.Module, dict]:
    """Load a model saved by `save_model_dir` (a run dir or its `model/`); returns (model, meta)."""
    from safetensors.numpy import load_file

    path = model_dir_of(path)
    if not (path / MODEL_META).is_file():
        raise NasqError(f"{path}: not a nasq model (no {MODEL_META}); pass a finished finetune/qat run directory.")
    meta = json.loads((path / MODEL_META).read_text())
    cfg = BertConfig.from_json(path / "config.json")
    model = BertForSequenceClassification(cfg, meta["num_labels"], rngs=nnx.Rngs(0))
    if meta.get("quantized"):
        model = apply_plan(model, Plan.load(path / "plan.json"))
    flat = load_file(str(path / "state.safetensors"))
    state = nnx.state(model, nnx.Param)
    nnx.update(model, unflatten_like(state, flat))
    return model, meta
