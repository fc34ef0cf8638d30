"""The native integer GEMM (``nasq.kernels.native``, C++ through the XLA FFI) against numpy int64 and the XLA path.

Every instruction-set path this CPU has is forced in turn (``isa=`` / ``NASQ_NATIVE_ISA``); the VNNI paths
(AVX-512 and AVX-VNNI), when the CPU lacks them, are checked on a test build that emulates the intrinsics with
SIMDe (if its headers are installed: Debian's libsimde-dev). Tests that need the built library (``pip install -e .``) skip with the reason
when it is missing; the fallback to XLA is tested either way.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiers import examples

from nasq.errors import NasqError
from nasq.kernels import native
from nasq.kernels.int_linear import PackedLinear, int8_matmul, pack_linear, packed_linear_apply, scatter_rows
from nasq.quant.packing import pack_codes, unpack_codes
from nasq.quant.quantizer import quantize_act_int8

LIB, WHY = native._load()  # (Library, "") or (None, why not)
needs_lib = pytest.mark.skipif(LIB is None, reason=f"native kernel library unavailable: {WHY}")
ISAS = [isa for isa in ("scalar", "avx2", "avx512-vnni") if LIB is not None and LIB.isa_supported(isa)]
SETTINGS = settings(max_examples=examples(25), deadline=None, suppress_health_check=[HealthCheck.too_slow])
JIT_SETTINGS = settings(max_examples=examples(10), deadline=None, suppress_health_check=[HealthCheck.too_slow])  # compiles


# ------------------------------------------------------------------------------------------------ references
def kept_rows_int(xq, p: PackedLinear, kernel: str):
    """Integer accumulators of a layer's kept rows on one kernel: ``int8 [..., in] -> int32 [..., R_kept]``."""
    if p.kept_rows == 0:
        return jnp.zeros((*xq.shape[:-1], 0), jnp.int32)
    if kernel == "xla":
        return int8_matmul(xq, p.unpacked_codes())
    parts = [native.int_gemm(xq, packed, b) for b, packed in p.segments]
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)


def random_codes(rng, rows, cols, bits):
    """Random codes of a width, extremes included (binary: +-1)."""
    if bits == 1:
        return rng.choice(np.array([-1, 1], np.int8), (rows, cols))
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    codes = rng.integers(lo, hi + 1, (rows, cols)).astype(np.int8)
    if rows and cols:
        codes[0, 0], codes[-1, -1] = lo, hi
    return codes


def random_x(rng, m, k):
    x = rng.integers(-128, 128, (m, k)).astype(np.int8)
    if m and k:
        x[0, :] = -128  # the extreme row: every product at its largest magnitude
    return x


def ref_acc(x, codes):
    return x.astype(np.int64) @ codes.astype(np.int64).T


def ref_epilogue(acc, sx, row_scale, bias):
    """fp32 ``acc * sx * row_scale (+ bias)`` as XLA's CPU code evaluates it (one FMA for the multiply-add)."""
    t = acc.astype(np.float32) * sx[:, None]
    if bias is None:
        return t * row_scale[None, :]
    return (t.astype(np.float64) * row_scale[None, :] + bias[None, :]).astype(np.float32)


# ------------------------------------------------------------------------------------- the GEMM on its own
@needs_lib
@SETTINGS
@given(m=st.integers(1, 37), k=st.integers(1, 300), n=st.integers(1, 37), bits=st.integers(1, 8),
       seed=st.integers(0, 2**31 - 1))
def test_int_gemm_exact_every_isa(m, k, n, bits, seed):
    """int32 accumulators == numpy int64 for every ISA (ctypes, no JAX), K not a multiple of 8/64 included."""
    rng = np.random.default_rng(seed)
    x, codes = random_x(rng, m, k), random_codes(rng, n, k, bits)
    w = pack_codes(codes, bits)
    want = ref_acc(x, codes)
    for isa in ISAS:
        np.testing.assert_array_equal(LIB.gemm(x, w, bits, isa=isa).astype(np.int64), want, err_msg=isa)


