import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nasq.errors import NasqError
from nasq.kernels.int_linear import (
    EmbeddingTable,
    PackedLinear,
    embedding_lookup,
    int8_matmul,
    pack_linear,
    packed_linear_apply,
    unpack_embedding,
)
from nasq.quant.packing import tensor_nbytes
from nasq.quant.quantizer import fake_quant_act_int8, fake_quant_mixed, init_group_scales

IN, OUT = 48, 40
SIZES = [8, 8, 8, 8, 8]
BITS = [4, 0, 8, 1, 2]


def _layer(seed=0, bits=BITS, sizes=SIZES, mode="symmetric"):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((sum(sizes), IN)) * 0.05).astype(np.float32)
    b = (rng.standard_normal(sum(sizes)) * 0.1).astype(np.float32)
    scales = np.array(
        [init_group_scales(w, sizes, max(bb, 1), mode)[g] for g, bb in enumerate(bits)], np.float32
    )
    return w, b, scales


def reference_linear(x, w_rows, bias, group_sizes, bits_per_group, scales_per_group, mode="symmetric"):
    """The fake-quant path the integer kernel must match: ``fq_act(x) @ fake_quant_mixed(W).T + b * kept``."""
    sizes = np.asarray(group_sizes)
    bits_rows = np.repeat(np.asarray(bits_per_group), sizes)
    scale_rows = np.repeat(np.asarray(scales_per_group, np.float32), sizes)
    wq = fake_quant_mixed(jnp.asarray(w_rows, jnp.float32), scale_rows, bits_rows, mode)
    y = fake_quant_act_int8(x) @ wq.T
    if bias is not None:
        y = y + jnp.asarray(bias, jnp.float32) * jnp.asarray(bits_rows != 0, jnp.float32)
    return y


def test_int8_matmul_exact():
    rng = np.random.default_rng(0)
    x = rng.integers(-128, 128, size=(2, 3, 384)).astype(np.int8)
    w = rng.integers(-128, 128, size=(5, 384)).astype(np.int8)
    x[0, 0, :] = -128
    w[0, :] = -128  # extreme: 384 * 128^2 still fits int32
    ref = np.einsum("bsi,oi->bso", x.astype(np.int64), w.astype(np.int64))
    out = int8_matmul(jnp.asarray(x), jnp.asarray(w))
    assert out.dtype == jnp.int32 and out.shape == (2, 3, 5)
    np.testing.assert_array_equal(np.asarray(out, np.int64), ref)


@pytest.mark.parametrize("mode", ["symmetric", "signed"])
def test_packed_linear_matches_fake_quant(mode):
    w, b, scales = _layer(mode=mode)
    p = pack_linear(w, b, SIZES, BITS, scales, mode)
    assert p.nbytes() == tensor_nbytes(SIZES, IN, BITS, has_bias=True)
    assert [bits for bits, _ in p.segments] == [1, 2, 4, 8]
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 7, IN)).astype(np.float32))
    ref = reference_linear(x, w, b, SIZES, BITS, scales, mode)
    out = jax.jit(packed_linear_apply)(x, p)
    assert out.shape == (2, 7, OUT)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5 * float(jnp.abs(ref).max()))
    pruned = np.repeat(np.asarray(BITS) == 0, SIZES)
    assert np.all(np.asarray(out)[..., pruned] == 0.0)
    compact = jax.jit(packed_linear_apply, static_argnames="output")(x, p, output="compact")
    assert compact.shape == (2, 7, p.kept_rows)
    np.testing.assert_array_equal(np.asarray(out)[..., np.asarray(p.out_index)], compact)


def test_byte_count_without_bias_and_all_pruned():
    w, _, scales = _layer()
    p = pack_linear(w, None, SIZES, BITS, scales)
    assert p.bias is None and p.nbytes() == tensor_nbytes(SIZES, IN, BITS, has_bias=False)
    p0 = pack_linear(w, None, SIZES, [0] * 5, scales)
    assert p0.nbytes() == 0
    out = packed_linear_apply(jnp.ones((3, IN)), p0)
    np.testing.assert_array_equal(out, np.zeros((3, OUT)))
    with pytest.raises(NasqError):
        pack_linear(w, None, SIZES, BITS[:3], scales)


def test_packed_linear_is_pytree_with_static_ints_and_no_retrace():
    w, b, scales = _layer()
    p = pack_linear(w, b, SIZES, BITS, scales)
    leaves = jax.tree_util.tree_leaves(p)
    assert all(hasattr(leaf, "dtype") for leaf in leaves)  # bits / sizes are aux data, not leaves
    traces = []

    def f(x, p):
        traces.append(1)
        return packed_linear_apply(x, p)

    jf = jax.jit(f)
    x = jnp.ones((2, IN))
    jf(x, p)
    w2, b2, s2 = _layer(seed=5)
    p2 = pack_linear(w2, b2, SIZES, BITS, s2)
    jf(x * 2, p2)
    assert len(traces) == 1
    p3 = jax.tree_util.tree_map(lambda a: a, p)
    assert isinstance(p3, PackedLinear) and p3.segments[0][0] == 1 and p3.in_features == IN


def test_embedding_lookup_matches_fake_quant():
    rng = np.random.default_rng(2)
    sizes, bits = [10, 10, 10, 10], [8, 0, 4, 2]
    table = (rng.standard_normal((40, 16)) * 0.1).astype(np.float32)
    scales = init_group_scales(table, sizes, 4)
    p = pack_linear(table, None, sizes, bits, scales)  # an embedding: vocabulary row groups, no bias
    assert p.nbytes() == tensor_nbytes(sizes, 16, bits, has_bias=False)
    t = unpack_embedding(p)
    assert isinstance(t, EmbeddingTable) and t.codes.dtype == jnp.int8
    ids = jnp.array([[0, 5, 12, 25, 39], [11, 19, 30, 1, 2]])
    ref = fake_quant_mixed(jnp.asarray(table), np.repeat(scales, sizes), np.repeat(bits, sizes))
    out = jax.jit(embedding_lookup)(ids, t)
    np.testing.assert_array_equal(out, ref[ids])
    assert not np.any(np.asarray(out)[0, 2]) and not np.any(np.asarray(out)[1, 1])
    np.testing.assert_array_equal(embedding_lookup(ids, p), out)
