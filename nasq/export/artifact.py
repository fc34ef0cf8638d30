"""Export a QAT model to a ``model.nasq`` artifact directory, load it as an integer model, evaluate / predict / bench.

Format (see ``docs/ARTIFACT_FORMAT.md``)::

    model.nasq/
      tensors.safetensors   packed codes, group scales, fp32 biases / LayerNorm / unquantized tensors
      layout.json           per module: kind, rows, cols, group sizes and bits (run-length), quant mode
      plan.json             the plan the model was trained with (provenance; the loader reads layout.json)
      config.json           HF BERT config
      vocab.txt, tokenizer.json, tokenizer_config.json, special_tokens_map.json   (those present)
      manifest.json         format, version, sizes + sha256 of every other file, byte accounting; written last

Tensor names (module paths relative to the encoder root, e.g. ``encoder.layer.0.attention.self.query``):

* quantized linear / embedding ``P``: ``P.seg{b}`` uint8 ``[R_b, ceil(cols*container(b)/8)]`` for each
  non-zero width ``b`` present (rows of the groups at ``b`` bits, original order), ``P.scale`` fp32
  ``[G_kept]`` (segment order), ``P.bias`` fp32 ``[R_kept]`` (linears). Pruned groups are absent; a fully
  pruned tensor stores nothing.
* fp32 linear ``P``: ``P.weight`` ``[out, in]`` (HF layout), ``P.bias``; fp32 embedding ``P.weight``;
  LayerNorm ``P.weight`` (scale), ``P.bias``.

Byte accounting: ``tensor_bytes`` = sum of the stored arrays' bytes. For each quantized tensor it equals
``nasq.quant.packing.tensor_nbytes`` of its groups, so the searched part equals the plan's ``searched_bytes``
exactly, and the whole payload equals the cost model's ``artifact_tensor_bytes`` (fixed tensors by
``nasq.search.cost.fixed_tensor_nbytes``) exactly. File overhead (safetensors header, JSON, tokenizer) is not
counted on either side.

Nothing is unpickled: tensors are read with ``safetensors.numpy`` and metadata with ``json``; every file's size
and sha256 are checked against the manifest before anything is parsed, and the manifest carries a sha256 of
its own canonical JSON.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import shutil
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nasq.errors import NasqError
from nasq.kernels.int_bert import Fp32Linear, IntBert, IntBertMeta
from nasq.kernels.int_linear import PackedLinear, unpack_embedding
from nasq.quant.packing import pack_codes, packed_row_bytes, tensor_nbytes
from nasq.quant.quantizer import quantize_codes
from nasq.run import write_atomic

FORMAT = "nasq-artifact"
VERSION = 1
TENSORS = "tensors.safetensors"
LAYOUT = "layout.json"
MANIFEST = "manifest.json"
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


# ------------------------------------------------------------------------------------------------ helpers
def _strip(path: str) -> str:
    return path.removeprefix("bert.")


def rle(values) -> list[list[int]]:
    """Run-length encode: ``[1, 1, 4] -> [[1, 2], [4, 1]]``."""
    out: list[list[int]] = []
    for v in values:
        v = int(v)
        if out and out[-1][0] == v:
            out[-1][1] += 1
        else:
            out.append([v, 1])
    return out


def unrle(runs) -> list[int]:
    return [int(v) for v, n in runs for _ in range(int(n))]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _manifest_digest(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return _sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def pack_rows(w_rows, bias, group_sizes, bits, scales, mode: str = "symmetric") -> dict[str, np.ndarray]:
    """Vectorized ``pack_linear``: the stored arrays of one quantized tensor (``seg{b}``, ``scale``, ``bias``).

    Same result as ``nasq.kernels.int_linear.pack_linear`` (segments by ascending width, rows in original
    order, one scale per kept group in segment order) but one ``quantize_codes`` call per width, so a
    vocabulary with one group per row packs in milliseconds. Empty arrays are omitted.
    """
    w = np.asarray(w_rows, np.float32)
    sizes = np.asarray(group_sizes, np.int64)
    bits = np.asarray(bits, np.int64)
    scales = np.asarray(scales, np.float32).reshape(-1)
    if sizes.sum() != w.shape[0] or len(bits) != len(sizes) or len(scales) != len(sizes):
        raise NasqError(
            f"plan does not fit the weight: {len(sizes)} groups summing to {int(sizes.sum())} rows, "
            f"{len(bits)} bit widths, {len(scales)} scales for a [{w.shape[0]}, {w.shape[1]}] tensor"
        )
    gid = np.repeat(np.arange(len(sizes)), sizes)
    row_bits, row_scale = bits[gid], scales[gid]
    out: dict[str, np.ndarray] = {}
    gscale, kept_bias = [], []
    for b in sorted({int(v) for v in bits if v > 0}):
        sel = row_bits == b
        codes = np.asarray(quantize_codes(w[sel], row_scale[sel][:, None], b, mode))
        out[f"seg{b}"] = pack_codes(codes, b)
        gscale.append(scales[bits == b])
        if bias is not None:
            kept_bias.append(np.asarray(bias, np.float32)[sel])
    if gscale:
        out["scale"] = np.concatenate(gscale).astype(np.float32)
        if bias is not None:
            out["bias"] = np.concatenate(kept_bias).astype(np.float32)
    return out


# ------------------------------------------------------------------------------------------------- export
def model_tensors(model) -> tuple[dict[str, np.ndarray], dict[str, dict], dict[str, tuple]]:
    """Walk a (fixed-plan) classifier: ``(tensors, layout, param_shapes)``.

    ``param_shapes`` are the fp32 parameter shapes under cost-model names (``P.kernel``, ``P.bias``,
    ``P.embedding``, ``P.scale``) for ``nasq.search.cost.fixed_nbytes``.
    """
    from flax import nnx

    from nasq.models.bert import Embedding, LayerNorm, Linear
    from nasq.models.surgery import module_path
    from nasq.quant.layers import QuantEmbedding, QuantLinear, _Gated

    tensors: dict[str, np.ndarray] = {}
    layout: dict[str, dict] = {}
    shapes: dict[str, tuple] = {}
    for mpath, mod in nnx.iter_modules(model):
        p = _strip(module_path(mpath))
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


def plan_tensors(plan: dict) -> list[dict]:
    ts = plan.get("tensors")
    if not isinstance(ts, list):
        raise NasqError("plan.json has no 'tensors' list; it was not written by `nasq finalize`")
    return ts


def searched_bytes(plan: dict) -> int:
    """``sum_t tensor_nbytes(t)`` over the plan's searched tensors (the cost model's size of the plan)."""
    return sum(tensor_nbytes(t["group_sizes"], t["cols"], t["bits"], bool(t.get("has_bias", True)))
               for t in plan_tensors(plan))


def predicted_artifact_bytes(plan: dict, param_shapes: dict[str, tuple]) -> int:
    """Cost-model bytes of every artifact tensor: the plan's ``totals.artifact_tensor_bytes`` when present,
    else ``searched_bytes(plan) + nasq.search.cost.fixed_nbytes(param_shapes, ...)`` with the plan's ``fixed``."""
    totals = plan.get("totals") or {}
    if "artifact_tensor_bytes" in totals:
        return int(totals["artifact_tensor_bytes"])
    from nasq.search.cost import fixed_nbytes

    fixed = {"word_embeddings_bits": 32, "other_embeddings_bits": 32, "unsearched_linear_bits": 32,
             **(plan.get("fixed") or {})}
    tensors = [SimpleNamespace(path=t["path"], has_bias=bool(t.get("has_bias", True))) for t in plan_tensors(plan)]
    return searched_bytes(plan) + fixed_nbytes(param_shapes, tensors, SimpleNamespace(fixed=SimpleNamespace(**fixed)))