@needs_lib
@SETTINGS
@given(m=st.integers(1, 20), k=st.integers(1, 200), n=st.integers(1, 20), bits=st.integers(1, 8),
       has_bias=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_fused_epilogue(m, k, n, bits, has_bias, seed):
    """Fused fp32 output == XLA's formula on the exact accumulators (bit for bit where FMA is used alike)."""
    rng = np.random.default_rng(seed)
    x, codes = random_x(rng, m, k), random_codes(rng, n, k, bits)
    w = pack_codes(codes, bits)
    sx = (rng.random(m) * 0.1).astype(np.float32)
    rs = (rng.random(n) * 0.01).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32) if has_bias else None
    want = ref_epilogue(ref_acc(x, codes), sx, rs, bias)
    for isa in ISAS:
        got = LIB.gemm(x, w, bits, isa=isa, sx=sx, row_scale=rs, bias=bias)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * float(np.abs(want).max()), err_msg=isa)


# ------------------------------------------------------------------ a mixed-width layer in one call
def random_segments(rng, k, widths_rows):
    """``((bits, packed), ...)`` and the codes ``int8 [sum R, k]`` of a layer with those segments."""
    codes = [random_codes(rng, r, k, b) for b, r in widths_rows]
    segs = tuple((b, pack_codes(c, b)) for (b, _), c in zip(widths_rows, codes, strict=True))
    return segs, (np.concatenate(codes) if codes else np.zeros((0, k), np.int8))


def epilogue_inputs(rng, m, r):
    """``(sx [m], row_scale [r], bias [r])`` fp32 for the fused output."""
    return ((rng.random(m) * 0.1).astype(np.float32), (rng.random(r) * 0.01).astype(np.float32),
            rng.standard_normal(r).astype(np.float32))


SEGMENTS = st.lists(st.tuples(st.integers(1, 8), st.integers(0, 45)), min_size=1, max_size=4)


