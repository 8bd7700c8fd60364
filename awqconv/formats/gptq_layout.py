"""Canonical integers <-> the 4-bit GPTQ tensors ExLlamaV2 loads (``checkpoint_format: gptq``), pure functions.

``qweight`` int32 ``[in/8, out]``: nibble ``j`` (bits 4j..4j+3) of word ``[r, c]`` is ``q[c, 8r + j]``
(``nibbles.SEQUENTIAL``).
``qzeros`` int32 ``[G, out/8]``: nibble ``j`` of word ``[g, c8]`` is ``zero[8*c8 + j, g] - offset``
(offset 1 = GPTQ "v1", what ExLlamaV2 reads; 0 = "gptq_v2"), packed nibble by nibble, never by
arithmetic on words. ``scales`` ``[G, out]``; ``g_idx`` int32 ``[in]`` = ``i // g`` (optional).
A group with zero point 0 cannot be stored under v1; it is stored sign-flipped, exactly:
``s' = -s, z' = 15, q' = 15 - q`` gives ``(q' - z') * s' = q * s``; a negative stored scale marks it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .. import nibbles
from ..errors import FormatConstraintError, ShapeError
from ..packed import PackedLinear

BITS = 4
NIBBLES = 8  # 4-bit values per int32 word
V1_OFFSET = 1  # GPTQ v1 stores zero - 1; ExLlamaV2 adds 1 back in its kernels


@dataclass(frozen=True)
class GptqTensors:
    qweight: Tensor  # int32 [in/8, out]
    qzeros: Tensor  # int32 [G, out/8]
    scales: Tensor  # [G, out], dtype of the canonical scales (negative = flipped group)
    g_idx: Tensor | None  # int32 [in]
    bias: Tensor | None  # [out]
    flipped_groups: int  # how many (column, group) pairs were stored sign-flipped


def pack_words(nibble_values: Tensor, dim: int) -> Tensor:
    """Pack values 0..15 along ``dim`` (length a multiple of 8) into int32 words, nibble j = element 8k+j."""
    return nibbles.pack(nibble_values, nibbles.SEQUENTIAL, dim=dim)


def unpack_words(words: Tensor, dim: int) -> Tensor:
    """Inverse of :func:`pack_words`: int64 values 0..15, ``dim`` 8 times longer."""
    if words.dtype != torch.int32:
        raise ShapeError(f"packed GPTQ tensors must be int32, got {words.dtype}")
    return nibbles.unpack(words, nibbles.SEQUENTIAL, dim=dim, dtype=torch.int64)


def to_gptq(p: PackedLinear, with_g_idx: bool = False, name: str = "weight") -> GptqTensors:
    """Re-lay one canonical linear out as GPTQ-v1 tensors (zero-0 groups sign-flipped)."""
    if p.bits != BITS:
        raise FormatConstraintError(f"{name}: the ExLlamaV2/GPTQ layout holds 4-bit weights, this layer has {p.bits}")
    out, n_in, g = p.out_features, p.in_features, p.group_size
    if out % NIBBLES or n_in % NIBBLES:
        raise FormatConstraintError(
            f"{name}: [{out}, {n_in}] is not a multiple of 8 in both dims, which GPTQ packing needs; "
            "keep this layer in 16-bit (quantize with --skip NAME)"
        )
    if bool(torch.signbit(p.scales).any()):
        raise FormatConstraintError(
            f"{name}.scales holds negative values (or -0.0); the GPTQ layout uses the sign to mark "
            "zero-point-0 groups, so it cannot store them: re-quantize (AWQ scales are positive)"
        )
    q = p.unpack().to(torch.int64)
    z = p.zeros.to(torch.int64)
    s = p.scales
    flip = z == 0
    flip_in = flip.repeat_interleave(g, dim=1)
    q = torch.where(flip_in, 15 - q, q)
    z = torch.where(flip, torch.full_like(z, 15), z)
    s = torch.where(flip, -s, s)
    g_idx = None
    if with_g_idx:
        g_idx = (torch.arange(n_in, dtype=torch.int32) // g).to(torch.int32)
    return GptqTensors(
        qweight=pack_words(q.t(), dim=0),
        qzeros=pack_words((z - V1_OFFSET).t(), dim=1),
        scales=s.t().contiguous(),
        g_idx=g_idx,
        bias=p.bias,
        flipped_groups=int(flip.sum()),
    )


def from_gptq(
    qweight: Tensor,
    qzeros: Tensor,
    scales: Tensor,
    g_idx: Tensor | None = None,
    bias: Tensor | None = None,
    zero_offset: int = V1_OFFSET,
    name: str = "weight",
) -> PackedLinear:
    """GPTQ tensors back to canonical integers; negative-scale groups are un-flipped exactly.

    ``zero_offset`` is what the file subtracted from each zero point (1 for v1, 0 for gptq_v2).
    """
    if qweight.dim() != 2 or qzeros.dim() != 2 or scales.dim() != 2:
        raise ShapeError(f"{name}: qweight, qzeros and scales must be 2-D")
    n_in, out = qweight.shape[0] * NIBBLES, qweight.shape[1]
    n_groups = qzeros.shape[0]
    if tuple(qzeros.shape) != (n_groups, out // NIBBLES) or tuple(scales.shape) != (n_groups, out):
        raise ShapeError(
            f"{name}: qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)} and scales "
            f"{tuple(scales.shape)} do not describe one [{out}, {n_in}] layer"
        )
    if n_groups == 0 or n_in % n_groups:
        raise ShapeError(f"{name}: {n_groups} groups do not divide in_features={n_in}")
    g = n_in // n_groups
    if g_idx is not None:
        want = torch.arange(n_in, dtype=torch.int64) // g
        if g_idx.numel() != n_in or not torch.equal(g_idx.to(torch.int64).cpu(), want):
            raise FormatConstraintError(
                f"{name}.g_idx is an act-order permutation (desc_act); canonical groups are contiguous "
                "runs of inputs, so this checkpoint cannot be read exactly: re-quantize without desc_act"
            )
    q = unpack_words(qweight, dim=0).t()  # [out, in]
    z = unpack_words(qzeros, dim=1).t() + zero_offset  # [out, G]
    s = scales.t().contiguous()
    flip = torch.signbit(s)
    if bool(flip.any()):
        q = torch.where(flip.repeat_interleave(g, dim=1), 15 - q, q)
        z = torch.where(flip, 15 - z, z)
        s = torch.where(flip, -s, s)
    if bool((z < 0).any() or (z > 15).any()):
        bad = int(((z < 0) | (z > 15)).sum())
        raise FormatConstraintError(
            f"{name}.qzeros: {bad} zero point(s) decode outside 0..15 (nibble 15 under the v1 "
            "convention means 16); 4-bit canonical weights cannot hold them"
        )
    return PackedLinear.from_ints(q.to(torch.uint8), z.to(torch.uint8), s, g, BITS, bias)
