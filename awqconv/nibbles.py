"""Packing small unsigned integers into words: the one bit-field packer every layout uses.

A layout is described by its *shifts*: runs of ``len(shifts)`` consecutive values along one
dimension share a word, and value ``j`` of a run sits at bits ``[shifts[j], shifts[j] + bits)``.
The word is ``uint8`` (two 4-bit values, or four 2-bit ones) or ``int32`` (eight 4-bit values;
the top value reaches the sign bit, so words are built in int64 and wrapped to two's complement).

The layouts awqconv writes, all 4-bit:

========================  ======  ==========================  ======================================
layout                    word    shifts                      where
========================  ======  ==========================  ======================================
canonical ``qweight``     uint8   ``PAIR`` (0, 4)             ``packed.py``: byte b = q[2b] | q[2b+1] << 4
GPTQ / ExLlamaV2          int32   ``SEQUENTIAL`` (0, 4, ...)  value j of a run at nibble j
AutoAWQ GEMM              int32   ``AWQ`` (0, 16, 4, 20, ...) nibble j holds value (0,2,4,6,1,3,5,7)[j]
GGUF Q4_1 block           uint8   ``PAIR`` across halves      byte k = q[k] | q[k + 16] << 4
========================  ======  ==========================  ======================================

Values are masked to ``bits`` before packing, so out-of-range inputs cannot bleed into a
neighbour's field; callers that must refuse them check before packing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .errors import ShapeError

PAIR = (0, 4)  # two nibbles per byte, the first value in the low nibble
SEQUENTIAL = tuple(4 * j for j in range(8))  # eight nibbles per int32, value j at nibble j


def shifts_of_order(order: Sequence[int], bits: int = 4) -> tuple[int, ...]:
    """Shifts of a layout described by its nibble order: field ``j`` of a word holds value ``order[j]``."""
    if sorted(order) != list(range(len(order))):
        raise ShapeError(f"nibble order {tuple(order)} is not a permutation of 0..{len(order) - 1}")
    shifts = [0] * len(order)
    for field, value in enumerate(order):
        shifts[value] = bits * field
    return tuple(shifts)


# AutoAWQ's GEMM order: nibble j of a word holds value (0, 2, 4, 6, 1, 3, 5, 7)[j], so even values
# fill the low half-word and odd values the high one
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ = shifts_of_order(AWQ_ORDER)

_WORD_BITS = {torch.uint8: 8, torch.int32: 32}


def _check(shifts: Sequence[int], bits: int, dtype: torch.dtype) -> int:
    if dtype not in _WORD_BITS:
        raise ShapeError(f"words must be uint8 or int32, got {dtype}")
    if not 1 <= bits <= 8:
        raise ShapeError(f"bits={bits} is out of range; use 1..8")
    width = _WORD_BITS[dtype]
    if not shifts or any(s < 0 or s + bits > width for s in shifts) or len(set(shifts)) != len(shifts):
        raise ShapeError(f"shifts {tuple(shifts)} do not place {bits}-bit fields inside a {width}-bit word")
    return width


def pack(values: Tensor, shifts: Sequence[int], *, dim: int = -1, bits: int = 4,
         dtype: torch.dtype = torch.int32) -> Tensor:
    """Pack ``values`` (``< 2**bits``) along ``dim`` into words of ``dtype``; ``dim`` shrinks ``len(shifts)`` times.

    The length of ``dim`` must be a multiple of ``len(shifts)`` (pad first where a layout allows it).
    """
    width = _check(shifts, bits, dtype)
    per = len(shifts)
    compute = torch.int64 if width == 32 else torch.int32
    x = values.to(compute).movedim(dim, -1)
    n = x.shape[-1]
    if n % per:
        raise ShapeError(f"cannot pack {n} values into words of {per}; the length must be a multiple of {per}")
    x = x.reshape(*x.shape[:-1], n // per, per) & ((1 << bits) - 1)
    words = (x << torch.tensor(shifts, dtype=compute, device=x.device)).sum(-1)  # disjoint fields: sum == or
    if width == 32:
        words = torch.where(words >= 1 << 31, words - (1 << 32), words)  # two's-complement wrap
    return words.to(dtype).movedim(-1, dim).contiguous()


def unpack(words: Tensor, shifts: Sequence[int], *, dim: int = -1, bits: int = 4,
           dtype: torch.dtype = torch.uint8) -> Tensor:
    """Inverse of :func:`pack`: values as ``dtype`` (uint8 by default), ``dim`` ``len(shifts)`` times longer."""
    if words.dtype not in _WORD_BITS:
        raise ShapeError(f"packed words must be uint8 or int32, got {words.dtype}")
    width = _check(shifts, bits, words.dtype)
    compute = torch.int64 if width == 32 else torch.int32
    x = words.to(compute).movedim(dim, -1)
    vals = (x.unsqueeze(-1) >> torch.tensor(shifts, dtype=compute, device=x.device)) & ((1 << bits) - 1)
    vals = vals.reshape(*x.shape[:-1], x.shape[-1] * len(shifts))
    return vals.to(dtype).movedim(-1, dim).contiguous()