@needs_lib
@SETTINGS
@given(m=st.integers(1, 20), k=st.integers(1, 260), segs=SEGMENTS, has_bias=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_segments_one_call_exact(m, k, segs, has_bias, seed):
    """One call over several widths (empty segments included) == numpy int64 per ISA; its fused output == the
    per-segment fused calls side by side, bit for bit."""
    rng = np.random.default_rng(seed)
    x = random_x(rng, m, k)
    segments, codes = random_segments(rng, k, segs)
    sx, rs, bias = epilogue_inputs(rng, m, codes.shape[0])
    bias = bias if has_bias else None
    for isa in ISAS:
        np.testing.assert_array_equal(LIB.gemm_segments(x, segments, isa=isa).astype(np.int64), ref_acc(x, codes),
                                      err_msg=isa)
        got = LIB.gemm_segments(x, segments, isa=isa, sx=sx, row_scale=rs, bias=bias)
        parts, r0 = [], 0
        for b, w in segments:
            r1 = r0 + w.shape[0]
            parts.append(LIB.gemm(x, w, b, isa=isa, sx=sx, row_scale=rs[r0:r1],
                                  bias=None if bias is None else bias[r0:r1]))
            r0 = r1
        np.testing.assert_array_equal(got, np.concatenate(parts, axis=1), err_msg=isa)


@needs_lib
@pytest.mark.parametrize("threads", [1, 2, 5])
def test_segments_thread_split_exact(threads):
    """Thread ranges that start and end inside segments (panels of different widths split together)."""
    rng = np.random.default_rng(threads)
    x = random_x(rng, 33, 700)
    segments, codes = random_segments(rng, 700, [(2, 70), (3, 33), (4, 129), (8, 17)])
    before = LIB.num_threads()
    try:
        LIB.set_num_threads(threads)
        for isa in ISAS:
            np.testing.assert_array_equal(LIB.gemm_segments(x, segments, isa=isa), ref_acc(x, codes), err_msg=isa)
    finally:
        LIB.set_num_threads(before)


@needs_lib
def test_segments_ffi_matches_ctypes_and_errors():
    """The FFI call (jitted, leading dims) == the C ABI; a segment of the wrong byte width is refused."""
    rng = np.random.default_rng(3)
    x = random_x(rng, 10, 96)
    segments, codes = random_segments(rng, 96, [(2, 40), (4, 24), (3, 8)])
    r = codes.shape[0]
    sx, rs, bias = epilogue_inputs(rng, 10, r)
    f = jax.jit(lambda x, sx, rs, b: native.int_linear_segments(x, sx, segments, rs, b))
    got = f(jnp.asarray(x).reshape(2, 5, 96), jnp.asarray(sx).reshape(2, 5, 1), rs, bias)
    assert got.shape == (2, 5, r)
    np.testing.assert_array_equal(np.asarray(got).reshape(10, r),
                                  LIB.gemm_segments(x, segments, sx=sx, row_scale=rs, bias=bias))
    with pytest.raises(NasqError, match="3-bit rows"):
        native.int_linear_segments(x, sx, ((2, segments[0][1]), (3, segments[1][1])), rs[:64], None)
    with pytest.raises(NasqError, match="at least one segment"):
        native.int_linear_segments(x, sx, (), rs[:0])
    with pytest.raises(NasqError, match="do not hold"):
        LIB.gemm_segments(x, ((3, segments[0][1]),))


@needs_lib
@SETTINGS
@given(m=st.integers(1, 20), k=st.integers(1, 260), segs=SEGMENTS, seed=st.integers(0, 2**31 - 1))
def test_resident_panels_exact(m, k, segs, seed):
    """Weights unpacked once into resident panels (prepack) give the packed path's outputs, bit for bit, on every
    ISA (int32 and fused fp32), with threads splitting panels across segments."""
    rng = np.random.default_rng(seed)
    x = random_x(rng, m, k)
    segments, codes = random_segments(rng, k, segs)
    sx, rs, _ = epilogue_inputs(rng, m, codes.shape[0])
    rows = [w.shape[0] for _, w in segments]
    for isa in ISAS:
        panels = tuple((b, LIB.prepack(w, b, k, isa=isa)) for b, w in segments)
        np.testing.assert_array_equal(LIB.gemm_segments(x, panels, isa=isa, rows=rows).astype(np.int64),
                                      ref_acc(x, codes), err_msg=isa)
        np.testing.assert_array_equal(LIB.gemm_segments(x, panels, isa=isa, rows=rows, sx=sx, row_scale=rs),
                                      LIB.gemm_segments(x, segments, isa=isa, sx=sx, row_scale=rs), err_msg=isa)


def linear_inputs(rng, m, k):
    """fp32 tokens with an all-zero one (scale 1) and one of halves with absmax 127 (scale 1: x / scale lands on
    ties, so round-half-to-even is checked)."""
    x = (rng.standard_normal((m, k)) * rng.uniform(0.01, 10)).astype(np.float32)
    if m > 1:
        x[0] = 0.0
        x[-1] = rng.integers(-254, 255, k) / 2
        x[-1, 0] = 127.0
    return x


@needs_lib
@JIT_SETTINGS
@given(m=st.integers(1, 20), k=st.integers(1, 260), segs=SEGMENTS, pruned=st.integers(0, 30),
       has_bias=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_linear_one_call_exact(m, k, segs, pruned, has_bias, seed):
    """native.linear (fp32 x quantized inside; each kept row written to its column, zeros at pruned columns) ==
    quantize_act_int8 + int_linear_segments + scatter_rows, bit for bit, from packed rows and from resident
    panels, on every ISA."""
    rng = np.random.default_rng(seed)
    x = linear_inputs(rng, m, k)
    segments, codes = random_segments(rng, k, segs)
    r = codes.shape[0]
    _, rs, bias = epilogue_inputs(rng, m, r)
    bias = bias if has_bias else None
    f = r + pruned
    out_index = rng.permutation(f)[:r].astype(np.int32)
    xq, sx = quantize_act_int8(jnp.asarray(x))
    if r == 0:
        return
    for isa in ISAS:
        want = np.asarray(scatter_rows(native.int_linear_segments(xq, sx, segments, rs, bias, isa=isa), out_index, f))
        got = native.linear(x, segments, rs, bias, out_index, f, isa=isa)
        np.testing.assert_array_equal(np.asarray(got), want, err_msg=isa)
        _, panels = native.prepack_segments(segments, k, isa)
        got = native.linear(x, panels, rs, bias, out_index, f, panels_isa=isa)
        np.testing.assert_array_equal(np.asarray(got), want, err_msg=f"{isa} panels")


@needs_lib
def test_linear_jit_threads_and_errors():
    """Under jit, with leading dims and enough tokens for the thread pool (quantization split over threads too),
    native.linear == the reference; bad panels, ISA and column maps are refused."""
    rng = np.random.default_rng(4)
    x = linear_inputs(rng, 300, 200).reshape(3, 100, 200)
    segments, codes = random_segments(rng, 200, [(2, 70), (3, 20), (8, 9)])
    r = codes.shape[0]
    _, rs, bias = epilogue_inputs(rng, 1, r)
    out_index = np.r_[np.arange(50), np.arange(60, 109)].astype(np.int32)  # 10 pruned columns
    isa, panels = native.prepack_segments(segments, 200)
    assert isa == native.resolved_isa() != "auto" and [p[:2] for p in panels] == [(2, 70), (3, 20), (8, 9)]
    got = jax.jit(lambda x: native.linear(x, panels, rs, bias, out_index, 109, panels_isa=isa))(jnp.asarray(x))
    xq, sx = quantize_act_int8(jnp.asarray(x))
    want = scatter_rows(native.int_linear_segments(xq, sx, segments, rs, bias), out_index, 109)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert not np.asarray(got)[..., 50:60].any()
    with pytest.raises(NasqError, match="one ISA"):
        native.linear(x, panels, rs, bias, out_index, 109, panels_isa="auto")
    with pytest.raises(NasqError, match="do not hold"):
        native.linear(x, ((2, 170, panels[0][2]),) + panels[1:], np.ones(r + 100, np.float32), None,
                      np.arange(r + 100), r + 100, panels_isa=isa)
    with pytest.raises(NasqError, match="out_index"):
        native.linear(x, segments, rs, bias, out_index[:-1], 109)
    with pytest.raises(NasqError, match="at least one segment"):
        native.linear(x, (), rs[:0], None, out_index[:0], 109)
    with pytest.raises(jax.errors.JaxRuntimeError, match="shapes do not match"):  # a column out of range: refused by the kernel
        native.linear(x, segments, rs, bias, np.r_[out_index[:-1], 500].astype(np.int32), 109)
    with pytest.raises(NasqError, match="do not hold"):
        LIB.prepack(segments[0][1], 3, 200)


@needs_lib
def test_xla_pool_and_own_pool_give_the_same_outputs():
    """Inside jit the native calls run their tasks on XLA's thread pool (the default) or on the kernel's own
    threads (set_xla_pool(False)); bit-identical outputs either way, at a size split over threads."""
    rng = np.random.default_rng(9)
    x = jnp.asarray(linear_inputs(rng, 512, 256))
    segments, codes = random_segments(rng, 256, [(2, 300), (4, 200)])
    r = codes.shape[0]
    _, rs, bias = epilogue_inputs(rng, 1, r)
    isa, panels = native.prepack_segments(segments, 256)
    f = jax.jit(lambda x: native.linear(x, panels, rs, bias, np.arange(r, dtype=np.int32), r, panels_isa=isa))
    start, outs = native.xla_pool(), []
    try:
        for on in (True, False, True):
            native.set_xla_pool(on)
            assert native.xla_pool() is on
            outs.append(np.asarray(f(x)))
    finally:
        native.set_xla_pool(start)
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], outs[2])
    xq, sx = quantize_act_int8(x)
    np.testing.assert_array_equal(outs[0], np.asarray(native.int_linear_segments(xq, sx, segments, rs, bias)))


