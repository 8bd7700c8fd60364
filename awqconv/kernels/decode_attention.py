"""Single-token (decode) attention over the static KV cache, split along the cache (flash-decoding).

One program per (batch row, query head, cache slice): it streams its slice of K and V once, keeping
an online softmax (running max, running sum, fp32 accumulator). With several slices, each program
parks (max, sum, accumulator) in the shared workspace and the last one of its head (a ticket, as in
the split-K GEMVs) merges them in slice order, so the result is deterministic. Grouped-query heads
read their KV head directly (no repeat). ``bias`` is the runtime's additive mask (0 or -inf) for the
step. It replaces SDPA for T = 1 on the GPU (H100, Llama-2-7B shape: 7.1 (9.2 without early reads)
against SDPA's 10.2 us per layer at 512 slots, 17.5 against 18.6 at 2048) and joins the PDL chain;
given the step's cache slot it may start reading the cache before the previous kernel ends.
(RoPE and the cache write folded in here, one kernel fewer per layer, measured slower on the H100.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .gemv_f16x2 import x16_from_f32
from .launch import pdl_launch, pdl_start, pdl_wait
from .workspace import WORKSPACE
from .x16 import X16

MAX_SPLIT = 32
MAX_BLOCK_S = 128
SLICE = 64  # cache slots per slice by default (H100: best at 512 and 2048 slots)
EARLY_MAX_S = 512  # early cache reads help up to here (see decode_attention)


@triton.jit
def _kv_block(kb, vb, rs, hi, rd, md, stride_ks, stride_vs, fresh=None):
    """K and V rows ``rs`` (< hi) of one head; ``fresh`` (optional) restricts the load to those rows."""
    m2 = (rs < hi)[:, None] & md[None, :]
    if fresh is not None:
        m2 = m2 & fresh[:, None]
    k = tl.load(kb + rs[:, None] * stride_ks + rd[None, :], mask=m2, other=0.0)
    v = tl.load(vb + rs[:, None] * stride_vs + rd[None, :], mask=m2, other=0.0)  # issued with k
    return k, v


@triton.jit
def softcap(x, cap):
    """cap * tanh(x / cap) in fp32 (Gemma's soft-capping), tanh as 1 - 2 / (exp(2t) + 1): +-1 where
    exp overflows or vanishes, no NaN."""
    return cap * (1.0 - 2.0 / (tl.exp(2.0 * x / cap) + 1.0))


@triton.jit
def _attend(k, v, q, bias_row, rs, hi, m_i, l_i, acc, cap, SOFTCAP: tl.constexpr):
    """One block of the online softmax: scores (soft-capped by ``cap`` with ``SOFTCAP``, before
    the mask, as transformers does), running max/sum and the fp32 accumulator."""
    bias = tl.load(bias_row + rs, mask=rs < hi, other=float("-inf")).to(tl.float32)
    sc = tl.sum(k.to(tl.float32) * q[None, :], axis=1)
    if SOFTCAP:
        sc = softcap(sc, cap)
    sc = sc + bias
    m_new = tl.maximum(m_i, tl.max(sc, axis=0))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # an all-masked block adds nothing
    p = tl.exp(sc - m_ref)
    alpha = tl.exp(m_i - m_ref)
    return m_new, l_i * alpha + tl.sum(p, axis=0), acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)


@triton.jit
def _store_out(ptrs, o, mask, X16: tl.constexpr):
    if X16:
        tl.store(ptrs, x16_from_f32(o), mask=mask)
    else:
        tl.store(ptrs, o.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def decode_attention_kernel(q_ptr, k_ptr, v_ptr, bias_ptr, slot_ptr, o_ptr, ws_ptr, cnt_ptr,
                            S, CHUNK, N_SPLIT, H, GROUP, scale, cap,
                            stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs, stride_bias,
                            D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
                            SPLIT_P2: tl.constexpr, EARLY: tl.constexpr = False, USE_PDL: tl.constexpr = False,
                            X16: tl.constexpr = False, LIMIT: tl.constexpr = False,
                            SOFTCAP: tl.constexpr = False):
    """X16: the output (bf16 values) is stored as fp16 o / 16 for the o projection's GEMV (x16.py).
    EARLY: the first K/V block is loaded before waiting for the previous kernel (the cache rows of
    earlier steps do not change within a step), and only the row at this step's slot (``slot_ptr``),
    which the previous kernel (RoPE + cache write, alone or in the QKV GEMV) just stored, is read
    again after the wait.
    LIMIT: slots after ``slot_ptr``'s are not read (they are the future; the caller's bias masks
    them): a slice wholly past it loads nothing and parks an empty (max -inf, sum 0) state.
    (Slices looped through Triton's shared-memory pipeline measured 1.1-4x slower on the H100.)"""
    pdl_start(USE_PDL)
    bh = tl.program_id(0)
    sp = tl.program_id(1)
    b = bh // H
    kh = (bh % H) // GROUP
    rd = tl.arange(0, BLOCK_D)
    md = rd < D
    kb = k_ptr + b * stride_kb + kh * stride_kh
    vb = v_ptr + b * stride_vb + kh * stride_vh
    lo = sp * CHUNK
    hi = tl.minimum(lo + CHUNK, S)
    if LIMIT:  # the slot is filled before the step's kernels run (not by the previous kernel)
        hi = tl.minimum(hi, tl.load(slot_ptr).to(tl.int32) + 1)
    bias_row = bias_ptr + b * stride_bias
    rs = lo + tl.arange(0, BLOCK_S)
    if EARLY:
        k, v = _kv_block(kb, vb, rs, hi, rd, md, stride_ks, stride_vs)
        pdl_wait(USE_PDL)
        now = rs == tl.load(slot_ptr)
        k2, v2 = _kv_block(kb, vb, rs, hi, rd, md, stride_ks, stride_vs, now)
        k = tl.where(now[:, None], k2, k)
        v = tl.where(now[:, None], v2, v)
    else:
        pdl_wait(USE_PDL)  # q, the cache and the mask are this step's
        k, v = _kv_block(kb, vb, rs, hi, rd, md, stride_ks, stride_vs)
    q = tl.load(q_ptr + bh * D + rd, mask=md, other=0.0).to(tl.float32) * scale
    m_i, l_i, acc = _attend(k, v, q, bias_row, rs, hi, tl.full((), float("-inf"), tl.float32),
                            tl.zeros((), tl.float32), tl.zeros((BLOCK_D,), tl.float32), cap, SOFTCAP)
    for s0 in range(lo + BLOCK_S, hi, BLOCK_S):
        rs = s0 + tl.arange(0, BLOCK_S)
        k, v = _kv_block(kb, vb, rs, hi, rd, md, stride_ks, stride_vs)
        m_i, l_i, acc = _attend(k, v, q, bias_row, rs, hi, m_i, l_i, acc, cap, SOFTCAP)
    _finish(acc, m_i, l_i, o_ptr + bh * D, ws_ptr, cnt_ptr, bh, sp, N_SPLIT, rd, md, BLOCK_D, SPLIT_P2, X16)


@triton.jit
def _finish(acc, m_i, l_i, o_row, ws_ptr, cnt_ptr, bh, sp, N_SPLIT, rd, md, BLOCK_D: tl.constexpr,
            SPLIT_P2: tl.constexpr, X16: tl.constexpr):
    """One slice's state out: the output itself (one slice), else parked for the head's last slice
    (a ticket), which merges all of them in slice order."""
    if SPLIT_P2 == 1:
        _store_out(o_row + rd, acc / l_i, md, X16)
    else:
        W: tl.constexpr = BLOCK_D + 2  # one parked row: accumulator, max, sum
        row = ws_ptr + (bh * SPLIT_P2 + sp) * W
        tl.store(row + rd, acc)
        tl.store(row + BLOCK_D, m_i)
        tl.store(row + BLOCK_D + 1, l_i)
        tl.debug_barrier()
        ticket = tl.atomic_add(cnt_ptr + bh, 1, sem="acq_rel")
        if ticket == N_SPLIT - 1:
            rsp = tl.arange(0, SPLIT_P2)
            live = rsp < N_SPLIT
            rows = ws_ptr + (bh * SPLIT_P2 + rsp) * W
            ms_ = tl.load(rows + BLOCK_D, mask=live, other=float("-inf"), cache_modifier=".cg")
            ls_ = tl.load(rows + BLOCK_D + 1, mask=live, other=0.0, cache_modifier=".cg")
            accs = tl.load(rows[:, None] + rd[None, :], mask=live[:, None], other=0.0, cache_modifier=".cg")
            m_all = tl.max(ms_, axis=0)
            w = tl.exp(ms_ - tl.where(m_all == float("-inf"), 0.0, m_all))
            out = tl.sum(accs * w[:, None], axis=0) / tl.sum(ls_ * w, axis=0)
            _store_out(o_row + rd, out, md, X16)
            tl.atomic_xchg(cnt_ptr + bh, 0)


def decode_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, n_split: int | None = None,
                     slot: Tensor | None = None, early: bool | None = None, x16: bool = False,
                     pdl: bool = True, scale: float | None = None, cap: float | None = None) -> Tensor | X16:
    """softmax(q k^T * scale + bias) v for one query token (``x16``: as an ``X16``, for bf16 q);
    ``scale`` defaults to 1 / sqrt(D); ``cap``: the scores soft-capped to cap * tanh(s / cap)
    before the mask (Gemma 2).

    ``q [B, H, 1, D]``; ``k, v [B, HKV, S, D]`` (views into the cache; any strides with a contiguous
    last dim); ``bias [B, 1, 1, S]`` additive, last dim contiguous. Returns ``[B, H, 1, D]``.
    ``n_split`` forces the number of cache slices. By default slices are 64 slots (up to
    ``MAX_SPLIT`` per head): at decode lengths each program then loads its q, K, V and mask once, all
    in flight together (the kernel is latency-bound: a loop of dependent loads cost more than SDPA's
    launch). ``slot`` (int64 [1], on the device) is the only cache slot the previous kernels of this
    step wrote, and the newest: slots after it are not read (the runtime's bias masks them; at
    power-of-two cache buckets they are up to half the slots). With it, ``early`` (default:
    S <= EARLY_MAX_S) reads the first cache block before the previous kernel finishes and that
    slot's row again after. It overlaps the previous kernel's tail
    at short contexts and contends with its reads at long ones (H100: 9.1 -> 7.1 us per layer at 512
    slots, 11.2 -> 12.6 at 1024). 4 warps up to 8192 cache elements a block, else 8. ``pdl``:
    programmatic dependent launch where supported (launch.py).
    """
    B, H, T, D = q.shape
    HKV, S = k.shape[1], k.shape[2]
    if T != 1 or H % HKV or k.stride(3) != 1 or v.stride(3) != 1 or bias.stride(3) != 1:
        raise ValueError("decode_attention: one query token, H a multiple of the KV heads, contiguous last dims")
    q = q.contiguous()
    if n_split is None:
        n_split = triton.cdiv(S, SLICE)
    if early is None:
        early = S <= EARLY_MAX_S
    early = early and slot is not None
    n_split = max(1, min(n_split, MAX_SPLIT, S))
    chunk = triton.cdiv(S, n_split)
    block_s = min(MAX_BLOCK_S, max(16, triton.next_power_of_2(chunk)))
    chunk = triton.cdiv(chunk, block_s) * block_s
    n_split = triton.cdiv(S, chunk)  # no empty slices
    split_p2 = triton.next_power_of_2(n_split) if n_split > 1 else 1
    block_d = triton.next_power_of_2(D)
    ws, cnt = WORKSPACE.get(q.device, B * H * split_p2 * (block_d + 2), B * H)
    if x16 and q.dtype != torch.bfloat16:
        raise TypeError(f"X16 output needs bf16 attention, got {q.dtype}")
    out = torch.empty_like(q, dtype=torch.float16 if x16 else q.dtype)
    decode_attention_kernel[(B * H, n_split)](
        q, k, v, bias, bias if slot is None else slot, out, ws, cnt, S, chunk, n_split, H, H // HKV,
        D ** -0.5 if scale is None else scale, cap or 1.0,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), bias.stride(0),
        D=D, BLOCK_D=block_d, BLOCK_S=block_s, SPLIT_P2=split_p2, EARLY=early, X16=x16,
        LIMIT=slot is not None, SOFTCAP=cap is not None, num_warps=4 if block_s * block_d <= 8192 else 8,
        **pdl_launch(q.device, pdl))
    return X16(out) if x16 else out
