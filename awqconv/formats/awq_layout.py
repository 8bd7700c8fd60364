"""Pure re-layouts between canonical PackedLinear and AutoAWQ's GEMM tensors (no IO).

GEMM layout (AutoAWQ ``WQLinear_GEMM``, what transformers, vLLM and AutoAWQ load for
``version: "gemm"``) stores the transposed ``[in, out]`` view: ``qweight`` int32 ``[in, out/8]``,
``qzeros`` int32 ``[in/g, out/8]``, ``scales`` ``[in/g, out]``, ``bias`` ``[out]``. Eight output
channels share one int32; nibble ``j`` (bits ``4j..4j+3``) holds channel ``8c + AWQ_PACK_ORDER[j]``
(``nibbles.AWQ``). Both directions are vectorised over whole tensors.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .. import nibbles
from ..errors import FormatConstraintError, ShapeError
from ..packed import PackedLinear

# nibble j of a GEMM word holds channel AWQ_PACK_ORDER[j] of its block of 8: the interleave
# AutoAWQ's GEMM kernels unpack (even channels in the low half-word, odd ones in the high one)
AWQ_PACK_ORDER = nibbles.AWQ_ORDER
# channel c of a block sits in nibble AWQ_REVERSE_ORDER[c] (the inverse permutation)
AWQ_REVERSE_ORDER = tuple(s // 4 for s in nibbles.AWQ)


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
    return nibbles.pack(v, nibbles.AWQ, dim=1)


def unpack_awq_int32(w: Tensor) -> Tensor:
    """Inverse of :func:`pack_awq_int32`: int32 ``[rows, n]`` -> uint8 ``[rows, 8 n]``."""
    if w.dtype != torch.int32:
        raise ShapeError(f"AWQ packed tensors must be int32, got {w.dtype}")
    return nibbles.unpack(w, nibbles.AWQ, dim=1)


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