@needs_lib
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_threads_split_exact(threads):
    """Shapes large enough to run on the thread pool (also more threads than cores, odd splits)."""
    rng = np.random.default_rng(threads)
    x, codes = random_x(rng, 45, 1543), random_codes(rng, 103, 1543, 3)
    w = pack_codes(codes, 3)
    before = LIB.num_threads()
    try:
        LIB.set_num_threads(threads)
        for isa in ISAS:
            np.testing.assert_array_equal(LIB.gemm(x, w, 3, isa=isa), ref_acc(x, codes), err_msg=isa)
    finally:
        LIB.set_num_threads(before)


@needs_lib
def test_concurrent_calls():
    """Calls from several threads at once (XLA may run custom calls concurrently): all exact."""
    rng = np.random.default_rng(7)
    cases = []
    for bits in (1, 2, 4, 8):
        x, codes = random_x(rng, 64, 512), random_codes(rng, 96, 512, bits)
        cases.append((x, pack_codes(codes, bits), bits, ref_acc(x, codes)))
    errors = []

    def run(case):
        x, w, bits, want = case
        for _ in range(5):
            if not np.array_equal(LIB.gemm(x, w, bits), want):
                errors.append(bits)

    threads = [threading.Thread(target=run, args=(c,)) for c in cases]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


