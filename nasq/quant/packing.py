"""Bit packing of integer weight codes and THE byte-count function.

Dense packing (docs/CONVENTIONS.md): a ``b``-bit code occupies exactly ``b`` bits, for every width 1..8. Each
row is packed independently as a little-endian bitstream: code ``j`` of a row occupies stream bits
``[j*b, (j+1)*b)``, and stream bit ``k`` is bit ``k % 8`` of byte ``k // 8`` of the row. A row of ``cols`` codes
therefore takes ``packed_row_bytes(cols, b) = ceil(cols * b / 8)`` bytes (the last byte zero-padded).
For ``b`` in {1, 2, 4, 8} this is the byte-aligned layout "element ``j`` of a byte occupies bits
``[j*b, (j+1)*b)``" of artifact format 1; format 1 stored 3-bit codes in 4-bit and 5..7-bit codes in 8-bit
containers (``V1_CONTAINER_BITS``, kept only to recognise such files).

Codes for ``b >= 2`` are stored in ``b``-bit two's complement (sign-extended on unpack); binary codes map
``+1 -> 1`` and ``-1 -> 0``; 8-bit codes are the int8 bytes reinterpreted as uint8.

Byte count of one quantization group (``rows`` output rows of ``cols`` inputs) at ``b`` bits::

    group_nbytes = 0                                                        if b == 0 (pruned, bias too)
                 = rows * ceil(cols * b / 8) + SCALE_BYTES + rows * BIAS_BYTES * has_bias

This single function is used by the search cost model, the finalize repair, and the exporter, so the
predicted size equals the exported size.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from nasq.errors import NasqError
from nasq.quant.quantizer import quantize_codes

SCALE_BYTES = 4  # one fp32 scale per (kept) group
BIAS_BYTES = 4  # one fp32 bias per kept row

# Storage container of each width in artifact format 1 and in plans written before dense packing (issue 16).
# Not used to pack or count bytes any more: only to recognise files written with it.
V1_CONTAINER_BITS = {1: 1, 2: 2, 3: 4, 4: 4, 5: 8, 6: 8, 7: 8, 8: 8}
V1_REPACKED_WIDTHS = tuple(b for b, c in V1_CONTAINER_BITS.items() if c != b)  # (3, 5, 6, 7): layout changed


def _width(bits) -> int:
    """``bits`` as an int in 1..8, else ``NasqError``."""
    try:
        b = int(bits)
    except (TypeError, ValueError):
        b = 0
    if not 1 <= b <= 8:
        raise NasqError(f"cannot pack {bits!r}-bit codes; packable widths are 1..8 (0 = pruned, not stored)")
    return b


def packed_row_bytes(cols: int, bits: int) -> int:
    """``ceil(cols * bits / 8)``: bytes of one densely packed row."""
    return -(-int(cols) * _width(bits) // 8)


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

    Each row is a little-endian bitstream of ``b``-bit fields (module docstring):
    ``field_j = code_j mod 2^b`` (binary: ``code > 0``), stream bit ``j*b + i`` = bit ``i`` of ``field_j``.
    Accepts the widest range for the width (``-2^(b-1) .. 2^(b-1)-1``, i.e. both quantizer modes);
    binary codes must be exactly -1 or +1.
    """
    bits = _width(bits)
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise NasqError(f"pack_codes expects [rows, cols] codes, got shape {codes.shape}")
    lo, hi = _code_bounds(bits)
    if codes.size:
        cmin, cmax = int(codes.min()), int(codes.max())
        if cmin < lo or cmax > hi or (bits == 1 and (codes == 0).any()):
            raise NasqError(
                f"{bits}-bit codes must lie in [{lo}, {hi}]"
                + (" and be +-1" if bits == 1 else "")
                + f"; got values in [{cmin}, {cmax}]"
            )
    rows, cols = codes.shape
    if bits == 8:
        return np.ascontiguousarray(codes.astype(np.int8).view(np.uint8))
    if bits == 1:
        fields = (codes > 0).astype(np.uint8)
    else:
        fields = (codes.astype(np.int16) & ((1 << bits) - 1)).astype(np.uint8)
    stream = (fields[..., None] >> np.arange(bits, dtype=np.uint8)) & 1  # [rows, cols, b], LSB first
    return np.packbits(stream.reshape(rows, cols * bits), axis=-1, bitorder="little")


def _stream_fields(v, bits: int, cols: int, xp):
    """The unsigned ``b``-bit fields ``int32 [..., cols]`` of densely packed rows ``v`` (int32 bytes), any width."""
    lead, nbytes = v.shape[:-1], v.shape[-1]
    blocks = -(-int(cols) // 8)
    pad = blocks * bits - nbytes  # 0 <= pad < bits
    if pad:
        v = xp.concatenate([v, xp.zeros((*lead, pad), xp.int32)], axis=-1)
    blk = v.reshape(*lead, blocks, bits)
    mask = (1 << bits) - 1
    fields = []
    for j in range(8):
        s = j * bits
        lo, hi = s // 8, (s + bits - 1) // 8
        w = blk[..., lo] if lo == hi else blk[..., lo] | (blk[..., hi] << 8)
        fields.append((w >> (s % 8)) & mask)
    return xp.stack(fields, axis=-1).reshape(*lead, blocks * 8)[..., :cols]


def unpack_codes(packed, bits: int, cols: int, xp=jnp):
    """Inverse of ``pack_codes``: ``uint8 [..., packed_row_bytes(cols, bits)] -> int8 [..., cols]``.

    Eight ``b``-bit codes fill exactly ``b`` bytes, so the (zero-padded) row is viewed as ``[ceil(cols/8), b]``
    blocks; code ``j`` of a block starts at bit ``s = j*b`` and lies in bytes ``s//8 .. (s+b-1)//8`` (at most
    two, as ``b <= 8``)::

        field_j = ((B[s//8] | B[(s+b-1)//8] << 8) >> (s % 8)) & (2^b - 1)
        code_j  = 2*field_j - 1                      if b == 1
                = (field_j ^ m) - m,  m = 2^(b-1)    otherwise (two's complement sign extension)

    Static slices, shifts and masks in int32, so under ``jit`` it fuses into the consumer (widths dividing 8
    take the equivalent per-byte shift ``(B[..., None] >> b*arange(8/b)) & (2^b - 1)``). ``xp`` is ``jax.numpy``
    (default) or ``numpy``.
    """
    bits = _width(bits)
    v = xp.asarray(packed).astype(xp.int32)
    lead = v.shape[:-1]
    nbytes = packed_row_bytes(cols, bits)
    if v.shape[-1] != nbytes:
        raise NasqError(
            f"packed rows have {v.shape[-1]} bytes but {cols} {bits}-bit codes need {nbytes}"
        )
    if bits == 8:
        f = v
    elif 8 % bits == 0:  # 1, 2, 4 bits: whole codes per byte, one broadcast shift (same result, a bit faster)
        shifts = xp.asarray(np.arange(8 // bits, dtype=np.int32) * bits)
        f = ((v[..., None] >> shifts) & ((1 << bits) - 1)).reshape(*lead, nbytes * (8 // bits))[..., :cols]
    else:
        f = _stream_fields(v, bits, cols, xp)
    if bits == 1:
        out = f * 2 - 1
    else:
        m = 1 << (bits - 1)
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
