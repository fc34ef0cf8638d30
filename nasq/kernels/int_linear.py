"""Integer inference path of one linear layer (and of an embedding table).

``y = x W^T + b`` with mixed-precision row groups becomes::

    xq, sx = quantize_act_int8(x)                      # per-token int8, sx [..., 1]
    Wq     = concat_b unpack(packed_b)                 # int8 [R_kept, in], fused under jit
    acc    = xq . Wq^T                                 # int8 x int8 -> int32 (lax.dot_general)
    y_k    = acc * sx * row_scale + bias               # fp32 [..., R_kept]

Pruned (0-bit) groups are physically absent: they are never unpacked or multiplied. ``output="scatter"``
writes ``y_k`` back to the original row positions (zeros at pruned rows; computed as a gather,
``scatter_rows``); ``output="compact"`` returns the kept rows in segment order for a consumer whose input
columns are compacted the same way.

This agrees with the fake-quant path ``fake_quant_act_int8(x) @ fake_quant_mixed(W).T + b`` up to fp32
summation order (the integer dot product is exact; the fp32 one rounds).

**Kernels.** The three lines after the activation quantization run either as XLA ops (above: unpack, int8
``dot_general``, epilogue) or as one native C++ call per segment (``nasq.kernels.native``: the packed codes are
unpacked in small tiles inside the kernel, AVX512-VNNI / AVX-VNNI / AVX2 / scalar, multi-threaded, fused epilogue).
Both give bit-identical int32 accumulators, and the native epilogue rounds like XLA's CPU code
(``fma(acc * sx, row_scale, bias)``), so the outputs agree to the last bit where XLA contracts alike. Pick with
``kernel=`` on :func:`packed_linear_apply` (``"auto"``: native when available, ``"native"``, ``"xla"``); the
default ``None`` reads ``NASQ_KERNEL`` (default ``"auto"``), at trace time.

What ``PackedLinear`` stores vs derives (the artifact stores the first list, the plan gives the rest):

* stored: ``segments`` (packed codes per bit width), ``group_scale`` (one fp32 per *kept* group, segment
  order), ``bias`` (fp32 per kept row or None). ``nbytes()`` counts exactly these and equals
  ``nasq.quant.packing.tensor_nbytes`` of the plan.
* derived (from the plan's group sizes and bits): ``row_scale = repeat(group_scale, kept_group_sizes)``
  (computed inside jit, never stored), and ``out_index`` (original row of every kept row; carried as an int32
  leaf for the scatter, not counted as payload).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from nasq.errors import NasqError
from nasq.kernels import native
from nasq.quant.packing import BIAS_BYTES, SCALE_BYTES, pack_rows, packed_row_bytes, unpack_codes
from nasq.quant.quantizer import quantize_act_int8


def int8_matmul(x_codes, w_codes):
    """``int8 [..., in] x int8 [rows, in] -> int32 [..., rows]`` (exact integer accumulation)."""
    x_codes = jnp.asarray(x_codes)
    w_codes = jnp.asarray(w_codes)
    return jax.lax.dot_general(
        x_codes,
        w_codes,
        dimension_numbers=(((x_codes.ndim - 1,), (1,)), ((), ())),
        preferred_element_type=jnp.int32,
    )


@jax.tree_util.register_pytree_node_class
@dataclass(frozen=True, eq=False)
class PackedLinear:
    """Bit-packed mixed-precision linear layer (a pytree; bit widths and sizes are static aux data).

    Attributes:
      segments: tuple of ``(bits, packed uint8 [R_b, packed_row_bytes(in, bits)])``, one per distinct
        non-zero width, ascending bits; rows within a segment keep their original order.
      group_scale: fp32 ``[G_kept]``, one step per kept group, segment order.
      bias: fp32 ``[R_kept]`` (kept rows, segment order) or None.
      out_index: int32 ``[R_kept]``, original row index of each kept row.
      kept_group_sizes: static tuple, rows of each kept group (segment order).
      in_features, out_features: static ints.
    """

    segments: tuple
    group_scale: Any
    bias: Any
    out_index: Any
    kept_group_sizes: tuple
    in_features: int
    out_features: int

    def tree_flatten(self):
        bits = tuple(int(b) for b, _ in self.segments)
        packed = tuple(p for _, p in self.segments)
        children = (packed, self.group_scale, self.bias, self.out_index)
        aux = (bits, self.kept_group_sizes, self.in_features, self.out_features)
        return children, aux

    @classmethod
    def tree_unflatten(cls, aux, children):
        bits, kept_group_sizes, in_features, out_features = aux
        packed, group_scale, bias, out_index = children
        return cls(
            tuple(zip(bits, packed, strict=True)),
            group_scale,
            bias,
            out_index,
            kept_group_sizes,
            in_features,
            out_features,
        )

    @property
    def kept_rows(self) -> int:
        return int(sum(self.kept_group_sizes))

    @property
    def row_scale(self):
        """fp32 ``[R_kept]``: each kept row's group scale (derived; static repeat counts, jit friendly)."""
        if not self.kept_group_sizes:
            return jnp.zeros((0,), jnp.float32)
        return jnp.repeat(
            jnp.asarray(self.group_scale, jnp.float32),
            np.asarray(self.kept_group_sizes),
            total_repeat_length=self.kept_rows,
        )

    def unpacked_codes(self):
        """int8 ``[R_kept, in]`` codes of all kept rows, segment order."""
        if not self.segments:
            return jnp.zeros((0, self.in_features), jnp.int8)
        parts = [unpack_codes(p, b, self.in_features) for b, p in self.segments]
        return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=0)

    def nbytes(self) -> int:
        """Stored payload bytes: packed codes + one fp32 scale per kept group + fp32 bias per kept row."""
        n = sum(int(np.prod(np.shape(p))) for _, p in self.segments)
        n += SCALE_BYTES * len(self.kept_group_sizes)
        if self.bias is not None:
            n += BIAS_BYTES * self.kept_rows
        return n