@needs_lib
def test_empty_and_bad_arguments():
    w = pack_codes(np.ones((3, 10), np.int8), 4)
    assert LIB.gemm(np.zeros((0, 10), np.int8), w, 4).shape == (0, 3)
    with pytest.raises(NasqError, match="do not hold"):
        LIB.gemm(np.zeros((2, 11), np.int8), w, 4)
    with pytest.raises(NasqError, match="ISA"):
        LIB.gemm(np.zeros((2, 10), np.int8), w, 4, isa="sse9")


# ------------------------------------------------------------------------------------ the attention core
def ref_attention(q, k, v, key_bias):
    """``nasq.kernels.int_bert``'s XLA attention core (the formula native.attention must follow)."""
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.float32(q.shape[-1])) + key_bias[:, None, None, :]
    return np.asarray(jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v))


def ref_attention_f64(q, k, v, key_bias):
    """The same formula in numpy float64 (no compilation per shape, for the property test)."""
    q, k, v, kb = (np.asarray(a, np.float64) for a in (q, k, v, key_bias))
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1]) + kb[:, None, None, :]
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bhqk,bkhd->bqhd", p / p.sum(-1, keepdims=True), v)


def attention_inputs(rng, b, s, h, d, masked: float):
    q, k, v = (rng.normal(0, 2, (b, s, h, d)).astype(np.float32) for _ in range(3))
    keep = rng.random((b, s)) >= masked
    keep[:, 0] = True
    if b > 1:
        keep[-1] = False  # a row with every key masked: uniform weights, as softmax gives
    return q, k, v, np.where(keep, 0.0, np.finfo(np.float32).min).astype(np.float32)


@needs_lib
@SETTINGS
@given(b=st.integers(1, 4), s=st.integers(1, 80), h=st.integers(1, 5), d=st.sampled_from([1, 5, 8, 16, 24, 32, 64, 72]),
       masked=st.sampled_from([0.0, 0.3]), seed=st.integers(0, 2**31 - 1))
def test_attention_matches_xla_formula(b, s, h, d, masked, seed):
    """Every ISA path (AVX2 vectors for head sizes 8..64 in steps of 8, plain C++ otherwise) against the XLA path's
    formula in float64, masks and fully masked rows included: equal up to fp32 rounding."""
    q, k, v, kb = attention_inputs(np.random.default_rng(seed), b, s, h, d, masked)
    want = ref_attention_f64(q, k, v, kb)
    for isa in ISAS:
        got = LIB.attention(q, k, v, kb, isa=isa)
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * max(1.0, float(np.abs(want).max())), err_msg=isa)


@needs_lib
def test_attention_ffi_threads_and_errors():
    """Through jit (XLA's pool) at a size split over the threads, and on the kernel's own threads: the same values
    as the C ABI; the model's shape (MiniLM heads) included; bad shapes refused."""
    rng = np.random.default_rng(3)
    q, k, v, kb = attention_inputs(rng, 6, 64, 12, 32, 0.25)
    want = LIB.attention(q, k, v, kb)
    f = jax.jit(native.attention)
    start = native.xla_pool()
    try:
        for on in (True, False):
            native.set_xla_pool(on)
            np.testing.assert_array_equal(np.asarray(f(q, k, v, kb)), want)
    finally:
        native.set_xla_pool(start)
    np.testing.assert_allclose(want, ref_attention(q, k, v, kb), rtol=2e-5, atol=2e-5 * float(np.abs(want).max()))
    with pytest.raises(NasqError, match="one shape"):
        native.attention(q, k[:, :3], v, kb)
    with pytest.raises(NasqError, match="key_bias"):
        LIB.attention(q, k, v, kb[:, :3])
    assert LIB.attention(q[:0], k[:0], v[:0], kb[:0]).shape == (0, 64, 12, 32)
    q[0, 3, 1, 5] = np.nan  # an overflowed score poisons its own (query, head) row, as in XLA, and nothing else
    for isa in ISAS:
        got = LIB.attention(q, k, v, kb, isa=isa)
        assert np.isnan(got[0, 3, 1]).all() and np.isnan(got).sum() == 32, isa


# ------------------------------------------------------------------------------------ through JAX (the FFI)
@needs_lib
@JIT_SETTINGS
@given(lead=st.sampled_from([(), (3,), (2, 5)]), k=st.integers(1, 150), n=st.integers(1, 30),
       bits=st.integers(1, 8), seed=st.integers(0, 2**31 - 1))
