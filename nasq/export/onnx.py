"""ONNX export of an integer artifact: ``model.nasq`` -> ``model.onnx`` that ONNX Runtime runs on CPU.

The graph mirrors ``nasq.kernels.int_bert`` op for op, so its predictions are those of nasq's integer path
(``nasq export --format onnx --verify`` measures the agreement on the dev set). Every quantized linear becomes::

    sx  = where(amax > 0, amax * (1/127), 1)  amax = ReduceMax(|x|, -1)   per-token int8, as quantize_act_int8
    xq  = Cast<int8>(Clip(Round(x / sx), -127, 127))
    acc = Concat_b MatMulInteger(xq, W_b)       W_b: the codes of the rows at b bits, transposed [in, R_b]
    y   = Gather(Cast<float>(acc) * sx * row_scale + bias, inverse)     original row order, 0 at pruned rows

**What keeps its bits, what is widened.** ONNX has 2-, 4- and 8-bit integer tensors (INT2 since opset 25,
INT4 since 21), stored densely packed, so a b-bit code is stored in the narrowest of them that holds it:

    nasq bits   1   2   3   4   5   6   7   8
    ONNX type   INT2    INT4    INT8 ............

2-, 4- and 8-bit codes keep their size; 1-bit codes take 2 bits (2x), 3-bit codes 4 (+33%), 5-7-bit codes 8.
ORT's integer matmul (``MatMulInteger``) takes 8-bit operands only, so an INT2/INT4 weight reaches it through
``DequantizeLinear`` (scale 1: the codes themselves) and a ``Cast`` to int8. The *file* keeps the packed
bytes; ONNX Runtime 1.32 runs these two nodes on every call (its constant folding skips ``DequantizeLinear``
unless the session sets ``session.disable_quant_qdq=1``; at batch 1 x 16 folding them made no measurable
difference: ``MatMulInteger`` dominates). Group scales are stored per kept row (fp32, ``R_kept`` values
instead of one per group) and each linear stores an int64 row index for the pruned-row gather: both are
counted in the report (``extra_bytes``). Quantized embedding tables are stored at the container of their
widest row group (one table for the row lookup; a table mixing widths is widened to its widest); fp32
tensors stay fp32.

``onnx`` and ``onnxruntime`` are an optional extra (``pip install 'nasq[onnx]'``); nothing else in nasq
imports them.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nasq.errors import NasqError
from nasq.evaluation import compare_logits, predict_logits
from nasq.export.reader import artifact_dev_set, load_artifact
from nasq.io import check_output_path, write_atomic
from nasq.kernels.int_bert import Fp32Linear, IntBert
from nasq.kernels.int_linear import EmbeddingTable, PackedLinear
from nasq.models.loading import load_tokenizer
from nasq.quant.packing import unpack_codes
from nasq.quant.quantizer import ACT_INV_QMAX, ACT_QMAX

__all__ = ["OPSET", "OnnxModel", "OnnxReport", "container_bits", "export_onnx", "load_onnx", "verify_onnx"]

OPSET = 25  # INT2 tensors (DequantizeLinear-25); INT4 needs 21
INPUTS = ("input_ids", "token_type_ids", "attention_mask")


def _require():
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise NasqError(f"ONNX export needs the optional extra: pip install 'nasq[onnx]' ({e.name} is missing)"
                        ) from None


def container_bits(bits: int) -> int:
    """The ONNX integer width that stores a ``bits``-bit code: 2, 4 or 8 (see the module docstring)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in [1, 8], got {bits}")
    return 2 if bits <= 2 else 4 if bits <= 4 else 8


@dataclass
class OnnxReport:
    """What the export wrote: bytes of the ONNX file and of nasq's own artifact, per-width weight counts."""

    path: str
    onnx_file_bytes: int
    nasq_tensor_bytes: int
    opset: int = OPSET
    weights_by_bits: dict[int, int] = field(default_factory=dict)  # nasq bits -> quantized weights (linears)
    code_bytes_nasq: int = 0  # quantized codes (linears and embedding tables), densely packed at their own widths
    code_bytes_onnx: int = 0  # the same codes in their ONNX containers (see container_bits)
    extra_bytes: int = 0  # per-row scales and pruned-row indices ONNX stores beyond nasq's per-group scales

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


