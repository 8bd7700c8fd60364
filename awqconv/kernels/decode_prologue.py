"""Everything a one-token decode step needs before its first layer, in one Triton kernel; and the
one launch that stages a step's token, positions and slot into a decode graph's input buffers.

Per step the runtime marks this step's cache slot valid, builds the attention's additive mask over
the cache bucket, gathers this position's RoPE cos/sin rows and the token's embedding row. In torch
that is about a dozen small kernels (aranges, compares, fills, gathers), ~0.5 % of a 7B step on an
H100; here it is one launch. Same values as the torch path: the mask is 0 where a slot is valid,
not after this step's slot (and inside the sliding window), else -inf; the rows are copies.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_w4 import _round_to

BLOCK_S = 512  # mask slots per program
BLOCK_ROW = 512  # embedding values per program (the programs split the row: one load round trip)


@triton.jit
def _copy_row(src, dst, n, BLOCK: tl.constexpr):
    for c0 in range(0, n, BLOCK):
        r = c0 + tl.arange(0, BLOCK)
        tl.store(dst + r, tl.load(src + r, mask=r < n), mask=r < n)


@triton.jit
def decode_prologue_kernel(tok_ptr, pos_ptr, slot_ptr, embed_ptr, x_ptr, cos_tab, sin_tab, cos_ptr, sin_ptr,
                           valid_ptr, bias_ptr, S, HIDDEN, HD, WINDOW, embed_scale, stride_embed, stride_tab,
                           stride_valid, stride_bias,
                           BLOCK_S: tl.constexpr, BLOCK_ROW: tl.constexpr, HAS_WINDOW: tl.constexpr,
                           SCALED: tl.constexpr = False):
    """Program (b, i): mask slots [i * BLOCK_S, (i + 1) * BLOCK_S) and embedding values
    [i * BLOCK_ROW, (i + 1) * BLOCK_ROW) of row b (where they exist; ``SCALED``: times
    ``embed_scale``, rounded once as torch rounds the product); program (b, 0) also marks the
    slot valid and copies the cos/sin rows."""
    b = tl.program_id(0)
    pid = tl.program_id(1)
    slot = tl.load(slot_ptr)
    rs = pid * BLOCK_S + tl.arange(0, BLOCK_S)
    m = rs < S
    valid = tl.load(valid_ptr + b * stride_valid + rs, mask=m, other=0) != 0
    ok = (valid | (rs == slot)) & (rs <= slot)  # this step's slot is valid (stored below by program 0)
    if HAS_WINDOW:
        ok = ok & (slot - rs < WINDOW)
    bias = tl.where(ok, 0.0, float("-inf")).to(bias_ptr.dtype.element_ty)
    tl.store(bias_ptr + b * stride_bias + rs, bias, mask=m)
    re = pid * BLOCK_ROW + tl.arange(0, BLOCK_ROW)
    me = re < HIDDEN
    tok = tl.load(tok_ptr + b)
    e = tl.load(embed_ptr + tok * stride_embed + re, mask=me)
    if SCALED:
        e = _round_to(e.to(tl.float32) * embed_scale, x_ptr.dtype.element_ty)
    tl.store(x_ptr + b * HIDDEN + re, e, mask=me)
    if pid == 0:
        tl.store(valid_ptr + b * stride_valid + slot, tl.full((), 1, tl.uint8))
        pos = tl.load(pos_ptr + b)
        _copy_row(cos_tab + pos * stride_tab, cos_ptr + b * HD, HD, BLOCK_ROW)
        _copy_row(sin_tab + pos * stride_tab, sin_ptr + b * HD, HD, BLOCK_ROW)


def decode_prologue(tokens: Tensor, positions: Tensor, slot: Tensor, embed: Tensor, rope_table: tuple[Tensor, Tensor],
                    key_valid: Tensor, kv_len: int, window: int | None = None,
                    embed_scale: float | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """For ``tokens, positions [B, 1]`` at cache ``slot`` (0-d long): marks ``key_valid[:, slot]``
    (bool ``[B, max_len]``, in place) and returns the embeddings ``[B, 1, hidden]`` (times
    ``embed_scale``, a value of the embedding's dtype, where given: Gemma), cos and sin
    ``[B, 1, 1, head_dim]`` and the additive mask ``[B, 1, 1, kv_len]`` (embedding dtype) over cache
    slots ``< kv_len``: 0 where valid, ``<= slot`` and, with ``window``, ``slot - s < window``."""
    B, T = tokens.shape
    cos_tab, sin_tab = rope_table
    if (T != 1 or positions.shape != tokens.shape or key_valid.dtype != torch.bool or key_valid.stride(1) != 1
            or embed.stride(1) != 1 or cos_tab.stride() != sin_tab.stride() or cos_tab.stride(1) != 1):
        raise ValueError("decode_prologue: one token per row, positions like tokens, a bool key_valid, rows "
                         "contiguous in the embedding and RoPE tables")
    hidden, hd = embed.shape[1], cos_tab.shape[1]
    dev, dt = embed.device, embed.dtype
    x = torch.empty(B, 1, hidden, dtype=dt, device=dev)
    cos = torch.empty(B, 1, 1, hd, dtype=cos_tab.dtype, device=dev)
    sin = torch.empty_like(cos)
    bias = torch.empty(B, 1, 1, kv_len, dtype=dt, device=dev)
    decode_prologue_kernel[(B, max(triton.cdiv(kv_len, BLOCK_S), triton.cdiv(hidden, BLOCK_ROW)))](
        tokens.reshape(B), positions.reshape(B), slot, embed, x, cos_tab, sin_tab, cos, sin,
        key_valid.view(torch.uint8), bias, kv_len, hidden, hd, window or 0, embed_scale or 1.0, embed.stride(0),
        cos_tab.stride(0), key_valid.stride(0), bias.stride(0),
        BLOCK_S=BLOCK_S, BLOCK_ROW=BLOCK_ROW, HAS_WINDOW=window is not None, SCALED=embed_scale is not None,
        num_warps=4)
    return x, cos, sin, bias


@triton.jit(do_not_specialize=["slot"])
def stage_kernel(tok_ptr, pos_ptr, t_buf, p_buf, s_buf, hist_ptr, next_pos_ptr, slot, B, stride_hist,
                 BLOCK: tl.constexpr, HIST: tl.constexpr):
    r = tl.arange(0, BLOCK)
    m = r < B
    tok = tl.load(tok_ptr + r, mask=m)
    pos = tl.load(pos_ptr + r, mask=m)
    tl.store(t_buf + r, tok, mask=m)
    tl.store(p_buf + r, pos, mask=m)
    tl.store(next_pos_ptr + r, pos + 1, mask=m)
    if HIST:
        tl.store(hist_ptr + r * stride_hist, tok, mask=m)
    tl.store(s_buf, slot.to(s_buf.dtype.element_ty))


def stage_step_inputs(tok: Tensor, pos: Tensor, slot: int, t_buf: Tensor, p_buf: Tensor, s_buf: Tensor,
                      history: Tensor | None = None) -> Tensor:
    """One launch for what a decode step's host loop did in five: ``t_buf <- tok``, ``p_buf <- pos``
    (``[B]`` or ``[B, 1]`` each), ``s_buf <- slot`` (0-d), ``history <- tok`` (a ``[B]`` view, e.g.
    a column of the output tokens) when given; returns ``pos + 1`` (the next step's positions)."""
    B = tok.numel()
    if pos.numel() != B or t_buf.numel() != B or p_buf.numel() != B or s_buf.numel() != 1:
        raise ValueError("stage_step_inputs: one token and one position per row, a 0-d slot buffer")
    tok, pos = tok.reshape(B).contiguous(), pos.reshape(B).contiguous()
    if not (t_buf.is_contiguous() and p_buf.is_contiguous()):
        raise ValueError("stage_step_inputs: contiguous input buffers")
    nxt = torch.empty_like(pos)
    hist = history if history is not None else tok
    stage_kernel[(1,)](tok, pos, t_buf, p_buf, s_buf, hist, nxt, slot, B, hist.stride(0),
                       BLOCK=triton.next_power_of_2(B), HIST=history is not None, num_warps=1)
    return nxt