def test_ffi_int_gemm_matches_numpy_and_xla(lead, k, n, bits, seed):
    """native int32 (eager and under jit, leading batch dims) == numpy int64 == XLA's int8 dot."""
    rng = np.random.default_rng(seed)
    x = random_x(rng, int(np.prod(lead, dtype=int)), k).reshape(*lead, k)
    codes = random_codes(rng, n, k, bits)
    w = jnp.asarray(pack_codes(codes, bits))
    want = ref_acc(x.reshape(-1, k), codes).reshape(*lead, n)
    np.testing.assert_array_equal(np.asarray(int8_matmul(jnp.asarray(x), jnp.asarray(codes)), np.int64), want)
    for isa in ISAS:
        got = jax.jit(lambda x, w, isa=isa: native.int_gemm(x, w, bits, isa=isa))(jnp.asarray(x), w)
        assert got.dtype == jnp.int32 and got.shape == (*lead, n)
        np.testing.assert_array_equal(np.asarray(got, np.int64), want, err_msg=isa)
    np.testing.assert_array_equal(np.asarray(native.int_gemm(jnp.asarray(x), w, bits), np.int64), want)


sizes_bits = st.lists(st.tuples(st.integers(1, 9), st.integers(0, 8)), min_size=1, max_size=6)


@needs_lib
@JIT_SETTINGS
@given(groups=sizes_bits, k=st.integers(1, 130), has_bias=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_packed_linear_native_vs_xla(groups, k, has_bias, seed):
    """Mixed segments and pruned groups: kept-row int32 accumulators native == XLA == numpy int64 (exact), and
    ``packed_linear_apply`` outputs (jit, batch dims, scatter and compact) agree to fp32 rounding."""
    rng = np.random.default_rng(seed)
    sizes, bits = [g[0] for g in groups], [g[1] for g in groups]
    w = (rng.standard_normal((sum(sizes), k)) * 0.05).astype(np.float32)
    bias = rng.standard_normal(sum(sizes)).astype(np.float32) if has_bias else None
    p = pack_linear(w, bias, sizes, bits, (rng.random(len(sizes)) * 0.02 + 1e-3).astype(np.float32))
    x = jnp.asarray(rng.standard_normal((2, 3, k)).astype(np.float32))
    xq, _ = quantize_act_int8(x)

    codes = [unpack_codes(np.asarray(pk), b, k, xp=np) for b, pk in p.segments]
    want = ref_acc(np.asarray(xq).reshape(-1, k), np.concatenate(codes) if codes else np.zeros((0, k), np.int8))

    def f(x, p, kernel):  # one compilation per kernel
        xq, _ = quantize_act_int8(x)
        return (kept_rows_int(xq, p, kernel), packed_linear_apply(x, p, "scatter", kernel),
                packed_linear_apply(x, p, "compact", kernel))

    (acc_n, yn, cn), (acc_x, yx, cx) = (jax.jit(f, static_argnums=2)(x, p, kern) for kern in ("native", "xla"))
    for acc in (acc_n, acc_x):
        np.testing.assert_array_equal(np.asarray(acc, np.int64).reshape(want.shape), want)
    for got, ref in ((yn, yx), (cn, cx)):
        assert got.shape == ref.shape
        ref = np.asarray(ref)
        atol = 1e-6 * max(1.0, float(np.abs(ref).max(initial=0)))
        np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-6, atol=atol)


@needs_lib
@pytest.mark.parametrize("isa", ISAS)
def test_packed_linear_each_isa(isa, monkeypatch):
    """NASQ_NATIVE_ISA forces a path through ``packed_linear_apply`` (read when traced)."""
    rng = np.random.default_rng(3)
    sizes, bits = [16, 8, 8, 16, 24], [4, 0, 8, 1, 3]
    w = (rng.standard_normal((72, 200)) * 0.05).astype(np.float32)
    p = pack_linear(w, rng.standard_normal(72).astype(np.float32), sizes, bits, np.full(5, 0.01, np.float32))
    x = jnp.asarray(rng.standard_normal((4, 9, 200)).astype(np.float32))
    yx = np.asarray(jax.jit(lambda x, p: packed_linear_apply(x, p, kernel="xla"))(x, p))
    monkeypatch.setenv("NASQ_NATIVE_ISA", isa)
    yn = np.asarray(jax.jit(lambda x, p: packed_linear_apply(x, p, kernel="native"))(x, p))
    np.testing.assert_allclose(yn, yx, rtol=1e-6, atol=1e-6 * float(np.abs(yx).max()))