class _Graph:
    """A small ONNX graph builder: unique names, initializers, nodes."""

    def __init__(self):
        from onnx import helper

        self.h = helper
        self.nodes: list = []
        self.inits: list = []
        self._n = 0

    def name(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def const(self, value, hint: str = "c", dtype=None) -> str:
        from onnx import numpy_helper

        name = self.name(hint)
        arr = np.asarray(value, dtype=dtype)
        self.inits.append(numpy_helper.from_array(arr, name))
        return name

    def op(self, op_type: str, inputs: list[str], hint: str | None = None, **attrs) -> str:
        out = self.name(hint or op_type.lower())
        self.nodes.append(self.h.make_node(op_type, inputs, [out], name=out, **attrs))
        return out


def _codes_tensor(g: _Graph, codes: np.ndarray, bits: int, hint: str) -> tuple[str, int]:
    """An int8 tensor of ``codes`` held in the ONNX container of ``bits``; returns (name, stored bytes)."""
    import ml_dtypes
    from onnx import TensorProto

    cbits = container_bits(bits)
    if cbits == 8:
        name = g.const(codes.astype(np.int8), hint)
        return name, codes.size
    dtype = ml_dtypes.int2 if cbits == 2 else ml_dtypes.int4
    packed = g.const(codes.astype(dtype), hint)
    one = g.const(np.float32(1.0), "one")
    as_float = g.op("DequantizeLinear", [packed, one], hint + "_dq")
    return g.op("Cast", [as_float], hint + "_i8", to=TensorProto.INT8), math.ceil(codes.size * cbits / 8)


class _Builder:
    def __init__(self, model: IntBert, report: OnnxReport):
        self.g = _Graph()
        self.model = model
        self.report = report
        self._quantized: dict[str, tuple[str, str]] = {}

    # activations: per-token symmetric int8 (nasq.quant.quantizer.quantize_act_int8), computed once per tensor
    def quantize_act(self, x: str) -> tuple[str, str]:
        from onnx import TensorProto

        if x not in self._quantized:
            g = self.g
            amax = g.op("ReduceMax", [g.op("Abs", [x]), g.const(np.array([-1], np.int64), "axes")], keepdims=1)
            zero, one = g.const(np.float32(0.0)), g.const(np.float32(1.0))
            sx = g.op("Where", [g.op("Greater", [amax, zero]), g.op("Mul", [amax, g.const(ACT_INV_QMAX)]),
                                one], "sx")
            q = g.op("Clip", [g.op("Round", [g.op("Div", [x, sx])]), g.const(np.float32(-ACT_QMAX)),
                              g.const(np.float32(ACT_QMAX))])
            self._quantized[x] = (g.op("Cast", [q], "xq", to=TensorProto.INT8), sx)
        return self._quantized[x]

    def linear(self, x: str, lin, hint: str) -> str:
        g = self.g
        if isinstance(lin, Fp32Linear):
            w = g.const(np.asarray(lin.kernel, np.float32), hint + "_w")
            return g.op("Add", [g.op("MatMul", [x, w]), g.const(np.asarray(lin.bias, np.float32), hint + "_b")])
        if not isinstance(lin, PackedLinear):
            raise NasqError(f"ONNX export: unsupported linear kind {type(lin).__name__} at {hint}")
        return self._packed(x, lin, hint)

    def _packed(self, x: str, p: PackedLinear, hint: str) -> str:
        from onnx import TensorProto

        g, rep = self.g, self.report
        if p.kept_rows == 0:  # every row pruned: zeros of the output shape
            shape = g.op("Concat", [g.op("Slice", [g.op("Shape", [x]), g.const(np.array([0], np.int64)),
                                                   g.const(np.array([-1], np.int64))]),
                                    g.const(np.array([p.out_features], np.int64))], axis=0)
            return g.op("ConstantOfShape", [shape], value=self.g.h.make_tensor("z", TensorProto.FLOAT, [1], [0.0]))
        xq, sx = self.quantize_act(x)
        accs = []
        for bits, packed in p.segments:
            codes = unpack_codes(np.asarray(packed), int(bits), p.in_features, xp=np)
            w, nbytes = _codes_tensor(g, np.ascontiguousarray(codes.T), int(bits), f"{hint}_w{bits}")
            accs.append(g.op("MatMulInteger", [xq, w]))
            rep.weights_by_bits[int(bits)] = rep.weights_by_bits.get(int(bits), 0) + codes.size
            rep.code_bytes_onnx += nbytes
            rep.code_bytes_nasq += int(np.asarray(packed).nbytes)
        acc = accs[0] if len(accs) == 1 else g.op("Concat", accs, axis=-1)
        row_scale = np.repeat(np.asarray(p.group_scale, np.float32), np.asarray(p.kept_group_sizes))
        rep.extra_bytes += row_scale.nbytes - int(np.asarray(p.group_scale).nbytes)
        y = g.op("Mul", [g.op("Mul", [g.op("Cast", [acc], to=TensorProto.FLOAT), sx]),
                         g.const(row_scale, hint + "_scale")])
        if p.bias is not None:
            y = g.op("Add", [y, g.const(np.asarray(p.bias, np.float32), hint + "_b")])
        out_index = np.asarray(p.out_index, np.int64)
        if p.kept_rows == p.out_features and np.array_equal(out_index, np.arange(p.out_features)):
            return y
        # original row order: gather with an inverse index; pruned rows read an appended zero column
        inverse = np.full(p.out_features, p.kept_rows, np.int64)
        inverse[out_index] = np.arange(p.kept_rows)
        rep.extra_bytes += inverse.nbytes
        zero_col = g.op("Mul", [g.op("Slice", [y, g.const(np.array([0], np.int64)), g.const(np.array([1], np.int64)),
                                               g.const(np.array([-1], np.int64))]), g.const(np.float32(0.0))])
        ext = g.op("Concat", [y, zero_col], axis=-1)
        return g.op("Gather", [ext, g.const(inverse, hint + "_rows")], axis=-1)

    def embedding(self, ids: str, emb, hint: str) -> str:
        from onnx import TensorProto

        g, rep = self.g, self.report
        if not isinstance(emb, EmbeddingTable):
            return g.op("Gather", [g.const(np.asarray(emb, np.float32), hint), ids], axis=0)
        codes = np.asarray(emb.codes, np.int8)
        # symmetric per-row absmax codes reach 2^(b-1) - 1 in every kept row: the widest row's b from its codes
        amax = int(np.abs(codes.astype(np.int16)).max(initial=0))
        bits = max(2, int(amax).bit_length() + 1)
        table, nbytes = _codes_tensor(g, codes, bits, hint + "_codes")
        kept = int((np.asarray(emb.row_scale) != 0).sum())
        rep.code_bytes_onnx += nbytes
        rep.code_bytes_nasq += kept * math.ceil(codes.shape[1] * bits / 8)
        rows = g.op("Cast", [g.op("Gather", [table, ids], axis=0)], to=TensorProto.FLOAT)
        scale = g.op("Unsqueeze", [g.op("Gather", [g.const(np.asarray(emb.row_scale, np.float32), hint + "_scale"),
                                                   ids], axis=0), g.const(np.array([-1], np.int64))])
        return g.op("Mul", [rows, scale])

    def layer_norm(self, x: str, ln, eps: float) -> str:
        scale, bias = ln
        return self.g.op("LayerNormalization", [x, self.g.const(np.asarray(scale, np.float32), "ln_s"),
                                                self.g.const(np.asarray(bias, np.float32), "ln_b")],
                         axis=-1, epsilon=float(eps))

    def activation(self, x: str, name: str) -> str:
        if name == "gelu":
            return self.g.op("Gelu", [x], approximate="none")
        if name == "gelu_new":
            return self.g.op("Gelu", [x], approximate="tanh")
        if name == "relu":
            return self.g.op("Relu", [x])
        raise NasqError(f"ONNX export: activation {name!r} is not mapped; supported: gelu, gelu_new, relu")

    def attention(self, x: str, lp: dict, mask_bias: str) -> str:
        g, cfg = self.g, self.model.config
        nh, hd = cfg.num_attention_heads, cfg.head_dim
        heads_shape = g.const(np.array([0, 0, nh, hd], np.int64), "heads")
        q, k, v = (g.op("Reshape", [self.linear(x, lp[n], n), heads_shape]) for n in ("query", "key", "value"))
        q = g.op("Transpose", [q], perm=[0, 2, 1, 3])
        k = g.op("Transpose", [k], perm=[0, 2, 3, 1])
        v = g.op("Transpose", [v], perm=[0, 2, 1, 3])
        scores = g.op("Add", [g.op("Div", [g.op("MatMul", [q, k]), g.const(np.float32(np.sqrt(np.float32(hd))))]),
                              mask_bias])
        ctx = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), v])
        ctx = g.op("Transpose", [ctx], perm=[0, 2, 1, 3])
        return g.op("Reshape", [ctx, g.const(np.array([0, 0, nh * hd], np.int64))])

    def build(self):
        from onnx import TensorProto

        g, h, m = self.g, self.g.h, self.model
        cfg, params = m.config, m.params
        eps = cfg.layer_norm_eps
        ids, tt, am = INPUTS
        e = params["embeddings"]
        seq = g.op("Gather", [g.op("Shape", [ids]), g.const(np.int64(1))], axis=0)
        positions = g.op("Range", [g.const(np.int64(0)), seq, g.const(np.int64(1))])
        x = g.op("Add", [g.op("Add", [self.embedding(ids, e["word"], "word"),
                                      self.embedding(positions, e["position"], "position")]),
                         self.embedding(tt, e["type"], "type")])
        x = self.layer_norm(x, e["ln"], eps)
        keep = g.op("Greater", [am, g.const(np.int64(0))])
        bias = g.op("Where", [keep, g.const(np.float32(0.0)), g.const(np.float32(np.finfo(np.float32).min))])
        mask_bias = g.op("Unsqueeze", [bias, g.const(np.array([1, 2], np.int64))], "mask_bias")
        for i, lp in enumerate(params["layers"]):
            ctx = self.attention(x, lp, mask_bias)
            a = self.layer_norm(g.op("Add", [self.linear(ctx, lp["attn_out"], f"l{i}_attn_out"), x]), lp["attn_ln"],
                                eps)
            hdn = self.activation(self.linear(a, lp["inter"], f"l{i}_inter"), cfg.hidden_act)
            x = self.layer_norm(g.op("Add", [self.linear(hdn, lp["out"], f"l{i}_out"), a]), lp["out_ln"], eps)
        first = g.op("Gather", [x, g.const(np.int64(0))], axis=1)
        pooled = g.op("Tanh", [self.linear(first, params["pooler"], "pooler")])
        logits = self.linear(pooled, params["classifier"], "classifier")
        g.nodes.append(h.make_node("Identity", [logits], ["logits"], name="logits"))
        inputs = [h.make_tensor_value_info(n, TensorProto.INT64, ["batch", "seq"]) for n in INPUTS]
        outputs = [h.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", m.num_labels])]
        graph = h.make_graph(g.nodes, "nasq_int_bert", inputs, outputs, g.inits)
        model = h.make_model(graph, opset_imports=[h.make_opsetid("", OPSET)], producer_name="nasq")
        model.ir_version = 11
        return model


def export_onnx(artifact: str | Path, out: str | Path, *, overwrite: bool = False) -> OnnxReport:
    """Write ``out`` (one ``.onnx`` file) from the artifact directory ``artifact``; returns an :class:`OnnxReport`.

    The artifact is validated as ``nasq.export.reader.load_artifact`` does; ``out`` is written atomically and
    an existing file is replaced only with ``overwrite``. The ONNX checker runs before anything is written.
    """
    _require()
    import onnx

    artifact, out = Path(artifact), Path(out)
    if out.is_dir():
        raise NasqError(f"{out} is a directory; --out for --format onnx is a file, e.g. model.onnx")
    check_output_path(out, overwrite)
    model = load_artifact(artifact, unpack="fused")  # the graph is built from the packed linears
    manifest = model.manifest  # verified by load_artifact
    report = OnnxReport(path=str(out), onnx_file_bytes=0, nasq_tensor_bytes=int(manifest["tensor_bytes"]))
    proto = _Builder(model, report).build()
    meta = {"nasq_task": str(manifest.get("task") or ""), "nasq_num_labels": str(model.num_labels),
            "nasq_source_sha256": manifest["files"]["tensors.safetensors"]["sha256"],
            "nasq_version": str(manifest.get("nasq_version", ""))}
    onnx.helper.set_model_props(proto, meta)
    onnx.checker.check_model(proto)
    data = proto.SerializeToString()
    write_atomic(out, data)
    report.onnx_file_bytes = len(data)
    return report


class OnnxModel:
    """An exported ONNX model under ONNX Runtime (CPU), called like every nasq model:
    ``OnnxModel(path)(input_ids, token_type_ids, attention_mask) -> logits`` (numpy ``[batch, num_labels]``)."""

    def __init__(self, path: str | Path, *, threads: int | None = None, spinning: bool = True):
        _require()
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise NasqError(f"{path}: no such ONNX file")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
        if not spinning:  # idle threads sleep instead of spinning (benchmarks that interleave other frameworks)
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        # onnxruntime's own exceptions (Fail, InvalidProtobuf, ...) derive from Exception only
        except Exception as e:  # noqa: BLE001
            raise NasqError(f"{path}: ONNX Runtime cannot load it ({str(e).splitlines()[0][:300]})") from None
        self.path = path
        props = self.session.get_modelmeta().custom_metadata_map
        self.task = props.get("nasq_task") or None

    def __call__(self, input_ids, token_type_ids=None, attention_mask=None):
        ids = np.asarray(input_ids, np.int64)
        tt = np.zeros_like(ids) if token_type_ids is None else np.asarray(token_type_ids, np.int64)
        am = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, np.int64)
        return self.session.run(["logits"], {"input_ids": ids, "token_type_ids": tt, "attention_mask": am})[0]


