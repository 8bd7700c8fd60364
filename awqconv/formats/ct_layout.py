"""Pure re-layouts between canonical PackedLinear and compressed-tensors ``pack-quantized`` tensors (no IO).

compressed-tensors quantizes to signed ``q_ct = q - 8`` (INT4 in [-8, 7]) and packs ``q_ct + 8``,
so every stored nibble is exactly the canonical unsigned integer:

- ``weight_packed`` int32 ``[out, ceil(in/8)]``: nibble ``j`` (bits ``4j..4j+3``) of word ``w`` in
  row ``r`` holds ``q[r, 8w + j]`` (nibbles.SEQUENTIAL); a short last word is padded with nibble 0.
- ``weight_zero_point`` int32 ``[ceil(out/8), G]`` (asymmetric only): packed along the *output*
  dim, nibble ``j`` of word ``[w, g]`` holds ``z[8w + j, g]``. Symmetric schemes store no zero
  point; their implicit signed zero 0 is the canonical 8.
- ``weight_scale`` ``[out, G]`` in the scales' own dtype; ``weight_shape`` int64 ``[out, in]``.

Dequantization is ``(q_ct - z_ct) * s = (q - z) * s`` in both conventions.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .. import nibbles
from ..errors import FormatConstraintError, ShapeError
from ..packed import PackedLinear

SYMMETRIC_ZERO = 8  # the canonical zero point of a symmetric 4-bit scheme (signed zero 0)


class CtTensors(NamedTuple):
    weight_packed: Tensor  # int32 [out, ceil(in / 8)]
    weight_scale: Tensor  # [out, G]
    weight_zero_point: Tensor | None  # int32 [ceil(out / 8), G]; None when symmetric
    weight_shape: Tensor  # int64 [2] = (out, in)
    bias: Tensor | None  # [out]


def _pack_padded(v: Tensor, dim: int) -> Tensor:
    """uint8 nibbles -> int32 words of 8 along ``dim``, the tail padded with nibble 0 (as compressed-tensors does)."""
    pad = (-v.shape[dim]) % 8
    if pad:
        shape = list(v.shape)
        shape[dim] = pad
        v = torch.cat([v, v.new_zeros(shape)], dim=dim)
    return nibbles.pack(v, nibbles.SEQUENTIAL, dim=dim)


def _unpack_cut(words: Tensor, dim: int, n: int) -> Tensor:
    v = nibbles.unpack(words, nibbles.SEQUENTIAL, dim=dim)
    return v.narrow(dim, 0, n).contiguous()


def is_symmetric(p: PackedLinear) -> bool:
    """Every zero point is 8: compressed-tensors' symmetric scheme holds exactly these weights."""
    return bool((p.zeros == SYMMETRIC_ZERO).all())


def to_ct(p: PackedLinear, symmetric: bool) -> CtTensors:
    """Canonical 4-bit integers -> pack-quantized tensors (exact; scales keep their dtype)."""
    if p.bits != 4:
        raise FormatConstraintError(f"compressed-tensors pack-quantized W4A16 holds 4-bit weights, got {p.bits}-bit")
    if symmetric and not is_symmetric(p):
        raise FormatConstraintError("a symmetric compressed-tensors scheme needs every zero point to be 8")
    packed = _pack_padded(p.unpack(), dim=1)
    zp = None if symmetric else _pack_padded(p.zeros, dim=0)
    shape = torch.tensor([p.out_features, p.in_features], dtype=torch.int64)
    return CtTensors(packed, p.scales.contiguous(), zp, shape, p.bias)


def from_ct(
    weight_packed: Tensor,
    weight_scale: Tensor,
    weight_zero_point: Tensor | None,
    weight_shape: Tensor | None,
    bias: Tensor | None = None,
    name: str = "weight",
) -> PackedLinear:
    """pack-quantized tensors -> canonical PackedLinear. ``weight_zero_point`` None = symmetric
    (every zero 8); it may be packed ``[ceil(out/8), G]`` int32 or unpacked signed ``[out, G]``."""
    if weight_packed.dtype != torch.int32 or weight_packed.dim() != 2:
        raise ShapeError(f"{name}.weight_packed must be a 2-D int32 tensor, got {weight_packed.dtype} "
                         f"{tuple(weight_packed.shape)}")
    out, words = weight_packed.shape
    if weight_scale.dim() != 2 or weight_scale.shape[0] != out:
        raise ShapeError(f"{name}.weight_scale has shape {tuple(weight_scale.shape)}, expected [{out}, groups]")
    n_groups = weight_scale.shape[1]
    if weight_shape is None:
        n_in = 8 * words
    else:
        dims = [int(d) for d in weight_shape.reshape(-1).tolist()]
        if len(dims) != 2 or dims[0] != out:
            raise ShapeError(f"{name}.weight_shape is {dims}, expected [{out}, in_features]")
        n_in = dims[1]
    if (n_in + 7) // 8 != words:
        raise ShapeError(
            f"{name}.weight_packed has {words} words per row, but {n_in} inputs pack into {(n_in + 7) // 8}")
    if n_groups == 0 or n_in % n_groups:
        raise ShapeError(f"{name}: {n_in} inputs do not split into {n_groups} groups of weight_scale")
    q = _unpack_cut(weight_packed, dim=1, n=n_in)
    if weight_zero_point is None:
        zeros = torch.full((out, n_groups), SYMMETRIC_ZERO, dtype=torch.uint8)
    else:
        zeros = _zeros(weight_zero_point, out, n_groups, name)
    return PackedLinear.from_ints(q, zeros, weight_scale.contiguous(), n_in // n_groups, bits=4, bias=bias)


def _zeros(zp: Tensor, out: int, n_groups: int, name: str) -> Tensor:
    packed_shape = ((out + 7) // 8, n_groups)
    if zp.dtype == torch.int32 and tuple(zp.shape) == packed_shape:
        return _unpack_cut(zp, dim=0, n=out)
    if tuple(zp.shape) == (out, n_groups) and not zp.dtype.is_floating_point:
        # older compressed-tensors releases stored the signed zero points unpacked
        if zp.numel() and (int(zp.min()) < -8 or int(zp.max()) > 7):
            raise ShapeError(f"{name}.weight_zero_point holds values outside the signed 4-bit range [-8, 7]")
        return (zp.to(torch.int16) + SYMMETRIC_ZERO).to(torch.uint8)
    raise ShapeError(f"{name}.weight_zero_point has shape {tuple(zp.shape)} ({zp.dtype}), expected packed int32 "
                     f"{packed_shape} or unpacked {(out, n_groups)}")