def _check_plan(rows: int, group_sizes, bits_per_group, scales_per_group):
    sizes = [int(r) for r in group_sizes]
    bits = [int(b) for b in bits_per_group]
    if any(r <= 0 for r in sizes) or sum(sizes) != rows:
        raise NasqError(f"group sizes {sizes} must be positive and sum to the {rows} weight rows")
    if len(bits) != len(sizes) or len(np.atleast_1d(scales_per_group)) != len(sizes):
        raise NasqError(
            f"{len(sizes)} groups but {len(bits)} bit widths and {len(np.atleast_1d(scales_per_group))} scales;"
            " give one of each per group"
        )
    for b in bits:
        if not 0 <= b <= 8:
            raise NasqError(f"bit width {b} is outside 0..8")
    return sizes, bits


def packed_linear(get, group_sizes: Sequence[int], bits_per_group: Sequence[int], cols: int, *,
                  has_bias: bool) -> PackedLinear:
    """A ``PackedLinear`` over stored arrays (the names of :func:`nasq.quant.packing.pack_rows`).

    ``get(name, shape, dtype)`` returns the stored array ``name`` (``seg{b}``, ``scale``, ``bias``) and checks
    its shape and dtype (the artifact reader raises a corrupt-artifact error there); out_index and the kept
    group sizes are derived from ``group_sizes`` and ``bits_per_group``.
    """
    sizes, bits = [int(r) for r in group_sizes], [int(b) for b in bits_per_group]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int)
    segments, kept_sizes, out_index = [], [], []
    for b in sorted({b for b in bits if b > 0}):
        sel = [g for g, gb in enumerate(bits) if gb == b]
        n = sum(sizes[g] for g in sel)
        segments.append((b, jnp.asarray(get(f"seg{b}", (n, packed_row_bytes(cols, b)), np.uint8))))
        kept_sizes += [sizes[g] for g in sel]
        out_index += [np.arange(starts[g], starts[g] + sizes[g]) for g in sel]
    k = sum(kept_sizes)
    scale = get("scale", (len(kept_sizes),), np.float32) if segments else np.zeros(0, np.float32)
    bias = None
    if has_bias:
        bias = jnp.asarray(get("bias", (k,), np.float32) if segments else np.zeros(0, np.float32))
    return PackedLinear(
        segments=tuple(segments), group_scale=jnp.asarray(scale), bias=bias,
        out_index=jnp.asarray(np.concatenate(out_index).astype(np.int32) if out_index else np.zeros(0, np.int32)),
        kept_group_sizes=tuple(kept_sizes), in_features=int(cols), out_features=int(sum(sizes)),
    )


def pack_linear(
    w_rows,
    bias,
    group_sizes: Sequence[int],
    bits_per_group: Sequence[int],
    scales_per_group,
    mode: str = "symmetric",
) -> PackedLinear:
    """Quantize and pack ``w_rows [out, in]`` (:func:`nasq.quant.packing.pack_rows`, the exporter's packer) and
    wrap the arrays as a ``PackedLinear``; pruned groups are dropped.

    ``scales_per_group`` ``[G]`` are the (learned) steps; entries of pruned groups are ignored.
    """
    w = np.asarray(w_rows, np.float32)
    if w.ndim != 2:
        raise NasqError(f"pack_linear expects a [out, in] weight, got shape {w.shape}")
    sizes, bits = _check_plan(w.shape[0], group_sizes, bits_per_group, scales_per_group)
    b_arr = None if bias is None else np.asarray(bias, np.float32).reshape(-1)
    if b_arr is not None and b_arr.shape[0] != w.shape[0]:
        raise NasqError(f"bias has {b_arr.shape[0]} entries but the weight has {w.shape[0]} rows")
    arrays = pack_rows(w, b_arr, sizes, bits, scales_per_group, mode)
    return packed_linear(lambda name, shape, dtype: arrays[name], sizes, bits, w.shape[1],
                         has_bias=b_arr is not None)


