"""Greedy decoding's argmax over the vocabulary, split across programs (GPU).

torch's ``argmax`` reduces a row in one 512-thread block: ~11.6 us a step for Llama-2's 32 000 logits
on an H100 (docs/design.md), serial loads over the whole row. Here each of up to 16 programs per
row reduces a chunk and parks (max, first index, first NaN index); the last program of the row (a
ticket, as in the split-K GEMVs) combines them in chunk order. Same result as ``torch.argmax``: the
first index of the maximum, a NaN counting as larger than any number (the first NaN wins).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .workspace import WORKSPACE

MAX_PARTS = 16
MAX_V = 1 << 24  # indices are exact in fp32 below this
NONE = tl.constexpr(MAX_V)  # "no index"


@triton.jit
def _first_max(v, i, nan_i):
    """(max, first index of it, first NaN index) of one block: v with NaN read as +inf."""
    best = tl.max(v, 0)
    return best, tl.min(tl.where(v == best, i, NONE), 0), tl.min(nan_i, 0)


@triton.jit
def argmax_kernel(x_ptr, out_ptr, ws_ptr, cnt_ptr, V, stride, CHUNK, N_PARTS,
                  PARTS_P2: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    part = tl.program_id(1)
    base = x_ptr + row.to(tl.int64) * stride
    lo = part * CHUNK
    hi = tl.minimum(lo + CHUNK, V)
    best = float("-inf")
    best_i = lo  # an all -inf chunk: its first index
    nan_i = NONE
    for c in range(lo, hi, BLOCK):
        i = c + tl.arange(0, BLOCK)
        x = tl.load(base + i, mask=i < hi, other=float("-inf")).to(tl.float32)
        isnan = x != x  # noqa: PLR0124 - NaN is the one value unequal to itself
        bv, bi, bn = _first_max(tl.where(isnan, float("inf"), x), i, tl.where(isnan, i, NONE))
        best_i = tl.where(bv > best, bi, best_i)  # equal: the earlier block's index stays
        best = tl.maximum(best, bv)
        nan_i = tl.minimum(nan_i, bn)
    row_ws = ws_ptr + row * 3 * PARTS_P2
    tl.store(row_ws + part, best)
    tl.store(row_ws + PARTS_P2 + part, best_i.to(tl.float32))
    tl.store(row_ws + 2 * PARTS_P2 + part, nan_i.to(tl.float32))
    tl.debug_barrier()
    ticket = tl.atomic_add(cnt_ptr + row, 1, sem="acq_rel")
    if ticket == N_PARTS - 1:
        p = tl.arange(0, PARTS_P2)
        live = p < N_PARTS
        v = tl.load(row_ws + p, mask=live, other=float("-inf"), cache_modifier=".cg")
        vi = tl.load(row_ws + PARTS_P2 + p, mask=live, other=NONE, cache_modifier=".cg").to(tl.int32)
        vn = tl.load(row_ws + 2 * PARTS_P2 + p, mask=live, other=NONE, cache_modifier=".cg").to(tl.int32)
        bv, bi, bn = _first_max(v, vi, vn)
        tl.store(out_ptr + row, tl.where(bn < NONE, bn, bi).to(tl.int64))
        tl.atomic_xchg(cnt_ptr + row, 0)


def greedy_argmax(logits: Tensor, block: int = 2048) -> Tensor:
    """``logits [..., V]`` -> ``logits.argmax(-1)`` as int64, one per row."""
    lead = logits.shape[:-1]
    if logits.dim() != 2 or logits.stride(1) != 1:
        logits = logits.reshape(-1, logits.shape[-1]).contiguous()
    B, V = logits.shape
    if not 0 < V < MAX_V:
        raise ValueError(f"greedy_argmax: vocabulary of {V} (1 .. {MAX_V - 1})")
    chunk = triton.cdiv(triton.cdiv(V, MAX_PARTS), block) * block
    parts = triton.cdiv(V, chunk)
    parts_p2 = triton.next_power_of_2(parts)
    ws, cnt = WORKSPACE.get(logits.device, B * 3 * parts_p2, B)
    out = torch.empty(B, dtype=torch.long, device=logits.device)
    argmax_kernel[(B, parts)](logits, out, ws, cnt, V, logits.stride(0), chunk, parts, PARTS_P2=parts_p2, BLOCK=block,
                              num_warps=4)
    return out.reshape(lead)
