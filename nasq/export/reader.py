"""Read a ``model.nasq`` artifact: verify it, load it as an integer model (``IntBert``), evaluate it, predict.

Nothing is unpickled: tensors are read with ``safetensors.numpy`` and metadata with ``json``; every file's size
and sha256 are checked against the manifest before anything is parsed, and the manifest carries a sha256 of
its own canonical JSON (format: ``docs/ARTIFACT_FORMAT.md``, writer: :mod:`nasq.export.writer`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)

from nasq.config import Config
from nasq.contract.model_dir import MAX_LABELS, load_model_dir, model_dir_of
from nasq.contract.plan import Plan
from nasq.data.batching import buckets_for, encode
from nasq.data.glue import get_task, load_split
from nasq.data.tasks import TaskData, load_task_data
from nasq.errors import NasqError, validation_problems
from nasq.evaluation import compare_logits, metrics_from_logits, predict_logits
from nasq.export.format import (
    FORMAT,
    LAYOUT,
    MANIFEST,
    READABLE_VERSIONS,
    TENSORS,
    manifest_digest,
    sha256,
    unrle,
)
from nasq.io import load_safetensors, parse_json, read_bytes, read_json
from nasq.kernels.int_bert import Fp32Linear, IntBert, IntBertMeta
from nasq.kernels.int_linear import PackedLinear, packed_linear, unpack_embedding
from nasq.kernels.native import describe as describe_kernel
from nasq.models.bert import BertConfig
from nasq.models.loading import load_tokenizer
from nasq.quant.packing import V1_REPACKED_WIDTHS

__all__ = ["compare_with_run", "evaluate_artifact", "load_artifact", "predict_texts", "read_artifact_plan",
           "read_manifest", "verify_files"]


MAX_MANIFEST_BYTES = 2**24  # 16 MiB

_REEXPORT = "the artifact is corrupt or incomplete: re-export it with `nasq export`"


def _corrupt(path: Path, what: str) -> NasqError:
    return NasqError(f"{path}: {what}; {_REEXPORT}")


def _corrupt_read(e: NasqError) -> NasqError:
    """A read-layer error (which names the file) as a corrupt-artifact error."""
    return NasqError(f"{e}; {_REEXPORT}")


class _FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    bytes: StrictInt = Field(ge=0)
    sha256: StrictStr = Field(pattern=r"^[0-9a-f]{64}$")


def read_manifest(path: str | Path) -> dict:
    """Parse and validate ``manifest.json`` (format, version, self checksum, file entries, num_labels)."""
    path = Path(path)
    mpath = path / MANIFEST
    if not path.is_dir():
        raise NasqError(f"{path}: not a nasq artifact directory (export one with `nasq export RUN --out FILE`)")
    if not mpath.exists() and not mpath.is_symlink():
        raise _corrupt(mpath, "missing (the export did not finish or this is not an artifact)")
    try:
        manifest = read_json(mpath, what="artifact manifest", max_bytes=MAX_MANIFEST_BYTES, root=path)
    except NasqError as e:
        raise _corrupt_read(e) from None
    if manifest.get("format") != FORMAT:
        raise _corrupt(mpath, f"format is {manifest.get('format')!r}, expected {FORMAT!r}")
    version = manifest.get("version")
    if type(version) is not int or version not in READABLE_VERSIONS:  # not True / 2.0
        raise NasqError(f"{mpath}: artifact format version {version!r} unsupported, this nasq reads "
                        f"{' and '.join(map(str, READABLE_VERSIONS))}; re-export the run with this nasq version "
                        "(`nasq export RUN --out DIR`)")
    if manifest.get("manifest_sha256") != manifest_digest(manifest):
        raise _corrupt(mpath, "checksum mismatch")
    files = manifest.get("files")
    if not isinstance(files, dict) or not {TENSORS, LAYOUT, "config.json"} <= set(files):
        raise _corrupt(mpath, f"'files' must list {TENSORS}, {LAYOUT} and config.json")
    for name, info in files.items():
        if not isinstance(name, str) or "/" in name or "\\" in name or name.startswith(".") or name == MANIFEST:
            raise _corrupt(mpath, f"file name {name!r} is not a plain file name")
        try:
            _FileEntry.model_validate(info)
        except ValidationError as e:
            raise _corrupt(mpath, f"files.{name}: {'; '.join(validation_problems(e))}") from None
    n = manifest.get("num_labels")
    if type(n) is not int or not 1 <= n <= MAX_LABELS:
        raise _corrupt(mpath, f"num_labels must be an integer in 1..{MAX_LABELS}, got {n!r}")
    return manifest


MAX_FILE_BYTES = 2**26  # every listed file but the tensors (metadata, tokenizer): 64 MiB


def verify_files(path: str | Path, manifest: dict, names=None, *, max_bytes: int = MAX_FILE_BYTES) -> dict[str, bytes]:
    """Read the files ``names`` (default: every file) the manifest lists, each checked before it is read (a plain
    file inside the artifact, exactly its declared size, at most ``max_bytes``) and after (sha256).
    Returns ``{name: bytes}``; nothing else is read."""
    path = Path(path)
    data = {}
    for name in manifest["files"] if names is None else names:
        info = manifest["files"][name]
        if info["bytes"] > max_bytes:
            raise _corrupt(path / MANIFEST, f"declares {info['bytes']:,} bytes for {name}, more than the "
                                            f"{max_bytes:,} an artifact of this model can have")
        f = path / name
        if not f.exists() and not f.is_symlink():
            raise _corrupt(f, "missing")
        try:
            d = read_bytes(f, what="artifact file", max_bytes=info["bytes"], size=info["bytes"], root=path)
        except NasqError as e:
            raise _corrupt_read(e) from None
        if sha256(d) != info["sha256"]:
            raise _corrupt(f, "sha256 mismatch (bytes changed since export)")
        data[name] = d
    return data


def read_artifact_plan(path: str | Path) -> tuple[dict, Plan]:
    """The manifest and the plan of an artifact, ``plan.json`` checked against the manifest before it is parsed
    (for inspection: the tensors are not read)."""
    path = Path(path)
    manifest = read_manifest(path)
    if "plan.json" not in manifest["files"]:
        raise _corrupt(path / MANIFEST, "lists no plan.json")
    f = path / "plan.json"
    data = verify_files(path, manifest, ["plan.json"])["plan.json"]
    return manifest, Plan.from_dict(parse_json(data, str(f)), str(f))


# --------------------------------------------------------------------------------------------- layout.json
_MAX_DIM = 2**24
Dim = Annotated[StrictInt, Field(ge=1, le=_MAX_DIM)]
Runs = list[tuple[Annotated[StrictInt, Field(ge=0, le=_MAX_DIM)], Annotated[StrictInt, Field(ge=1, le=_MAX_DIM)]]]


class _Quantized(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["qlinear", "qembedding"]
    rows: Dim
    cols: Dim
    has_bias: StrictBool
    mode: Literal["symmetric", "signed"]
    group_sizes: Runs = Field(min_length=1)
    bits: Runs = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self):
        # run lengths are summed before anything is expanded: a run of 10^12 never allocates
        if sum(n * v for v, n in self.group_sizes) != self.rows:
            raise ValueError(f"group sizes sum to {sum(n * v for v, n in self.group_sizes)}, rows is {self.rows}")
        if any(v < 1 for v, _ in self.group_sizes):
            raise ValueError("group sizes must be >= 1")
        if sum(n for _, n in self.group_sizes) != sum(n for _, n in self.bits):
            raise ValueError("one bit width per group is needed")
        if any(v > 8 for v, _ in self.bits):
            raise ValueError("bit widths must be in 0..8")
        if self.kind == "qembedding" and self.has_bias:
            raise ValueError("embeddings have no bias")
        return self


class _Linear(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["linear"]
    rows: Dim
    cols: Dim
    has_bias: Literal[True]


class _Embedding(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["embedding"]
    rows: Dim
    cols: Dim


class _LayerNorm(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["layernorm"]
    features: Dim
    eps: float = Field(gt=0, lt=1, allow_inf_nan=False)


_Module = Annotated[_Quantized | _Linear | _Embedding | _LayerNorm, Field(discriminator="kind")]


class _Layout(BaseModel):
    model_config = ConfigDict(extra="forbid")
    modules: dict[str, _Module]


def _read_layout(data: bytes, lpath: Path, dims: dict, num_layers: int) -> dict:
    """The validated layout: typed modules, exactly the modules of ``dims`` (``BertConfig.module_dims``), each
    with those dims."""
    try:
        layout = _Layout.model_validate(parse_json(data, str(lpath))).modules
    except ValidationError as e:
        raise _corrupt(lpath, "; ".join(validation_problems(e)[:6])) from None
    except NasqError as e:
        raise _corrupt_read(e) from None
    if set(layout) != set(dims):
        odd = sorted(set(layout) ^ set(dims))[:6]
        raise _corrupt(lpath, f"modules do not match config.json ({num_layers} layers): {odd}")
    family = {"qlinear": "linear", "linear": "linear", "qembedding": "embedding", "embedding": "embedding",
              "layernorm": "layernorm"}
    for p, spec in layout.items():
        fam, rows, cols = dims[p]
        got = (spec.features, spec.features) if spec.kind == "layernorm" else (spec.rows, spec.cols)
        if family[spec.kind] != fam or got != (rows, cols):
            raise _corrupt(lpath, f"{p} is a {spec.kind} of {got[0]}x{got[1]}, config.json implies a {fam} of "
                                  f"{rows}x{cols}")
    return layout


def _check_v1_widths(layout: dict, mpath: Path) -> None:
    """A version-1 artifact is read only if no row uses a width whose packing changed in version 2."""
    for p, spec in layout.items():
        if spec.kind in ("qlinear", "qembedding"):
            old = sorted({b for b, _ in spec.bits if b in V1_REPACKED_WIDTHS})
            if old:
                raise NasqError(
                    f"{mpath}: artifact format version 1 stored 3-bit codes in 4-bit and 5..7-bit codes in 8-bit "
                    f"containers, and {p} has {'/'.join(map(str, old))}-bit rows; this nasq packs every width "
                    "densely and reads only version-1 artifacts whose rows use 0, 1, 2, 4 or 8 bits. Re-export "
                    "the run with this nasq (`nasq export RUN --out DIR`)")


def _expect(t: dict, name: str, shape: tuple, dtype, path: Path) -> np.ndarray:
    a = t[name]
    if a.shape != tuple(shape) or a.dtype != np.dtype(dtype):
        raise _corrupt(path, f"tensor {name} has shape {a.shape} {a.dtype}, expected {tuple(shape)} "
                             f"{np.dtype(dtype)}")
    return a


def _expected_names(p: str, spec) -> list[str]:
    if spec.kind in ("qlinear", "qembedding"):
        names = [f"{p}.seg{b}" for b in sorted({v for v, _ in spec.bits if v > 0})]
        if names:
            names.append(f"{p}.scale")
            if spec.has_bias:
                names.append(f"{p}.bias")
        return names
    if spec.kind in ("linear", "layernorm"):
        return [f"{p}.weight", f"{p}.bias"]
    return [f"{p}.weight"]


def _packed(t: dict, p: str, spec: _Quantized, fpath: Path) -> PackedLinear:
    return packed_linear(lambda name, shape, dtype: _expect(t, f"{p}.{name}", shape, dtype, fpath),
                         unrle(spec.group_sizes), unrle(spec.bits), spec.cols, has_bias=spec.has_bias)


def _int_params(t: dict, layout: dict, cfg: BertConfig, fpath: Path) -> tuple[dict, tuple]:
    """The ``IntBert`` parameter pytree of validated tensors ``t`` and the heads each layer keeps."""

    def linear(p):
        s = layout[p]
        if s.kind == "qlinear":
            return _packed(t, p, s, fpath)
        w = _expect(t, f"{p}.weight", (s.rows, s.cols), np.float32, fpath)
        b = _expect(t, f"{p}.bias", (s.rows,), np.float32, fpath)
        return Fp32Linear(jnp.asarray(np.ascontiguousarray(w.T)), jnp.asarray(b))

    def embedding(p):
        s = layout[p]
        if s.kind == "qembedding":
            return unpack_embedding(_packed(t, p, s, fpath))
        return jnp.asarray(_expect(t, f"{p}.weight", (s.rows, s.cols), np.float32, fpath))

    def ln(p):
        h = (cfg.hidden_size,)
        return (jnp.asarray(_expect(t, f"{p}.weight", h, np.float32, fpath)),
                jnp.asarray(_expect(t, f"{p}.bias", h, np.float32, fpath)))

    params: dict[str, Any] = {
        "embeddings": {
            "word": embedding("embeddings.word_embeddings"),
            "position": embedding("embeddings.position_embeddings"),
            "type": embedding("embeddings.token_type_embeddings"),
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
    return params, tuple(active)


def load_artifact(path: str | Path, *, unpack: str = "auto") -> IntBert:
    """Validate and load an artifact as an ``IntBert`` (``unpack="auto"`` | ``"fused"`` | ``"load"`` |
    ``"panels"``, see ``int_bert``).

    Everything is checked before it is used: the manifest and every file's size before reading and sha256
    after; config.json's bounds; layout.json's schema, its counts (summed before anything is expanded) and that
    every module has the dims config.json implies; each tensor's name, shape and dtype; finite values. Memory:
    each file is read once, so loading takes a small multiple of the artifact's declared size."""
    path = Path(path)
    manifest = read_manifest(path)
    small = verify_files(path, manifest, [n for n in manifest["files"] if n != TENSORS])
    fpath = path / TENSORS
    cpath = path / "config.json"
    try:
        cfg = BertConfig.from_dict(parse_json(small["config.json"], str(cpath)), source=str(cpath))
    except NasqError as e:
        raise _corrupt_read(e) from None
    dims = cfg.module_dims(manifest["num_labels"])
    layout = _read_layout(small[LAYOUT], path / LAYOUT, dims, cfg.num_hidden_layers)
    if manifest["version"] == 1:
        _check_v1_widths(layout, path / MANIFEST)
    # the tensors can be no larger than every module in fp32 (+ the safetensors header), and the model they
    # describe no more than 64x larger than them (int8 codes of a heavily pruned 1-bit model): before reading
    limit = 2**20 + sum(4 * r * (c + 1) + 256 for _, r, c in dims.values())
    weights = cfg.num_weights(manifest["num_labels"])
    if weights > 64 * manifest["files"][TENSORS]["bytes"] + 2**26:
        raise _corrupt(path / "config.json", f"describes {weights:,} weights, far more than the "
                                              f"{manifest['files'][TENSORS]['bytes']:,} bytes of {TENSORS} can hold")
    try:  # checksums passed: an unreadable header or a NaN is a crafted (or a buggy writer's) file
        t = load_safetensors(verify_files(path, manifest, [TENSORS], max_bytes=limit)[TENSORS], fpath)
    except NasqError as e:
        raise _corrupt_read(e) from None
    expected = [n for p, spec in layout.items() for n in _expected_names(p, spec)]
    missing = [n for n in expected if n not in t]
    if missing:
        raise _corrupt(fpath, f"missing {len(missing)} tensors: {', '.join(missing[:8])}"
                              + (" ..." if len(missing) > 8 else ""))
    extra = sorted(set(t) - set(expected))
    if extra:
        raise _corrupt(fpath, f"unexpected tensors {extra[:8]}")
    params, active = _int_params(t, layout, cfg, fpath)
    meta = IntBertMeta(config=cfg, num_labels=manifest["num_labels"], active_heads=active, unpack=unpack)
    return IntBert(meta, params, manifest)


