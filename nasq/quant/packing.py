"""Bit packing of integer weight codes and THE byte-count function.

Storage containers (docs/CONVENTIONS.md): a ``b``-bit code is stored in ``CONTAINER_BITS[b]`` bits
(1->1, 2->2, 3->4, 4->4, 5..8->8), so 8 codes per byte at 1 bit, 4 at 2 bits, 2 at 3/4 bits, 1 at 5..8 bits.
Each row is packed independently into ``packed_row_bytes(cols, b) = ceil(cols * container / 8)`` bytes.

Layout inside a byte is little-endian: element ``j`` of a byte occupies bits ``[j*c, (j+1)*c)``.
Codes for ``b >= 2`` are stored in two's complement within the container (sign-extended on unpack);
binary codes map ``+1 -> 1`` and ``-1 -> 0``; 8-bit codes are the int8 bytes reinterpreted as uint8.

Byte count of one quantization group (``rows`` output rows of ``cols`` inputs) at ``b`` bits::

    group_nbytes = 0                                                        if b == 0 (pruned, bias too)
                 = rows * packed_row_bytes(cols, b) + SCALE_BYTES + rows * BIAS_BYTES * has_bias

This single function is used by the search cost model, the finalize repair, and the exporter, so the
predicted size equals the exported size.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from nasq.errors import NasqError
from nasq.quant.quantizer import quantize_codes

CONTAINER_BITS = {1: 1, 2: 2, 3: 4, 4: 4, 5: 8, 6: 8, 7: 8, 8: 8}
SCALE_BYTES = 4  # one fp32 scale per (kept) group
BIAS_BYTES = 4  # one fp32 bias per kept row


def _container(bits) -> int:
    try:
        return CONTAINER_BITS[int(bits)]
    except (KeyError, TypeError, ValueError) as e:
        raise NasqError(
            f"cannot pack {bits!r}-bit codes; packable widths are 1..8 (0 = pruned, not stored)"
        ) from e


def packed_row_bytes(cols: int, bits: int) -> int:
    """``ceil(cols * container(bits) / 8)``: bytes of one packed row."""
    return -(-int(cols) * _container(bits) // 8)


def group_nbytes(rows: int, cols: int, bits: int, has_bias: bool = True) -> int:
    """Stored bytes of one row group: packed codes + one fp32 scale (+ fp32 bias per row); 0 if pruned."""
    bits = int(bits)
    if bits == 0:
        return 0
    if not 1 <= bits <= 8:
        raise NasqError(f"bit width {bits} is outside 0..8")
    return (
        int(rows) * packed_row_bytes(cols, bits) + SCALE_BYTES + (int(rows) * BIAS_BYTES if has_bias else 0)
    )


def tensor_nbytes(
    group_sizes: Sequence[int], cols: int, bits_per_group: Sequence[int], has_bias: bool = True
) -> int:
    """Sum of ``group_nbytes`` over the row groups of one tensor."""
    if len(group_sizes) != len(bits_per_group):
        raise NasqError(
            f"{len(group_sizes)} group sizes but {len(bits_per_group)} bit widths; give one bit width per group"
        )
    return sum(group_nbytes(r, cols, b, has_bias) for r, b in zip(group_sizes, bits_per_group, strict=True))


def _code_bounds(bits: int) -> tuple[int, int]:
    if bits == 1:
        return -1, 1
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack int8 codes ``[rows, cols]`` into ``uint8 [rows, packed_row_bytes(cols, bits)]`` (numpy).

    Accepts the widest range for the width (``-2^(b-1) .. 2^(b-1)-1``, i.e. both quantizer modes);
    binary codes must be exactly -1 or +1.
    """
    c = _container(bits)
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise NasqError(f"pack_codes expects [rows, cols] codes, got shape {codes.shape}")
    lo, hi = _code_bounds(int(bits))
    if codes.size:
        cmin, cmax = int(codes.min()), int(codes.max())
        if cmin < lo or cmax > hi or (bits == 1 and (codes == 0).any()):
            raise NasqError(
                f"{bits}-bit codes must lie in [{lo}, {hi}]"
                + (" and be +-1" if bits == 1 else "")
                + f"; got values in [{cmin}, {cmax}]"
            )
    rows, cols = codes.shape
    if c == 8:
        return np.ascontiguousarray(codes.astype(np.int8).view(np.uint8))
    per_byte = 8 // c
    nbytes = packed_row_bytes(cols, bits)
    if bits == 1:
        fields = (codes > 0).astype(np.uint8)
    else:
        fields = (codes.astype(np.int16) & ((1 << c) - 1)).astype(np.uint8)
    padded = np.zeros((rows, nbytes * per_byte), np.uint8)
    padded[:, :cols] = fields
    shifts = (np.arange(per_byte, dtype=np.uint8) * c).astype(np.uint8)
    return np.bitwise_or.reduce(padded.reshape(rows, nbytes, per_byte) << shifts, axis=-1).astype(np.uint8)