def kept_rows_apply(xq, sx, segments, row_scale, bias, kernel: str | None = None):
    """fp32 outputs of the kept rows: ``acc * sx * row_scale (+ bias)``, ``[..., R_kept]`` (segment order).

    ``xq, sx``: ``quantize_act_int8`` of the input; ``segments``: ``((bits, packed uint8 [R_b, bytes]), ...)``
    (``PackedLinear.segments``); ``row_scale``, ``bias`` (or None): fp32 ``[R_kept]``. XLA path: unpack all
    segments, one int8 ``dot_general``, elementwise epilogue; native path: one fused call for all segments."""
    if native.resolve_kernel(kernel) == "native":
        return native.int_linear_segments(xq, sx, segments, row_scale, bias)
    codes = [unpack_codes(packed, b, xq.shape[-1]) for b, packed in segments]
    return xla_rows_apply(xq, sx, codes[0] if len(codes) == 1 else jnp.concatenate(codes, axis=0), row_scale, bias)


def xla_rows_apply(xq, sx, codes, row_scale, bias):
    """The XLA integer path on unpacked codes ``int8 [R, in]``: ``int8_matmul(xq, codes) * sx * row_scale
    (+ bias)``, fp32 ``[..., R]`` (also the resident-codes path of ``nasq.kernels.int_bert``)."""
    y = int8_matmul(xq, codes).astype(jnp.float32) * sx * row_scale
    return y if bias is None else y + bias


def packed_linear_apply(x, p: PackedLinear, output: str = "scatter", kernel: str | None = None):
    """Integer forward of a ``PackedLinear``: ``x fp32 [..., in] -> fp32 [..., out]`` (or ``[..., R_kept]``).

    ``output="scatter"``: original row order, exact zeros at pruned rows. ``output="compact"``: kept rows in
    segment order (``p.out_index`` maps them back). ``kernel``: ``"auto"`` | ``"native"`` | ``"xla"``, or None
    for ``NASQ_KERNEL`` (module docstring); resolved when traced.
    """
    if output not in ("scatter", "compact"):
        raise NasqError(f"output={output!r}; use 'scatter' or 'compact'")
    x = jnp.asarray(x, jnp.float32)
    if x.shape[-1] != p.in_features:
        raise NasqError(f"input has {x.shape[-1]} features but the packed layer expects {p.in_features}")
    lead = x.shape[:-1]
    if p.kept_rows == 0:
        y = jnp.zeros((*lead, 0), jnp.float32)
    elif output == "scatter" and native.resolve_kernel(kernel) == "native":  # the whole linear in one call
        return native.linear(x, p.segments, p.row_scale, p.bias, p.out_index, p.out_features)
    else:
        xq, sx = quantize_act_int8(x)
        y = kept_rows_apply(xq, sx, p.segments, p.row_scale, p.bias, kernel)
    if output == "compact":
        return y
    return scatter_rows(y, p.out_index, p.out_features)


def scatter_rows(y, out_index, out_features: int):
    """``[..., R_kept]`` kept-row outputs -> ``[..., out_features]`` in original row order, 0 at pruned rows.

    The same values as ``zeros.at[..., out_index].set(y)``, computed as a gather (``take`` with an inverse
    index, out of range -> 0 at pruned rows): XLA's CPU scatter costs about as much as the matmul itself."""
    kept = y.shape[-1]
    if kept == 0:  # every row pruned
        return jnp.zeros((*y.shape[:-1], out_features), y.dtype)
    inverse = jnp.full((out_features,), kept, jnp.int32).at[out_index].set(jnp.arange(kept, dtype=jnp.int32))
    return jnp.take(y, inverse, axis=-1, mode="fill", fill_value=0)


# ----------------------------------------------------------------------------------------------- embeddings


class EmbeddingTable(NamedTuple):
    """Unpacked int8 embedding table for lookups: codes int8 ``[vocab, hidden]`` (zeros at pruned rows) and
    fp32 ``row_scale [vocab]`` (0 at pruned rows)."""

    codes: Any
    row_scale: Any


def unpack_embedding(p: PackedLinear) -> EmbeddingTable:
    """Unpack once (at load time) to a full int8 table + per-row scale in original row order."""
    codes = jnp.zeros((p.out_features, p.in_features), jnp.int8)
    scale = jnp.zeros((p.out_features,), jnp.float32)
    if p.kept_rows:
        codes = codes.at[p.out_index].set(p.unpacked_codes())
        scale = scale.at[p.out_index].set(p.row_scale)
    return EmbeddingTable(codes, scale)


def embedding_lookup(ids, table):
    """``table[ids]`` dequantized: ``codes[ids] * row_scale[ids]`` fp32 ``[..., hidden]``; pruned rows -> 0.

    ``table`` is an ``EmbeddingTable`` (unpack once with ``unpack_embedding``); a ``PackedLinear`` is also
    accepted but is then unpacked on every call.
    """
    if isinstance(table, PackedLinear):
        table = unpack_embedding(table)
    ids = jnp.asarray(ids)
    return table.codes[ids].astype(jnp.float32) * table.row_scale[ids][..., None]