def export_model(model, plan: dict, out: str | Path, *, task: str, num_labels: int,
                 source_dir: str | Path | None = None, overwrite: bool = False) -> Path:
    """Write the artifact of an in-memory fixed-plan classifier (see module docstring). Returns ``out``."""
    from safetensors.numpy import save

    out = Path(out)
    if out.exists():
        if not overwrite:
            raise NasqError(f"{out} already exists; pass --overwrite to replace it")
        if out.is_dir():
            shutil.rmtree(out)
        else:
            out.unlink()
    tensors, layout, shapes = model_tensors(model)
    files: dict[str, bytes] = {
        TENSORS: save(tensors),
        LAYOUT: json.dumps({"modules": layout}, indent=1).encode(),
        "plan.json": json.dumps(plan, indent=2).encode(),
        "config.json": json.dumps(model.config.to_dict(), indent=2).encode(),
    }
    if source_dir is not None:
        for name in TOKENIZER_FILES:
            if (Path(source_dir) / name).is_file():
                files[name] = (Path(source_dir) / name).read_bytes()
    tensor_bytes = int(sum(a.nbytes for a in tensors.values()))
    predicted = predicted_artifact_bytes(plan, shapes)
    searched_paths = {t["path"] for t in plan_tensors(plan)}
    searched_payload = int(sum(a.nbytes for k, a in tensors.items() if k.rpartition(".")[0] in searched_paths))
    import nasq

    nasq_version = getattr(nasq, "__version__", "0+unknown")
    manifest: dict[str, Any] = {
        "format": FORMAT, "version": VERSION, "nasq_version": nasq_version,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "task": task, "num_labels": int(num_labels), "quant_mode": plan.get("quant_mode", "symmetric"),
        "files": {n: {"bytes": len(d), "sha256": _sha256(d)} for n, d in files.items()},
        "tensor_bytes": tensor_bytes, "predicted_bytes": int(predicted),
        "payload_vs_predicted": tensor_bytes / predicted if predicted else None,
        "searched_tensor_bytes": searched_payload, "searched_predicted_bytes": searched_bytes(plan),
    }
    manifest["manifest_sha256"] = _manifest_digest(manifest)
    for name, data in files.items():
        write_atomic(out / name, data)
    write_atomic(out / MANIFEST, json.dumps(manifest, indent=2))  # last: its presence marks a complete export
    return out