def _artifact_task(path: Path, manifest: dict, override: str | None):
    name = override or manifest.get("task")
    if not name:
        raise NasqError(f"{path}: the manifest names no task; pass --task")
    return get_task(name)


def evaluate_artifact(path: str | Path, cfg) -> dict:
    """Dev-set metrics of the integer model: ``{task, dev_rows, wall_s, kernel, <metrics>}`` (``kernel``: which
    integer GEMM ran, ``nasq.kernels.native.describe()``).

    The task is ``cfg.data.task`` when it was set explicitly, else the manifest's.
    """
    path = Path(path)
    return evaluate_with(load_artifact(path), load_tokenizer(path), cfg, source=path)


def artifact_dev_set(model: IntBert, tok, cfg, *, source: str | Path):
    """``(task, encoded dev split, buckets)`` an artifact is evaluated on: ``cfg.data.task`` when it was set
    explicitly, else the manifest's; its label count must match the classifier's."""
    path = Path(source)
    override = cfg.data.task if "task" in cfg.data.model_fields_set else None
    task = _artifact_task(path, model.manifest, override)
    if task.num_labels != model.num_labels:
        raise NasqError(f"task {task.name} has {task.num_labels} labels but the artifact's classifier has "
                        f"{model.num_labels}; pass the task it was trained on ({model.manifest.get('task')})")
    dev = encode(load_split(task, "dev", cfg.data.data_dir), tok, task, cfg.model.max_len)
    return task, dev, buckets_for(cfg.model.max_len, cfg.data.buckets)


