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
from typing import Literal

import jax
import numpy as np
from flax import nnx
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

from nasq.contract.plan import Plan
from nasq.errors import NasqError, validation_problems
from nasq.io import load_safetensors, read_bytes, read_json, write_atomic
from nasq.models.bert import BertConfig, empty_model
from nasq.quant.apply import apply_plan
from nasq.tree import flatten, unflatten_like

__all__ = ["MODEL_META", "TOKENIZER_FILES", "load_model_dir", "model_dir_of", "save_model_dir"]

MODEL_META = "nasq_model.json"
MAX_LABELS = 10_000
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


class _Meta(BaseModel):
    model_config = ConfigDict(extra="allow")
    format: Literal["nasq-model"]
    version: Literal[1]
    num_labels: StrictInt = Field(ge=1, le=MAX_LABELS)
    task: StrictStr = ""
    quantized: StrictBool = False


def load_model_dir(path: str | Path) -> tuple[nnx.Module, dict]:
    """Load a model saved by `save_model_dir` (a run dir or its `model/`); returns (model, meta).

    Treated as untrusted: files are read through ``nasq.io`` (bounded, no links out of the directory), the meta
    and config are validated before the model is built, and every weight must have exactly the shape and dtype of
    the model the config (and plan) describe, with finite values."""
    path = model_dir_of(path)
    if not (path / MODEL_META).is_file():
        raise NasqError(f"{path}: not a nasq model (no {MODEL_META}); pass a finished finetune/qat run directory.")
    raw = read_json(path / MODEL_META, what="model meta", max_bytes=2**20, root=path)
    try:
        meta = _Meta.model_validate(raw)
    except ValidationError as e:
        raise NasqError(f"{path / MODEL_META}: " + "; ".join(validation_problems(e))) from None
    if not (path / "config.json").exists():
        raise NasqError(f"{path / 'config.json'}: config.json not found; a model directory needs an HF config.json.")
    cfg = BertConfig.from_dict(read_json(path / "config.json", what="model config", max_bytes=2**20, root=path),
                               source=str(path / "config.json"))
    spath = path / "state.safetensors"
    weights = cfg.num_weights(meta.num_labels)
    have = spath.stat().st_size if spath.is_file() else 0
    if 4 * weights > have:  # before building: a crafted config.json must not allocate what the file cannot hold
        raise NasqError(f"{path / 'config.json'} describes {weights:,} fp32 weights, more than the {have:,} bytes of "
                        f"{spath} hold; the model directory is corrupt or its files do not belong together")
    model = empty_model(cfg, meta.num_labels)  # every weight (and step) is read from state.safetensors below
    if meta.quantized:
        model = apply_plan(model, Plan.from_dict(read_json(path / "plan.json", what="plan", root=path, expect=None),
                                                 str(path / "plan.json")), init_steps=False)
    state = nnx.state(model, nnx.Param)
    leaves = jax.tree_util.tree_leaves(state)
    limit = 2**20 + sum(4 * int(np.prod(np.shape(v))) + 512 for v in leaves)  # fp32 arrays + header
    flat = load_safetensors(read_bytes(spath, what="model weights", max_bytes=limit, root=path), spath)
    try:
        nnx.update(model, unflatten_like(state, flat, strict=True))
    except NasqError as e:
        raise NasqError(f"{spath}: {e}") from None
    return model, raw