def export_artifact(model_dir_or_run: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    """Export a finished QAT run (or its ``model/`` dir) to the artifact directory ``out``."""
    from nasq.train.common import MODEL_META, load_model_dir

    src = Path(model_dir_or_run)
    if (src / "model" / MODEL_META).is_file():
        src = src / "model"
    if not (src / "plan.json").is_file():
        raise NasqError(f"{src}: no plan.json; export needs a quantized (QAT) run, e.g. `nasq finetune --plan ...`")
    out = Path(out)
    if out.exists() and not overwrite:
        raise NasqError(f"{out} already exists; pass --overwrite to replace it")
    model, meta = load_model_dir(src)
    plan = json.loads((src / "plan.json").read_text())
    return export_model(model, plan, out, task=meta.get("task", ""), num_labels=int(meta["num_labels"]),
                        source_dir=src, overwrite=overwrite)


# --------------------------------------------------------------------------------------------------- load
def _corrupt(path: Path, what: str) -> NasqError:
    return NasqError(f"{path}: {what}; the artifact is corrupt or incomplete: re-export it with `nasq export`")


def read_manifest(path: str | Path) -> dict:
    """Parse and validate ``manifest.json`` (format, version, self checksum)."""
    path = Path(path)
    mpath = path / MANIFEST
    if not path.is_dir():
        raise NasqError(f"{path}: not a nasq artifact directory (export one with `nasq export RUN --out FILE`)")
    if not mpath.is_file():
        raise _corrupt(mpath, "missing (the export did not finish or this is not an artifact)")
    try:
        manifest = json.loads(mpath.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _corrupt(mpath, f"not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise _corrupt(mpath, f"format is {manifest.get('format') if isinstance(manifest, dict) else None!r}, "
                              f"expected {FORMAT!r}")
    if manifest.get("version") != VERSION:
        raise NasqError(f"{mpath}: artifact format version {manifest.get('version')} unsupported, this nasq reads "
                        f"{VERSION}; re-export the run with this nasq version")
    if manifest.get("manifest_sha256") != _manifest_digest(manifest):
        raise _corrupt(mpath, "checksum mismatch")
    files = manifest.get("files")
    if not isinstance(files, dict) or not {TENSORS, LAYOUT, "config.json"} <= set(files):
        raise _corrupt(mpath, f"'files' must list {TENSORS}, {LAYOUT} and config.json")
    return manifest


def verify_files(path: str | Path, manifest: dict) -> dict[str, bytes]:
    """Read every file the manifest lists; check size and sha256. Returns ``{name: bytes}``."""
    path = Path(path)
    data = {}
    for name, info in manifest["files"].items():
        if "/" in name or "\\" in name or name.startswith("."):
            raise _corrupt(path / MANIFEST, f"file name {name!r} is not a plain file name")
        f = path / name
        if not f.is_file():
            raise _corrupt(f, "missing")
        d = f.read_bytes()
        if len(d) != info.get("bytes"):
            raise _corrupt(f, f"has {len(d)} bytes, the manifest says {info.get('bytes')} (truncated?)")
        if _sha256(d) != info.get("sha256"):
            raise _corrupt(f, "sha256 mismatch (bytes changed since export)")
        data[name] = d
    return data


def _expect(t: dict, name: str, shape: tuple, dtype, path: Path) -> np.ndarray:
    a = t[name]
    if a.shape != tuple(shape) or a.dtype != np.dtype(dtype):
        raise _corrupt(path, f"tensor {name} has shape {a.shape} {a.dtype}, expected {tuple(shape)} "
                             f"{np.dtype(dtype)}")
    return a


def _expected_names(p: str, spec: dict) -> list[str]:
    kind = spec["kind"]
    if kind in ("qlinear", "qembedding"):
        bits = unrle(spec["bits"])
        names = [f"{p}.seg{b}" for b in sorted({b for b in bits if b > 0})]
        if names:
            names.append(f"{p}.scale")
            if spec.get("has_bias"):
                names.append(f"{p}.bias")
        return names
    if kind in ("linear", "layernorm"):
        return [f"{p}.weight", f"{p}.bias"]
    if kind == "embedding":
        return [f"{p}.weight"]
    raise NasqError(f"layout: unknown module kind {kind!r} for {p}")


def _packed(t: dict, p: str, spec: dict, fpath: Path) -> PackedLinear:
    rows, cols = int(spec["rows"]), int(spec["cols"])
    sizes, bits = unrle(spec["group_sizes"]), unrle(spec["bits"])
    if len(sizes) != len(bits) or sum(sizes) != rows or any(s <= 0 for s in sizes) or any(
            not 0 <= b <= 8 for b in bits):
        raise _corrupt(fpath, f"layout of {p} is inconsistent")
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int)
    segments, kept_sizes, out_index = [], [], []
    for b in sorted({b for b in bits if b > 0}):
        sel = [g for g, gb in enumerate(bits) if gb == b]
        n = sum(sizes[g] for g in sel)
        segments.append((b, jnp.asarray(_expect(t, f"{p}.seg{b}", (n, packed_row_bytes(cols, b)), np.uint8, fpath))))
        kept_sizes += [sizes[g] for g in sel]
        out_index += [np.arange(starts[g], starts[g] + sizes[g]) for g in sel]
    k = sum(kept_sizes)
    scale = _expect(t, f"{p}.scale", (len(kept_sizes),), np.float32, fpath) if segments else np.zeros(0, np.float32)
    bias = None
    if spec.get("has_bias"):
        bias = _expect(t, f"{p}.bias", (k,), np.float32, fpath) if segments else np.zeros(0, np.float32)
        bias = jnp.asarray(bias)
    return PackedLinear(
        segments=tuple(segments), group_scale=jnp.asarray(scale), bias=bias,
        out_index=jnp.asarray(np.concatenate(out_index).astype(np.int32) if out_index else np.zeros(0, np.int32)),
        kept_group_sizes=tuple(kept_sizes), in_features=cols, out_features=rows,
    )


def load_artifact(path: str | Path, *, unpack: str = "fused") -> IntBert:
    """Validate and load an artifact as an ``IntBert`` (``unpack="fused"`` | ``"load"``, see ``int_bert``)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    from nasq.models.bert import BertConfig

    path = Path(path)
    manifest = read_manifest(path)
    data = verify_files(path, manifest)
    fpath = path / TENSORS
    try:
        t = load(data[TENSORS])
    except (SafetensorError, ValueError, TypeError, OSError) as e:  # header / layout problems of an unexpected file (checksums passed)
        raise _corrupt(fpath, f"unreadable safetensors ({type(e).__name__}: {e})") from None
    try:
        layout = json.loads(data[LAYOUT])["modules"]
        cfg = BertConfig.from_dict(json.loads(data["config.json"]), source=str(path / "config.json"))
    except (KeyError, TypeError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _corrupt(path / LAYOUT, f"unreadable ({type(e).__name__}: {e})") from None
    expected = [n for p, spec in layout.items() for n in _expected_names(p, spec)]
    missing = [n for n in expected if n not in t]
    if missing:
        raise _corrupt(fpath, f"missing {len(missing)} tensors: {', '.join(missing[:8])}"
                              + (" ..." if len(missing) > 8 else ""))
    extra = sorted(set(t) - set(expected))
    if extra:
        raise _corrupt(fpath, f"unexpected tensors {extra[:8]}")

    def spec(p):
        if p not in layout:
            raise _corrupt(path / LAYOUT, f"no entry for module {p}")
        return layout[p]

    def linear(p):
        s = spec(p)
        if s["kind"] == "qlinear":
            return _packed(t, p, s, fpath)
        if s["kind"] != "linear":
            raise _corrupt(path / LAYOUT, f"{p} has kind {s['kind']!r}, expected a linear")
        w = _expect(t, f"{p}.weight", (s["rows"], s["cols"]), np.float32, fpath)
        b = _expect(t, f"{p}.bias", (s["rows"],), np.float32, fpath)
        return Fp32Linear(jnp.asarray(np.ascontiguousarray(w.T)), jnp.asarray(b))

    def embedding(p, rows):
        s = spec(p)
        if s["kind"] == "qembedding":
            e = unpack_embedding(_packed(t, p, s, fpath))
            if e.codes.shape != (rows, cfg.hidden_size):
                raise _corrupt(fpath, f"{p} has shape {e.codes.shape}, config says {(rows, cfg.hidden_size)}")
            return e
        if s["kind"] != "embedding":
            raise _corrupt(path / LAYOUT, f"{p} has kind {s['kind']!r}, expected an embedding")
        return jnp.asarray(_expect(t, f"{p}.weight", (rows, cfg.hidden_size), np.float32, fpath))

    def ln(p):
        spec(p)
        h = (cfg.hidden_size,)
        return (jnp.asarray(_expect(t, f"{p}.weight", h, np.float32, fpath)),
                jnp.asarray(_expect(t, f"{p}.bias", h, np.float32, fpath)))

    params: dict[str, Any] = {
        "embeddings": {
            "word": embedding("embeddings.word_embeddings", cfg.vocab_size),
            "position": embedding("embeddings.position_embeddings", cfg.max_position_embeddings),
            "type": embedding("embeddings.token_type_embeddings", cfg.type_vocab_size),
            "ln": ln("embeddings.LayerNorm"),
        },
        "layers": [],
    }
    active = []
    nh, hd = cfg.num_attention_heads, cfg.head_dim
    for i in range(cfg.num_hidden_layers):
        p = f"encoder.layer.{i}."
        lp = {"query": linear(p + "attention.self.query"), "key": linear(p + "attention.self.key"),
              "value": linear(p + "attention.self.value"), "attn_out": linear(p + "attention.output.dense"),
              "attn_ln": ln(p + "attention.output.LayerNorm"), "inter": linear(p + "intermediate.dense"),
              "out": linear(p + "output.dense"), "out_ln": ln(p + "output.LayerNorm")}
        v = lp["value"]
        if isinstance(v, PackedLinear):
            kept = np.zeros(v.out_features, bool)
            kept[np.asarray(v.out_index)] = True
            heads = tuple(h for h in range(nh) if kept[h * hd:(h + 1) * hd].any())
        else:
            heads = tuple(range(nh))
        active.append(heads)
        params["layers"].append(lp)
    params["pooler"] = linear("pooler.dense")
    params["classifier"] = linear("classifier")
    num_labels = int(spec("classifier")["rows"])
    if num_labels != manifest.get("num_labels"):
        raise _corrupt(path / MANIFEST, f"num_labels {manifest.get('num_labels')} but the classifier has {num_labels}")
    meta = IntBertMeta(config=cfg, num_labels=num_labels, active_heads=tuple(active), unpack=unpack)
    return IntBert(meta, params, manifest)


# ------------------------------------------------------------------------------------- eval / predict / bench
def _artifact_task(path: Path, manifest: dict, override: str | None):
    from nasq.data.glue import get_task

    name = override or manifest.get("task")
    if not name:
        raise NasqError(f"{path}: the manifest names no task; pass --task")
    return get_task(name)


def predict_logits(model: IntBert, encoded, batch_size: int, buckets) -> np.ndarray:
    """Integer-path logits `[N, num_labels]` in the order of `encoded`."""
    from nasq.train.common import collect_logits

    return collect_logits(lambda b: model(b.input_ids, b.token_type_ids, b.attention_mask), encoded, batch_size,
                          buckets)


def evaluate_artifact(path: str | Path, cfg) -> dict:
    """Dev-set metrics of the integer model: ``{task, dev_rows, wall_s, <metrics>}``.

    The task is ``cfg.data.task`` when it was set explicitly, else the manifest's.
    """
    from nasq.data.batching import buckets_for, encode
    from nasq.data.glue import load_split
    from nasq.models.loading import load_tokenizer

    path = Path(path)
    model = load_artifact(path)
    override = cfg.data.task if "task" in cfg.data.model_fields_set else None
    task = _artifact_task(path, model.manifest, override)
    if task.num_labels != model.num_labels:
        raise NasqError(f"task {task.name} has {task.num_labels} labels but the artifact's classifier has "
                        f"{model.num_labels}; pass the task it was trained on ({model.manifest.get('task')})")
    tok = load_tokenizer(path)
    dev = encode(load_split(task, "dev", cfg.data.data_dir), tok, task, cfg.model.max_len)
    t0 = time.perf_counter()
    logits = predict_logits(model, dev, cfg.data.eval_batch_size, buckets_for(cfg.model.max_len, cfg.data.buckets))
    wall = time.perf_counter() - t0
    from nasq.train.common import metrics_from_logits

    return {"task": task.name, "dev_rows": len(dev), "wall_s": round(wall, 3),
            **metrics_from_logits(task, logits, dev.labels)}


def predict_texts(path: str | Path, texts: list[str], text_pairs: list[str] | None = None, *,
                  max_len: int = 128) -> list[dict]:
    """Classify raw texts: one ``{"label", "scores"}`` per text (softmax scores; regression: the value)."""
    from nasq.data.glue import get_task
    from nasq.models.loading import load_tokenizer

    path = Path(path)
    model = load_artifact(path)
    if text_pairs is not None and len(text_pairs) != len(texts):
        raise NasqError(f"{len(texts)} texts but {len(text_pairs)} pair texts; give one --pair per text")
    tok = load_tokenizer(path)
    max_len = min(max_len, model.config.max_position_embeddings)
    enc = tok(list(texts), text_pairs, truncation=True, max_length=max_len, padding="longest",
              return_token_type_ids=True, return_attention_mask=True)
    ids = np.asarray(enc["input_ids"], np.int32)
    tt = np.asarray(enc.get("token_type_ids", np.zeros_like(ids)), np.int32)
    logits = np.asarray(model(ids, tt, np.asarray(enc["attention_mask"], np.int32)))
    try:
        spec = get_task(model.manifest.get("task") or "")
    except NasqError:
        spec = None
    names = spec.label_names if spec is not None else None
    if model.num_labels == 1:
        return [{"label": float(z[0]), "scores": [float(z[0])]} for z in logits]
    probs = np.asarray(jax.nn.softmax(jnp.asarray(logits), axis=-1))
    return [{"label": names[int(p.argmax())] if names else int(p.argmax()), "scores": [float(v) for v in p]}
            for p in probs]


def dequantized_fp32_model(model):
    """A plain fp32 BERT holding the (dequantized) weights of a fixed-plan model (for timing references)."""
    from flax import nnx

    from nasq.models.bert import Embedding, Linear
    from nasq.models.surgery import replace_modules
    from nasq.quant.layers import QuantEmbedding, QuantLinear

    def fn(_, m):
        if isinstance(m, QuantLinear):
            new = Linear(m.in_features, m.out_features, rngs=nnx.Rngs(0))
            new.kernel = nnx.Param(jnp.asarray(m.quantized_weight()).T)
            new.bias = nnx.Param(m.bias[...] * jnp.asarray(m.rows_bits() > 0, jnp.float32))
            return new
        if isinstance(m, QuantEmbedding):
            new = Embedding(m.num_embeddings, m.features, rngs=nnx.Rngs(0))
            new.embedding = nnx.Param(jnp.asarray(m.quantized_weight()))
            return new
        return None

    return replace_modules(model, fn)


def bench_infer(artifact_path: str | Path, fp32_model_dir_or_run: str | Path, batch: int, seq: int,
                repeats: int = 10, seed: int = 0) -> dict:
    """Median ms of the integer model (both unpack modes) vs the jitted fp32 forward, one process.

    The fp32 reference is the model at ``fp32_model_dir_or_run`` (a QAT run's weights are dequantized into
    plain fp32 ``Linear``/``Embedding``). Returns ``{int_fused_ms, int_load_ms, fp32_ms, ratio_fused,
    ratio_load, batch, seq, repeats}`` with ``ratio = int_ms / fp32_ms`` (< 1: int path faster).
    """
    from flax import nnx

    from nasq.train.common import load_model_dir

    rng = np.random.default_rng(seed)
    fp_model, _ = load_model_dir(fp32_model_dir_or_run)
    fp_model = dequantized_fp32_model(fp_model)
    vocab = fp_model.config.vocab_size
    ids = jnp.asarray(rng.integers(1000, min(vocab, 30000), (batch, seq)), jnp.int32)
    tt = jnp.zeros_like(ids)
    am = jnp.ones_like(ids)
    from nasq.bench import time_interleaved

    res: dict[str, Any] = {"batch": batch, "seq": seq, "repeats": repeats}
    fns = {}
    for mode in ("fused", "load"):
        m = load_artifact(artifact_path, unpack=mode)
        fns[f"int_{mode}_ms"] = lambda m=m: m(ids, tt, am)
    graphdef, state = nnx.split(fp_model)
    fwd = jax.jit(lambda s, a, b, c: nnx.merge(graphdef, s)(a, b, c))
    fns["fp32_ms"] = lambda: fwd(state, ids, tt, am)
    # medians of calls interleaved round-robin, so machine noise hits every variant alike
    res.update({k: 1e3 * v for k, v in time_interleaved(fns, repeats).items()})
    for mode in ("fused", "load"):
        res[f"ratio_{mode}"] = res[f"int_{mode}_ms"] / res["fp32_ms"]
    return res
