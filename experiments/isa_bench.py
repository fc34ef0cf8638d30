"""The native int GEMM per instruction set, side by side in one process (issue 17: VNNI on real hardware).

For MiniLM's linear shapes ([tokens x 384] . [384 x 1536] and [tokens x 1536] . [1536 x 384]), at each bit width,
times the native kernel's ISA paths this CPU supports (``avx512-vnni``, ``avx2``) on the same packed weights,
interleaved, medians; checks first that every path gives the same int32 accumulators as numpy int64. The
kernel is called through its C ABI (``Library.gemm``: numpy in, numpy out), so the times are the kernel alone.

    python experiments/isa_bench.py [--tokens 16,128,4096] [--bits 2,3,4,8] [--repeats 15] [--threads N]

One JSON line per (shape, bits) on stdout: median ms per ISA and their ratio.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from nasq.kernels import native
from nasq.quant.packing import pack_codes
from nasq.timing import environment, time_interleaved


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="16,128,4096")
    ap.add_argument("--bits", default="2,3,4,8")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=0, help="kernel threads (0: the library's default)")
    a = ap.parse_args(argv)
    lib = native.library()
    if a.threads:
        lib.set_num_threads(a.threads)
    isas = [i for i in ("avx512-vnni", "avx2") if lib.isa_supported(i)]
    if not isas:
        print("no SIMD path of the native kernel runs on this CPU", file=sys.stderr)
        return 2
    env = {**environment(), "best_isa": lib.best_isa(), "threads": lib.num_threads(),
           "command": " ".join(["python", *sys.argv])}
    rng = np.random.default_rng(0)
    for k, n in ((384, 1536), (1536, 384)):
        for bits in (int(b) for b in a.bits.split(",")):
            lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
            codes = rng.integers(lo, hi + 1, size=(n, k)).astype(np.int8)
            w = pack_codes(codes, bits)
            for m in (int(t) for t in a.tokens.split(",")):
                x = rng.integers(-127, 128, size=(m, k)).astype(np.int8)
                ref = x.astype(np.int64) @ codes.astype(np.int64).T
                exact = {isa: bool(np.array_equal(lib.gemm(x, w, bits, isa=isa), ref)) for isa in isas}
                t = time_interleaved({isa: (lambda isa=isa, x=x, w=w, b=bits: lib.gemm(x, w, b, isa=isa)) for isa in isas},
                                     a.repeats)
                rec = {"bench": "isa", "m": m, "k": k, "n": n, "bits": bits, "exact": exact,
                       "ms": {isa: round(1e3 * v, 4) for isa, v in t.items()}}
                if len(isas) == 2:
                    rec["vnni_over_avx2"] = round(t["avx512-vnni"] / t["avx2"], 3)
                print(json.dumps({**rec, **env}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