@needs_lib
def test_kernel_selection(monkeypatch):
    assert native.resolve_kernel("xla") == "xla"
    assert native.describe("xla").startswith("xla")
    monkeypatch.setenv("NASQ_KERNEL", "xla")
    assert native.resolve_kernel() == "xla"
    monkeypatch.setenv("NASQ_KERNEL", "auto")
    assert native.resolve_kernel() == ("native" if native.available() else "xla")
    assert native.describe().startswith("native" if native.available() else "xla (")
    if native.available():
        assert native.describe() == f"native {LIB.best_isa()}, {LIB.num_threads()} threads"
    monkeypatch.setenv("NASQ_KERNEL", "fast")
    with pytest.raises(NasqError, match="NASQ_KERNEL"):
        native.resolve_kernel()
    p = pack_linear(np.ones((4, 8), np.float32), None, [4], [4], np.array([0.1], np.float32))
    with pytest.raises(NasqError, match="kernel"):
        packed_linear_apply(jnp.ones((2, 8)), p, kernel="gpu")
    missing = [isa for isa in ("avx2", "avx512-vnni") if isa not in ISAS]
    if missing:
        with pytest.raises(NasqError, match="does not support"):
            native.int_gemm(jnp.zeros((2, 8), jnp.int8), jnp.asarray(pack_codes(np.ones((4, 8), np.int8), 4)), 4,
                            isa=missing[0])


def test_fallback_to_xla_without_library(monkeypatch):
    """No library (or one that failed to load): "auto" runs XLA, describe() says why, "native" refuses."""
    monkeypatch.setattr(native, "_load", lambda: (None, "native library not built: (test)"))
    monkeypatch.delenv("NASQ_KERNEL", raising=False)
    assert not native.available()
    assert native.resolve_kernel() == "xla"
    assert native.describe() == "xla (native library not built: (test))"
    with pytest.raises(NasqError, match="not built"):
        native.resolve_kernel("native")
    rng = np.random.default_rng(0)
    p = pack_linear(rng.standard_normal((8, 20)).astype(np.float32), None, [4, 4], [2, 4],
                    np.array([0.3, 0.1], np.float32))
    x = jnp.asarray(rng.standard_normal((3, 20)).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(packed_linear_apply(x, p)),
                                  np.asarray(packed_linear_apply(x, p, kernel="xla")))


# --------------------------------------------------------------------------------------- whole integer BERT
@pytest.fixture(scope="module")
def artifact(tiny_model_dir, tmp_path_factory):
    from test_export import build_quant_model

    from nasq.export.writer import export_model

    model, plan = build_quant_model(tiny_model_dir, seed=11)
    return export_model(model, plan, tmp_path_factory.mktemp("nk") / "m.nasq", task="sst2", num_labels=2,
                        source_dir=tiny_model_dir)


@needs_lib
def test_int_bert_native_vs_xla(artifact):
    """A whole tiny integer BERT: same predictions, logits equal to fp32 rounding, on both kernels (and the
    native kernel on resident int8 codes, ``unpack="load"``, equal to packed to the last fp32 bit)."""
    from nasq.export.reader import load_artifact

    rng = np.random.default_rng(5)
    ids = rng.integers(1000, 30000, (4, 12)).astype(np.int32)
    am = np.ones_like(ids)
    am[1, 8:] = 0
    logits = {}
    for unpack, kernel in (("fused", "native"), ("fused", "xla"), ("load", "native")):
        im = load_artifact(artifact, unpack=unpack)
        m = type(im)(dataclasses.replace(im.meta, kernel=kernel), im.params)
        logits[unpack, kernel] = np.asarray(m(ids, None, am))
    ref = logits["fused", "xla"]
    for key, got in logits.items():
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max()), err_msg=str(key))
        np.testing.assert_array_equal(got.argmax(-1), ref.argmax(-1))
    # resident codes vs packed: equal to the last fp32 bit (bit-identical at XLA's default optimisation level; the
    # tests compile at -O0 (conftest), where XLA may order an fp32 reduction differently in the two programs)
    np.testing.assert_allclose(logits["load", "native"], logits["fused", "native"], rtol=1e-6, atol=0)
    # the attention core chosen apart from the GEMM: native and XLA cores agree to fp32 rounding (the int8
    # re-quantization of the next linear can amplify a last-bit difference by one code step)
    im = load_artifact(artifact)
    cores = {core: np.asarray(type(im)(dataclasses.replace(im.meta, attention=core), im.params)(ids, None, am))
             for core in ("native", "xla")}
    np.testing.assert_allclose(cores["native"], cores["xla"], rtol=1e-3, atol=1e-3 * float(np.abs(ref).max()))
    np.testing.assert_array_equal(cores["native"].argmax(-1), cores["xla"].argmax(-1))
    with pytest.raises(NasqError, match="attention="):
        type(im)(dataclasses.replace(im.meta, attention="fast"), im.params)


