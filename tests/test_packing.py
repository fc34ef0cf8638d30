import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tiers import examples

from nasq.errors import NasqError
from nasq.quant.packing import (
    V1_CONTAINER_BITS,
    V1_REPACKED_WIDTHS,
    _stream_fields,
    group_nbytes,
    pack_codes,
    packed_row_bytes,
    tensor_nbytes,
    unpack_codes,
)


def _random_codes(rng, rows, cols, bits):
    if bits == 1:
        return rng.choice(np.array([-1, 1], np.int8), size=(rows, cols))
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return rng.integers(lo, hi + 1, size=(rows, cols)).astype(np.int8)


def _ref_bitstream(codes, bits):
    """Reference dense layout with Python integers: row = sum_j field_j << (j*b), little-endian bytes."""
    rows, cols = codes.shape
    nbytes = -(-cols * bits // 8)
    out = np.zeros((rows, nbytes), np.uint8)
    for r in range(rows):
        v = 0
        for j, c in enumerate(codes[r].tolist()):
            v |= ((1 if c > 0 else 0) if bits == 1 else (c & ((1 << bits) - 1))) << (j * bits)
        out[r] = np.frombuffer(v.to_bytes(nbytes, "little"), np.uint8)
    return out


def _v1_pack(codes, bits):
    """Artifact format 1 packer (containers 1,2,4,4,8,8,8,8; fields little-endian inside each byte), verbatim."""
    c = V1_CONTAINER_BITS[bits]
    rows, cols = codes.shape
    if c == 8:
        return np.ascontiguousarray(codes.astype(np.int8).view(np.uint8))
    per_byte = 8 // c
    nbytes = -(-cols * c // 8)
    fields = (codes > 0).astype(np.uint8) if bits == 1 else (codes.astype(np.int16) & ((1 << c) - 1)).astype(np.uint8)
    padded = np.zeros((rows, nbytes * per_byte), np.uint8)
    padded[:, :cols] = fields
    shifts = (np.arange(per_byte, dtype=np.uint8) * c).astype(np.uint8)
    return np.bitwise_or.reduce(padded.reshape(rows, nbytes, per_byte) << shifts, axis=-1).astype(np.uint8)


@settings(max_examples=examples(80), deadline=None)
@given(bits=st.integers(1, 8), rows=st.integers(0, 5), cols=st.integers(1, 41), seed=st.integers(0, 2**16))
def test_pack_unpack_roundtrip_numpy(bits, rows, cols, seed):
    """Every width 1..8, any cols (not only multiples of 8): b bits per code, the reference bitstream, lossless."""
    codes = _random_codes(np.random.default_rng(seed), rows, cols, bits)
    packed = pack_codes(codes, bits)
    assert packed.dtype == np.uint8 and packed.shape == (rows, math.ceil(cols * bits / 8))
    assert packed_row_bytes(cols, bits) == math.ceil(cols * bits / 8)
    np.testing.assert_array_equal(packed, _ref_bitstream(codes, bits))
    out = unpack_codes(packed, bits, cols, xp=np)
    assert out.dtype == np.int8
    np.testing.assert_array_equal(out, codes)


@settings(max_examples=examples(30), deadline=None)
@given(bits=st.integers(1, 8), lead=st.lists(st.integers(1, 3), min_size=0, max_size=2),
       cols=st.integers(1, 27), seed=st.integers(0, 2**16))
def test_unpack_numpy_equals_jnp(bits, lead, cols, seed):
    """``xp=np`` and ``jax.numpy`` unpack the same codes, for any leading shape."""
    n = int(np.prod(lead)) if lead else 1
    codes = _random_codes(np.random.default_rng(seed), n, cols, bits)
    packed = pack_codes(codes, bits).reshape(*lead, -1)
    a = unpack_codes(packed, bits, cols, xp=np)
    b = np.asarray(unpack_codes(jnp.asarray(packed), bits, cols))
    assert a.shape == b.shape == (*lead, cols) and b.dtype == np.int8
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a.reshape(n, cols), codes)


@settings(max_examples=examples(40), deadline=None)
@given(bits=st.sampled_from([1, 2, 4, 8]), rows=st.integers(1, 4), cols=st.integers(1, 41),
       seed=st.integers(0, 2**16))
def test_widths_dividing_8_keep_the_v1_layout(bits, rows, cols, seed):
    """For 1, 2, 4, 8 bits the dense bitstream is artifact format 1's layout, byte for byte."""
    assert V1_CONTAINER_BITS[bits] == bits and bits not in V1_REPACKED_WIDTHS
    codes = _random_codes(np.random.default_rng(seed), rows, cols, bits)
    packed = pack_codes(codes, bits)
    np.testing.assert_array_equal(packed, _v1_pack(codes, bits))
    # unpack's per-byte fast path for these widths reads the same fields as the general bitstream path
    fields = _stream_fields(packed.astype(np.int32), bits, cols, np)
    np.testing.assert_array_equal(fields, codes.astype(np.int32) & ((1 << bits) - 1) if bits > 1 else codes > 0)
    np.testing.assert_array_equal(unpack_codes(packed, bits, cols, xp=np), codes)


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_unpack_roundtrip_jax_jit(bits):
    cols = 13
    codes = _random_codes(np.random.default_rng(bits), 3, cols, bits)
    packed = pack_codes(codes, bits)
    out = jax.jit(unpack_codes, static_argnums=(1, 2))(jnp.asarray(packed), bits, cols)
    assert out.dtype == jnp.int8
    np.testing.assert_array_equal(np.asarray(out), codes)


def test_layout_little_endian_twos_complement():
    # 2 bits: [1, -1, 0, -2] -> fields 01, 11, 00, 10 -> 0b10_00_11_01
    assert pack_codes(np.array([[1, -1, 0, -2]], np.int8), 2)[0, 0] == 0b10001101
    # 4 bits: [-1, 3] -> 0x3F
    assert pack_codes(np.array([[-1, 3]], np.int8), 4)[0, 0] == 0x3F
    # 3 bits, dense: [-4, 3, -1] -> fields 100, 011, 111 -> stream bits 0..8 = 001 110 111 -> 0b11_011_100, 0b1
    np.testing.assert_array_equal(pack_codes(np.array([[-4, 3, -1]], np.int8), 3), [[0b11011100, 0b1]])
    # 5 bits: [-16, 15] -> 10000, 01111 -> 0b111_10000, 0b01 (code 1 straddles the byte boundary)
    np.testing.assert_array_equal(pack_codes(np.array([[-16, 15]], np.int8), 5), [[0b11110000, 0b01]])
    # 7 bits: 8 codes of -1 fill exactly 7 bytes of 0xFF
    np.testing.assert_array_equal(pack_codes(np.full((1, 8), -1, np.int8), 7), [[255] * 7])
    # binary: +1 -> 1, -1 -> 0, first element lowest bit; 9 cols -> 2 bytes
    p = pack_codes(np.array([[1, -1, -1, 1, -1, -1, -1, -1, 1]], np.int8), 1)
    np.testing.assert_array_equal(p, [[0b00001001, 0b1]])
    # 8 bits: int8 bytes
    np.testing.assert_array_equal(pack_codes(np.array([[-128, 127, -1]], np.int8), 8), [[128, 127, 255]])


def test_pack_validates_range():
    with pytest.raises(NasqError):
        pack_codes(np.array([[2]], np.int8), 2)
    with pytest.raises(NasqError):
        pack_codes(np.array([[0, 1]], np.int8), 1)
    with pytest.raises(NasqError):
        pack_codes(np.array([[8]], np.int8), 4)
    with pytest.raises(NasqError):
        pack_codes(np.array([[0]], np.int8), 0)


def test_byte_counts():
    assert V1_REPACKED_WIDTHS == (3, 5, 6, 7)
    assert [packed_row_bytes(384, b) for b in range(1, 9)] == [48 * b for b in range(1, 9)]  # b bits per code
    assert packed_row_bytes(385, 2) == 97
    assert packed_row_bytes(385, 3) == 145  # ceil(1155 / 8)
    assert packed_row_bytes(3, 7) == 3
    with pytest.raises(NasqError, match="packable widths"):
        packed_row_bytes(10, 9)
    assert group_nbytes(3, 384, 0) == 0
    assert group_nbytes(3, 384, 4) == 3 * 192 + 4 + 3 * 4
    assert group_nbytes(3, 384, 4, has_bias=False) == 3 * 192 + 4
    assert tensor_nbytes([2, 2, 1], 10, [0, 2, 8]) == 0 + (2 * 3 + 4 + 8) + (10 + 4 + 4)
    with pytest.raises(NasqError):
        tensor_nbytes([2, 2], 10, [2])
    with pytest.raises(NasqError):
        group_nbytes(2, 10, 9)
