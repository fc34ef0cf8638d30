"""nasq's native int GEMM against ONNX Runtime's ``MatMulInteger`` on MiniLM's linear shapes (issue 17).

One process, the two interleaved (``nasq.timing.time_interleaved``), medians. Both on the same activations:

  nasq     ``Library.gemm_segments`` on resident panels of b-bit weights (what ``unpack="panels"`` models run),
           fused fp32 epilogue; numpy in, numpy out (the C ABI: a few microseconds of ctypes per call)
  ort      an ONNX graph of one ``MatMulInteger`` (uint8 activations x int8 weights, int32 out: the u8 x s8 path
           of ORT's ``quantize_dynamic`` models), int8 weights as an initializer, the same thread count

ORT has no weights below 8 bits, so its weights are int8 in [-64, 63]: the 7-bit range of ``quantize_dynamic``'s
``reduce_range``, which keeps ORT's AVX2 u8 x s8 kernel (int16 pair sums) from saturating; nasq's are ``--bits`` (its time barely depends on the
width, resident panels hold one byte per weight). Accumulators are checked against numpy int64 first.

    python experiments/gemm_vs_ort.py [--tokens 16,128,4096] [--bits 2] [--repeats 15]

One JSON line per (shape, tokens): median ms and nasq / ort.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from nasq.kernels import native
from nasq.quant.packing import pack_codes
from nasq.timing import environment, time_interleaved

SHAPES = [(384, 1536), (1536, 384), (384, 384)]  # (K, N): FFN in, FFN out, attention


def ort_matmul_integer(w_kn: np.ndarray, threads: int):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    k, n = w_kn.shape
    graph = helper.make_graph([helper.make_node("MatMulInteger", ["A", "B"], ["Y"])], "g",
                              [helper.make_tensor_value_info("A", TensorProto.UINT8, ["M", k])],
                              [helper.make_tensor_value_info("Y", TensorProto.INT32, ["M", n])],
                              [numpy_helper.from_array(w_kn, "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="16,128,4096")
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    a = ap.parse_args(argv)
    lib = native.library()
    rng = np.random.default_rng(0)
    lo, hi = (-1, 1) if a.bits <= 2 else (-(1 << (a.bits - 1)), (1 << (a.bits - 1)) - 1)
    env = {**environment(), "isa": lib.best_isa(), "threads": lib.num_threads()}
    for k, n in SHAPES:
        codes = rng.integers(lo, hi + 1, (n, k)).astype(np.int8)
        if a.bits == 1:
            codes[codes == 0] = 1
        panels = lib.prepack(pack_codes(codes, a.bits), a.bits, k)
        w8 = rng.integers(-64, 64, (k, n)).astype(np.int8)
        sess = ort_matmul_integer(w8, lib.num_threads())
        for m in (int(t) for t in a.tokens.split(",")):
            x = rng.integers(-127, 128, (m, k)).astype(np.int8)
            xu = (x.astype(np.int16) + 128).astype(np.uint8)
            sx, rs = np.ones(m, np.float32), np.ones(n, np.float32)
            acc = lib.gemm_segments(x, ((a.bits, panels),), rows=[n])
            assert np.array_equal(acc.astype(np.int64), x.astype(np.int64) @ codes.astype(np.int64).T)
            got = sess.run(None, {"A": xu})[0]
            assert np.array_equal(got.astype(np.int64), xu.astype(np.int64) @ w8.astype(np.int64))
            t = time_interleaved({
                "nasq": lambda x=x, sx=sx, rs=rs, panels=panels, n=n: lib.gemm_segments(
                    x, ((a.bits, panels),), rows=[n], sx=sx, row_scale=rs),
                "ort": lambda xu=xu, sess=sess: sess.run(None, {"A": xu}),
            }, a.repeats, warmup=3)
            print(json.dumps({"bench": "gemm-vs-ort", "k": k, "n": n, "tokens": m, "bits": a.bits,
                              "median_ms": {key: round(1e3 * v, 4) for key, v in t.items()},
                              "nasq_over_ort": round(t["nasq"] / t["ort"], 3), **env}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