# --------------------------------------------------------------------------- AVX-512 VNNI path, emulated
SOURCE = Path(native.__file__).with_name("nasq_kernels.cc")


@pytest.fixture(scope="module")
def emulated_lib(tmp_path_factory):
    """The kernels compiled against SIMDe's emulation of the AVX2/AVX-512 intrinsics (C ABI only)."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None or not Path("/usr/include/simde/x86/avx512.h").is_file():
        pytest.skip("needs a C++ compiler and SIMDe headers (apt-get install libsimde-dev)")
    out = tmp_path_factory.mktemp("simde") / "libnasq_simde.so"
    cmd = [cxx, "-std=c++17", "-O1", "-fPIC", "-shared", "-pthread", "-ffp-contract=off", "-DNASQ_SIMDE",
           "-DNASQ_NO_FFI", str(SOURCE), "-o", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    return native.Library(out)


EMULATED = ("avx512-vnni", "avx-vnni", "avx2")  # every SIMD path, emulated


@pytest.mark.skipif("avx512-vnni" in ISAS and "avx-vnni" in ISAS, reason="the CPU runs both VNNI paths above")
def test_emulated_vnni_exact(emulated_lib):
    """Both VNNI paths (and AVX2) under SIMDe: exact accumulators, the fused epilogue, segments, resident panels;
    the attention core's AVX2 path too (to fp32 rounding)."""
    rng = np.random.default_rng(11)
    for m, k, n, bits in [(1, 1, 1, 1), (5, 63, 7, 2), (9, 64, 4, 3), (13, 130, 17, 4), (4, 200, 9, 5),
                          (7, 129, 5, 6), (3, 77, 11, 7), (21, 700, 33, 8), (40, 1100, 50, 4)]:
        x, codes = random_x(rng, m, k), random_codes(rng, n, k, bits)
        w = pack_codes(codes, bits)
        sx, rs, bias = (rng.random(m).astype(np.float32), rng.random(n).astype(np.float32),
                        rng.standard_normal(n).astype(np.float32))
        for isa in EMULATED:
            np.testing.assert_array_equal(emulated_lib.gemm(x, w, bits, isa=isa), ref_acc(x, codes),
                                          err_msg=f"{isa} {m}x{k}x{n} b{bits}")
            want = ref_epilogue(ref_acc(x, codes), sx, rs, bias)
            got = emulated_lib.gemm(x, w, bits, isa=isa, sx=sx, row_scale=rs, bias=bias)
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * float(np.abs(want).max()))
    segments, codes = random_segments(rng, 333, [(2, 70), (3, 33), (4, 41), (8, 17), (1, 9)])
    x = random_x(rng, 19, 333)
    for isa in EMULATED:
        np.testing.assert_array_equal(emulated_lib.gemm_segments(x, segments, isa=isa), ref_acc(x, codes),
                                      err_msg=f"{isa} segments")
        panels = tuple((b, emulated_lib.prepack(w, b, 333, isa=isa)) for b, w in segments)
        np.testing.assert_array_equal(emulated_lib.gemm_segments(x, panels, isa=isa, rows=[w.shape[0] for _, w in
                                                                                          segments]),
                                      ref_acc(x, codes), err_msg=f"{isa} resident panels")
    for shape, masked in (((2, 70, 3, 32), 0.3), ((1, 9, 2, 16), 0.0), ((2, 5, 2, 12), 0.2)):
        q, k, v, kb = attention_inputs(rng, *shape, masked)
        want = ref_attention(q, k, v, kb)
        got = emulated_lib.attention(q, k, v, kb, isa="avx2")
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * max(1.0, float(np.abs(want).max())))