def evaluate_with(model: IntBert, tok, cfg, *, source: str | Path) -> dict:
    """:func:`evaluate_artifact` with an already loaded model and tokenizer (``nasq.api.Model.evaluate``)."""
    task, dev, buckets = artifact_dev_set(model, tok, cfg, source=source)
    t0 = time.perf_counter()
    logits = predict_logits(model, dev, cfg.data.eval_batch_size, buckets)
    wall = time.perf_counter() - t0
    return {"task": task.name, "dev_rows": len(dev), "wall_s": round(wall, 3), "kernel": describe_kernel(),
            **metrics_from_logits(task, logits, dev.labels)}


def predict_texts(path: str | Path, texts: list[str], text_pairs: list[str] | None = None, *,
                  max_len: int = 128) -> list[dict]:
    """Classify raw texts: one ``{"label", "scores"}`` per text (softmax scores; regression: the value)."""
    path = Path(path)
    return predict_with(load_artifact(path), load_tokenizer(path), texts, text_pairs, max_len=max_len, source=path)


def predict_with(model: IntBert, tok, texts: list[str], text_pairs: list[str] | None = None, *, max_len: int = 128,
                 source: str | Path = "the artifact") -> list[dict]:
    """:func:`predict_texts` with an already loaded model and tokenizer (``nasq.api.Model.predict``)."""
    path = source
    if text_pairs is not None and len(text_pairs) != len(texts):
        raise NasqError(f"{len(texts)} texts but {len(text_pairs)} pair texts; give one --pair per text")
    max_len = min(max_len, model.config.max_position_embeddings)
    enc = tok(list(texts), text_pairs, truncation=True, max_length=max_len, padding="longest",
              return_token_type_ids=True, return_attention_mask=True)
    ids = np.asarray(enc["input_ids"], np.int32)
    tt = np.asarray(enc.get("token_type_ids", np.zeros_like(ids)), np.int32)
    logits = np.asarray(model(ids, tt, np.asarray(enc["attention_mask"], np.int32)))
    if not np.isfinite(logits).all():  # finite weights can still overflow: never print NaN as a prediction
        raise NasqError(f"{path}: the model's outputs are not finite for these inputs; the artifact's weights are "
                        "unusable (re-export it, or use one from a source you trust)")
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