def unpack_codes(packed, bits: int, cols: int, xp=jnp):
    """Inverse of ``pack_codes``: ``uint8 [..., nbytes] -> int8 [..., cols]``.

    Pure shifts, masks and sign extension (``(f ^ m) - m`` with ``m = 2^(c-1)``) in int32, so under ``jit``
    it fuses into the consumer. ``xp`` is ``jax.numpy`` (default) or ``numpy``.
    """
    c = _container(bits)
    per_byte = 8 // c
    v = xp.asarray(packed).astype(xp.int32)
    lead = v.shape[:-1]
    if v.shape[-1] != packed_row_bytes(cols, bits):
        raise NasqError(
            f"packed rows have {v.shape[-1]} bytes but {cols} {bits}-bit codes need {packed_row_bytes(cols, bits)}"
        )
    if per_byte == 1:
        f = v
    else:
        shifts = xp.asarray(np.arange(per_byte, dtype=np.int32) * c)
        f = (v[..., None] >> shifts) & ((1 << c) - 1)
        f = f.reshape(*lead, v.shape[-1] * per_byte)[..., :cols]
    if bits == 1:
        out = f * 2 - 1
    else:
        m = 1 << (c - 1)
        out = (f ^ m) - m
    return out.astype(xp.int8)


def pack_rows(w_rows, bias, group_sizes, bits, scales, mode: str = "symmetric") -> dict[str, np.ndarray]:
    """THE packer: the stored arrays of one quantized tensor (``seg{b}``, ``scale``, ``bias``).

    Segments by ascending width, rows in original order within a segment, one scale per kept group in
    segment order, the bias of kept rows; pruned groups are absent. One ``quantize_codes`` call per width, so a
    vocabulary with one group per row packs in milliseconds. Empty arrays are omitted. The exporter and
    ``nasq.kernels.int_linear.pack_linear`` both use it.
    """
    w = np.asarray(w_rows, np.float32)
    sizes = np.asarray(group_sizes, np.int64)
    bits = np.asarray(bits, np.int64)
    scales = np.asarray(scales, np.float32).reshape(-1)
    if sizes.sum() != w.shape[0] or len(bits) != len(sizes) or len(scales) != len(sizes):
        raise NasqError(
            f"plan does not fit the weight: {len(sizes)} groups summing to {int(sizes.sum())} rows, "
            f"{len(bits)} bit widths, {len(scales)} scales for a [{w.shape[0]}, {w.shape[1]}] tensor"
        )
    gid = np.repeat(np.arange(len(sizes)), sizes)
    row_bits, row_scale = bits[gid], scales[gid]
    out: dict[str, np.ndarray] = {}
    gscale, kept_bias = [], []
    for b in sorted({int(v) for v in bits if v > 0}):
        sel = row_bits == b
        codes = np.asarray(quantize_codes(w[sel], row_scale[sel][:, None], b, mode))
        out[f"seg{b}"] = pack_codes(codes, b)
        gscale.append(scales[bits == b])
        if bias is not None:
            kept_bias.append(np.asarray(bias, np.float32)[sel])
    if gscale:
        out["scale"] = np.concatenate(gscale).astype(np.float32)
        if bias is not None:
            out["bias"] = np.concatenate(kept_bias).astype(np.float32)
    return out
