import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nasq.errors import NasqError
from nasq.quant.packing import (
    CONTAINER_BITS,
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


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), rows=st.integers(1, 5), cols=st.integers(1, 41), seed=st.integers(0, 2**16))
def test_pack_unpack_roundtrip_numpy(bits, rows, cols, seed):
    codes = _random_codes(np.random.default_rng(seed), rows, cols, bits)
    packed = pack_codes(codes, bits)
    assert packed.dtype == np.uint8 and packed.shape == (rows, packed_row_bytes(cols, bits))
    out = unpack_codes(packed, bits, cols, xp=np)
    assert out.dtype == np.int8
    np.testing.assert_array_equal(out, codes)


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
    # 4 bits: [-1, 3] -> 0x3F ; 3 bits use a 4-bit container too
    assert pack_codes(np.array([[-1, 3]], np.int8), 4)[0, 0] == 0x3F
    assert pack_codes(np.array([[-4, 3]], np.int8), 3)[0, 0] == 0x3C
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
    assert CONTAINER_BITS == {1: 1, 2: 2, 3: 4, 4: 4, 5: 8, 6: 8, 7: 8, 8: 8}
    assert packed_row_bytes(384, 1) == 48
    assert packed_row_bytes(384, 2) == 96
    assert packed_row_bytes(385, 2) == 97
    assert packed_row_bytes(384, 3) == 192
    assert packed_row_bytes(384, 5) == 384
    assert group_nbytes(3, 384, 0) == 0
    assert group_nbytes(3, 384, 4) == 3 * 192 + 4 + 3 * 4
    assert group_nbytes(3, 384, 4, has_bias=False) == 3 * 192 + 4
    assert tensor_nbytes([2, 2, 1], 10, [0, 2, 8]) == 0 + (2 * 3 + 4 + 8) + (10 + 4 + 4)
    with pytest.raises(NasqError):
        tensor_nbytes([2, 2], 10, [2])
    with pytest.raises(NasqError):
        group_nbytes(2, 10, 9)
