"""Write a QAT model as a ``model.nasq`` artifact directory (the reader is :mod:`nasq.export.reader`).

Format (see ``docs/ARTIFACT_FORMAT.md``)::

    model.nasq/
      tensors.safetensors   packed codes, group scales, fp32 biases / LayerNorm / unquantized tensors
      layout.json           per module: kind, rows, cols, group sizes and bits (run-length), quant mode
      plan.json             the plan the model was trained with (provenance; the loader reads layout.json)
      config.json           HF BERT config
      README.md             model card (nasq.export.card): bits per module kind, budget, bytes, metrics, provenance
      vocab.txt, tokenizer.json, tokenizer_config.json, special_tokens_map.json   (those present)
      manifest.json         format, version, sizes + sha256 of every other file, byte accounting; written last

Tensor names (module paths relative to the encoder root, e.g. ``encoder.layer.0.attention.self.query``):

* quantized linear / embedding ``P``: ``P.seg{b}`` uint8 ``[R_b, ceil(cols*b/8)]`` (dense) for each
  non-zero width ``b`` present (rows of the groups at ``b`` bits, original order), ``P.scale`` fp32
  ``[G_kept]`` (segment order), ``P.bias`` fp32 ``[R_kept]`` (linears). Pruned groups are absent; a fully
  pruned tensor stores nothing.
* fp32 linear ``P``: ``P.weight`` ``[out, in]`` (HF layout), ``P.bias``; fp32 embedding ``P.weight``;
  LayerNorm ``P.weight`` (scale), ``P.bias``.

Byte accounting: ``tensor_bytes`` = sum of the stored arrays' bytes. For each quantized tensor it equals
``nasq.quant.packing.tensor_nbytes`` of its groups, so the searched part equals the plan's ``searched_bytes``
exactly, and the whole payload equals the cost model's ``artifact_tensor_bytes`` (fixed tensors by
``nasq.contract.cost.fixed_tensor_nbytes``) exactly. File overhead (safetensors header, JSON, tokenizer) is not
counted on either side.

Nothing is unpickled: tensors are read with ``safetensors.numpy`` and metadata with ``json``; every file's size
and sha256 are checked against the manifest before anything is parsed, and the manifest carries a sha256 of
its own canonical JSON.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from nasq._version import __version__
from nasq.config import Config
from nasq.contract.cost import fixed_nbytes
from nasq.contract.model_dir import MODEL_META, TOKENIZER_FILES, load_model_dir
from nasq.contract.plan import Plan
from nasq.errors import NasqError
from nasq.export.card import model_card
from nasq.export.format import CARD, FORMAT, LAYOUT, MANIFEST, TENSORS, VERSION, manifest_digest, rle, sha256
from nasq.export.reader import evaluate_artifact
from nasq.io import check_output_path, read_bytes, read_json, replace_dir, write_atomic
from nasq.models.bert import Embedding, LayerNorm, Linear
from nasq.models.surgery import module_path, strip_root
from nasq.quant.layers import QuantEmbedding, QuantLinear, _Gated
from nasq.quant.packing import pack_rows

__all__ = ["export_artifact", "export_model", "model_tensors", "predicted_artifact_bytes"]


def model_tensors(model) -> tuple[dict[str, np.ndarray], dict[str, dict], dict[str, tuple]]:
    """Walk a (fixed-plan) classifier: ``(tensors, layout, param_shapes)``.

    ``param_shapes`` are the fp32 parameter shapes under cost-model names (``P.kernel``, ``P.bias``,
    ``P.embedding``, ``P.scale``) for ``nasq.contract.cost.fixed_nbytes``.
    """
    tensors: dict[str, np.ndarray] = {}
    layout: dict[str, dict] = {}
    shapes: dict[str, tuple] = {}
    for mpath, mod in nnx.iter_modules(model):
        p = strip_root(module_path(mpath))
        if isinstance(mod, _Gated):
            raise NasqError(
                f"{p} is a supernet layer; export a finalized, fine-tuned model (a QAT run), not a search run"
            )
        if isinstance(mod, (QuantLinear, QuantEmbedding)):
            lin = isinstance(mod, QuantLinear)
            w_rows = np.asarray(mod.kernel[...]).T if lin else np.asarray(mod.embedding[...])
            bias = np.asarray(mod.bias[...]) if lin else None
            arrays = pack_rows(w_rows, bias, mod.group_sizes, mod.bits, np.asarray(mod.scales[...]), mod.mode)
            tensors.update({f"{p}.{k}": v for k, v in arrays.items()})
            layout[p] = {"kind": "qlinear" if lin else "qembedding", "rows": int(w_rows.shape[0]),
                         "cols": int(w_rows.shape[1]), "has_bias": lin, "mode": mod.mode,
                         "group_sizes": rle(mod.group_sizes), "bits": rle(mod.bits)}
            if lin:
                shapes[f"{p}.kernel"], shapes[f"{p}.bias"] = w_rows.T.shape, bias.shape
            else:
                shapes[f"{p}.embedding"] = w_rows.shape
        elif isinstance(mod, Linear):
            k = np.asarray(mod.kernel[...], np.float32)
            tensors[f"{p}.weight"] = np.ascontiguousarray(k.T)
            tensors[f"{p}.bias"] = np.asarray(mod.bias[...], np.float32)
            layout[p] = {"kind": "linear", "rows": int(k.shape[1]), "cols": int(k.shape[0]), "has_bias": True}
            shapes[f"{p}.kernel"], shapes[f"{p}.bias"] = k.shape, (k.shape[1],)
        elif isinstance(mod, Embedding):
            t = np.asarray(mod.embedding[...], np.float32)
            tensors[f"{p}.weight"] = t
            layout[p] = {"kind": "embedding", "rows": int(t.shape[0]), "cols": int(t.shape[1])}
            shapes[f"{p}.embedding"] = t.shape
        elif isinstance(mod, LayerNorm):
            tensors[f"{p}.weight"] = np.asarray(mod.scale[...], np.float32)
            tensors[f"{p}.bias"] = np.asarray(mod.bias[...], np.float32)
            layout[p] = {"kind": "layernorm", "features": int(tensors[f"{p}.weight"].shape[0]),
                         "eps": float(mod.eps)}
            shapes[f"{p}.scale"] = shapes[f"{p}.bias"] = tensors[f"{p}.bias"].shape
    return tensors, layout, shapes


def predicted_artifact_bytes(plan: Plan, param_shapes: dict[str, tuple]) -> int:
    """Cost-model bytes of every artifact tensor: the plan's searched bytes plus
    :func:`nasq.contract.cost.fixed_nbytes` of the model's other parameters at the plan's ``fixed`` precisions."""
    return plan.totals["searched_bytes"] + fixed_nbytes(param_shapes, plan.searched_tensors(), plan)


def export_model(model, plan: Plan | dict, out: str | Path, *, task: str, num_labels: int,
                 source_dir: str | Path | None = None, run_info: dict | None = None, overwrite: bool = False,
                 measure: Callable[[Path], dict] | None = None) -> Path:
    """Write the artifact of an in-memory fixed-plan classifier (see module docstring). Returns ``out``.

    ``plan`` is the model's :class:`Plan` (a ``plan.json`` mapping is validated into one). ``measure``: called
    with the complete artifact (in its temporary directory, before it is moved to ``out``); the dev metrics it
    returns (``nasq.export.reader.evaluate_artifact``'s dict) go into the model card."""
    from safetensors.numpy import save

    if not isinstance(plan, Plan):
        plan = Plan.from_dict(plan)
    out = Path(out)
    check_output_path(out, overwrite)  # before any work: a refused --out costs nothing
    tensors, layout, shapes = model_tensors(model)
    files: dict[str, bytes] = {
        TENSORS: save(tensors),
        LAYOUT: json.dumps({"modules": layout}, indent=1).encode(),
        "plan.json": json.dumps(plan.to_dict(), indent=2).encode(),
        "config.json": json.dumps(model.config.to_dict(), indent=2).encode(),
    }
    if source_dir is not None:
        for name in TOKENIZER_FILES:
            if (Path(source_dir) / name).is_file():
                files[name] = read_bytes(Path(source_dir) / name, what="tokenizer file", max_bytes=2**26,
                                         root=source_dir)
    tensor_bytes = int(sum(a.nbytes for a in tensors.values()))
    predicted = predicted_artifact_bytes(plan, shapes)
    searched_paths = set(plan.paths)
    searched_payload = int(sum(a.nbytes for k, a in tensors.items() if k.rpartition(".")[0] in searched_paths))
    manifest: dict[str, Any] = {
        "format": FORMAT, "version": VERSION, "nasq_version": __version__,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "task": task, "num_labels": int(num_labels), "quant_mode": plan.quant_mode,
        "files": {n: {"bytes": len(d), "sha256": sha256(d)} for n, d in files.items()},
        "tensor_bytes": tensor_bytes, "predicted_bytes": int(predicted),
        "payload_vs_predicted": tensor_bytes / predicted if predicted else None,
        "searched_tensor_bytes": searched_payload, "searched_predicted_bytes": plan.totals["searched_bytes"],
    }

    def write_card(tmp: Path, int_metrics: dict | None) -> None:
        card = model_card(plan, manifest, source=str(source_dir or ""), run_info=run_info,
                          int_metrics=int_metrics).encode()
        write_atomic(tmp / CARD, card)
        manifest["files"][CARD] = {"bytes": len(card), "sha256": sha256(card)}
        manifest["manifest_sha256"] = manifest_digest(manifest)
        write_atomic(tmp / MANIFEST, json.dumps(manifest, indent=2))  # last: its presence marks a complete export

    def write(tmp: Path) -> None:
        for name, data in files.items():
            write_atomic(tmp / name, data)
        write_card(tmp, None)
        if measure is not None:  # the finished artifact, measured where it is, then its card says so
            write_card(tmp, measure(tmp))

    # built beside `out` and moved into place: an existing artifact is replaced only by a complete new one (no
    # marker file: an artifact holds exactly its manifest's files, and nasq_made knows it by its manifest)
    return replace_dir(out, write, kind=None, overwrite=overwrite)


def export_artifact(model_dir_or_run: str | Path, out: str | Path, *, overwrite: bool = False,
                    eval_config: Config | None = None) -> Path:
    """Export a finished QAT run (or its ``model/`` dir) to the artifact directory ``out``.

    ``eval_config``: also measure the dev metrics through the integer path (``evaluate_artifact`` with this
    config's data settings) and record them in the model card."""
    src = Path(model_dir_or_run)
    if (src / "model" / MODEL_META).is_file():
        src = src / "model"
    if not (src / "plan.json").is_file():
        raise NasqError(f"{src}: no plan.json; export needs a quantized (QAT) run, e.g. `nasq finetune --plan ...`")
    out = check_output_path(out, overwrite)
    model, meta = load_model_dir(src)
    plan = Plan.load(src / "plan.json")
    run_json = src.parent / "run.json"  # the QAT run's record (dev metrics, command) when src is <run>/model
    run_info = read_json(run_json, what="run info", max_bytes=2**24, root=src.parent) if run_json.is_file() else None
    measure = None if eval_config is None else (lambda path: evaluate_artifact(path, eval_config))
    return export_model(model, plan, out, task=meta.get("task", ""), num_labels=int(meta["num_labels"]),
                        source_dir=src, run_info=run_info, overwrite=overwrite, measure=measure)
