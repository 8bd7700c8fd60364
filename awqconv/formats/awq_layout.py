"""Pure re-layouts between canonical PackedLinear and AutoAWQ's GEMM tensors (no IO).

GEMM layout (AutoAWQ ``WQLinear_GEMM``, awq_internals.md §2.1) stores the transposed ``[in, out]``
view: ``qweight`` int32 ``[in, out/8]``, ``qzeros`` int32 ``[in/g, out/8]``, ``scales``
``[in/g, out]``, ``bias`` ``[out]``. Eight output channels share one int32; nibble ``j`` (bits
``4j..4j+3``) holds channel ``8c + AWQ_PACK_ORDER[j]``. Words are built in int64 and wrapped to
int32 because nibble 7 reaches the sign bit. Both directions are vectorised over whole tensors.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..errors import FormatConstraintError, ShapeError
from ..packed import PackedLinear

# nibble j of a GEMM word holds channel AWQ_PACK_ORDER[j] of its block of 8 (AutoAWQ
# awq/utils/packing_utils.py AWQ_ORDER; AWQ paper §4.2 "w{0,2,4,6,1,3,5,7}")
AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
# channel c of a block sits in nibble AWQ_REVERSE_ORDER[c] (the inverse permutation)
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)
_NIBBLE_SHIFTS = tuple(4 * j for j in range(8))


class GemmTensors(NamedTuple):
    qweight: Tensor  # int32 [in, out / 8]
    qzeros: Tensor  # int32 [in / g, out / 8]
    scales: Tensor  # [in / g, out], dtype of the canonical scales (the writer casts to fp16)
    bias: Tensor | None  # [out]


def pack_awq_int32(v: Tensor) -> Tensor:
    """uint8 nibbles ``[rows, cols]`` (``cols % 8 == 0``) -> int32 ``[rows, cols / 8]`` in AWQ order."""
    rows, cols = v.shape
    if cols % 8:
        raise ShapeError(f"AWQ packing needs a multiple of 8 columns, got {cols}")
    order = torch.tensor(AWQ_PACK_ORDER, device=v.device)
    shifts = torch.tensor(_NIBBLE_SHIFTS, dtype=torch.int64, device=v.device)
    blocks = v.to(torch.int64).reshape(rows, cols // 8, 8).index_select(-1, order)
    words = (blocks << shifts).sum(-1)  # int64 in [0, 2**32)
    words = torch.where(words >= 1 << 31, words - (1 << 32), words)  # two's-complement wrap
    return words.to(torch.int32)


def unpack_awq_int32(w: Tensor) -> Tensor:
    """Inverse of :func:`pack_awq_int32`: int32 ``[rows, n]`` -> uint8 ``[rows, 8 n]``."""
    if w.dtype != torch.int32:
        raise ShapeError(f"AWQ packed tensors must be int32, got {w.dtype}")
    rows, n = w.shape
    shifts = torch.tensor(_NIBBLE_SHIFTS, dtype=torch.int64, device=w.device)
    nibbles = (w.to(torch.int64).unsqueeze(-1) >> shifts) & 0xF  # [rows, n, 8], nibble order
    reverse = torch.tensor(AWQ_REVERSE_ORDER, device=w.device)
    return nibbles.index_select(-1, reverse).reshape(rows, 8 * n).to(torch.uint8)


def to_gemm(p: PackedLinear) -> GemmTensors:
    """Canonical 4-bit integers -> GEMM tensors (exact; scales keep their dtype)."""
    if p.bits != 4:
        raise FormatConstraintError(f"the AWQ GEMM layout holds 4-bit weights only, got {p.bits}-bit")
    if p.out_features % 8:
        raise FormatConstraintError(
            f"the AWQ GEMM layout needs out_features % 8 == 0, got {p.out_features}"
        )
    qweight = pack_awq_int32(p.unpack().t())  # [in, out/8]
    qzeros = pack_awq_int32(p.zeros.t())  # [G, out/8]
    return GemmTensors(qweight, qzeros, p.scales.t().contiguous(), p.bias)


def from_gemm(
    qweight: Tensor,
    qzeros: Tensor,
    scales: Tensor,
    bias: Tensor | None = None,
    name: str = "weight",
) -> PackedLinear:
    """GEMM tensors -> canonical PackedLinear; the group size follows from the shapes."""
    in_features, words = qweight.shape
    n_groups, out = scales.shape
    if out != 8 * words:
        raise ShapeError(
            f"{name}: qweight {tuple(qweight.shape)} packs {8 * words} outputs but scales "
            f"{tuple(scales.shape)} has {out}"
        )
    if tuple(qzeros.shape) != (n_groups, words):
        raise ShapeError(
            f"{name}: qzeros has shape {tuple(qzeros.shape)}, expected {(n_groups, words)}"
        )
    if n_groups == 0 or in_features % n_groups:
        raise ShapeError(f"{name}: {in_features} inputs do not split into {n_groups} groups")
    q = unpack_awq_int32(qweight).t()  # [out, in]
    zeros = unpack_awq_int32(qzeros).t()  # [out, G]
    return PackedLinear.from_ints(
        q, zeros, scales.t().contiguous(), in_features // n_groups, bits=4, bias=bias
    )
