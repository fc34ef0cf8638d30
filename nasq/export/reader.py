"""Read a ``model.nasq`` artifact: verify it, load it as an integer model (``IntBert``), evaluate it, predict.

Nothing is unpickled: tensors are read with ``safetensors.numpy`` and metadata with ``json``; every file's size
and sha256 are checked against the manifest before anything is parsed, and the manifest carries a sha256 of
its own canonical JSON (format: ``docs/ARTIFACT_FORMAT.md``, writer: :mod:`nasq.export.writer`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nasq.config import Config
from nasq.contract.model_dir import load_model_dir, model_dir_of
from nasq.data.batching import buckets_for, encode
from nasq.data.glue import get_task, load_split
from nasq.data.tasks import TaskData, load_task_data
from nasq.errors import NasqError
from nasq.evaluation import compare_logits, metrics_from_logits, predict_logits
from nasq.export.format import FORMAT, LAYOUT, MANIFEST, TENSORS, VERSION, manifest_digest, sha256, unrle
from nasq.kernels.int_bert import Fp32Linear, IntBert, IntBertMeta
from nasq.kernels.int_linear import PackedLinear, packed_linear, unpack_embedding
from nasq.models.bert import BertConfig
from nasq.models.loading import load_tokenizer

__all__ = ["compare_with_run", "evaluate_artifact", "load_artifact", "predict_texts", "read_manifest",
           "verify_files"]


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
    if manifest.get("manifest_sha256") != manifest_digest(manifest):
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
        if sha256(d) != info.get("sha256"):
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
    return packed_linear(lambda name, shape, dtype: _expect(t, f"{p}.{name}", shape, dtype, fpath), sizes, bits,
                         cols, has_bias=bool(spec.get("has_bias")))


def load_artifact(path: str | Path, *, unpack: str = "fused") -> IntBert:
    """Validate and load an artifact as an ``IntBert`` (``unpack="fused"`` | ``"load"``, see ``int_bert``)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

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


def _artifact_task(path: Path, manifest: dict, override: str | None):
    name = override or manifest.get("task")
    if not name:
        raise NasqError(f"{path}: the manifest names no task; pass --task")
    return get_task(name)


def evaluate_artifact(path: str | Path, cfg) -> dict:
    """Dev-set metrics of the integer model: ``{task, dev_rows, wall_s, <metrics>}``.

    The task is ``cfg.data.task`` when it was set explicitly, else the manifest's.
    """
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
    return {"task": task.name, "dev_rows": len(dev), "wall_s": round(wall, 3),
            **metrics_from_logits(task, logits, dev.labels)}


def predict_texts(path: str | Path, texts: list[str], text_pairs: list[str] | None = None, *,
                  max_len: int = 128) -> list[dict]:
    """Classify raw texts: one ``{"label", "scores"}`` per text (softmax scores; regression: the value)."""
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


def compare_with_run(run: str | Path, artifact: str | Path, cfg: Config, data: TaskData | None = None) -> dict:
    """Dev metrics of the run's model (fake-quant) and of the artifact (int kernels), and their agreement.

    `data` (a `TaskData`) skips reading and tokenizing the task again when the caller has it."""
    data = data or load_task_data(cfg, model_dir=model_dir_of(run))
    model, _ = load_model_dir(run)
    t0 = time.time()
    fq = predict_logits(model, data.dev, cfg.data.eval_batch_size, data.buckets)
    t_fq = time.time() - t0
    int_model = load_artifact(artifact)
    t0 = time.time()
    il = predict_logits(int_model, data.dev, cfg.data.eval_batch_size, data.buckets)
    t_int = time.time() - t0
    return {"task": data.task.name, "dev_rows": len(data.dev), **compare_logits(data.task, fq, il, data.dev.labels),
            "eval_wall_s": {"fake_quant": round(t_fq, 2), "int_artifact": round(t_int, 2)}}