def load_onnx(path: str | Path, *, threads: int | None = None, spinning: bool = True) -> OnnxModel:
    """An :class:`OnnxModel` for ``path`` (``spinning=False``: ONNX Runtime's idle threads sleep)."""
    return OnnxModel(path, threads=threads, spinning=spinning)


def verify_onnx(onnx_path: str | Path, artifact: str | Path, cfg) -> dict:
    """The dev set through nasq's integer path (``artifact``) and through ONNX Runtime (``onnx_path``), side by
    side: both metrics, the share of rows whose predictions agree, the largest logit difference, wall times.

    ``cfg``: a ``nasq.config.Config`` for the data (``data.data_dir``, ``model.max_len``, batch size; the task
    is the artifact's unless ``data.task`` was set)."""
    artifact = Path(artifact)
    onnx_model = load_onnx(onnx_path)
    int_model = load_artifact(artifact)
    task, dev, buckets = artifact_dev_set(int_model, load_tokenizer(artifact), cfg, source=artifact)
    t0 = time.perf_counter()
    ref = predict_logits(int_model, dev, cfg.data.eval_batch_size, buckets)
    t_int = time.perf_counter() - t0
    t0 = time.perf_counter()
    got = predict_logits(onnx_model, dev, cfg.data.eval_batch_size, buckets)
    t_onnx = time.perf_counter() - t0
    return {"task": task.name, "dev_rows": len(dev),
            **compare_logits(task, ref, got, dev.labels, names=("int_artifact", "onnx")),
            "eval_wall_s": {"int_artifact": round(t_int, 2), "onnx": round(t_onnx, 2)}}
