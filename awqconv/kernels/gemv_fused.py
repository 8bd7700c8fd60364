"""The decode step's one-row GEMVs with the next elementwise step fused into their split-K merge.

The GEMV is the plain one-row fp16x2 kernel (gemv_f16x2.py) with every program parking its fp32 partial
sums (``plan_matmul(..., merge=False)``). Instead of the generic merge (``w4_merge_kernel``), one of
the kernels below sums the partials in split order, adds the bias and rounds to the activations'
dtype (the values the plain GEMV would store), then applies the next step:
  - QKV + RoPE (``qkv_rope``): one program per head takes columns d and d + D/2, the pairs RoPE
    rotates; q and k are rotated in fp32 with one rounding (as rope_kv.py), q heads go to
    ``q [1, H, 1, D]``, k and v heads into the caches at this step's slot.
  - gate/up + SiLU (``gate_up_silu``): gate j and up j give silu(gate) * up, rounded as
    norm_act.silu_mul does.
  - o or down + residual (``residual_pending_norm``): s = residual + y, stored with ``w * s`` and the
    block sums of s^2 of the RMSNorm that follows, left pending (pending_norm.py) for the next
    GEMV's merge: its input may be a ``PendingNorm``, whose scale the RoPE and SiLU merges apply.
The fused output itself is never stored. One fp16 or bf16 row only (``fits``). A bf16 row may come
as an ``X16`` (x16.py, fp16 x / 16 written by the producer); then the SiLU step writes its output
as an ``X16`` too, for the down projection's GEMV.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from .config import PTX, default_config
from .gemv_f16x2 import x16_from_f32
from .launch import pdl_launch, pdl_start, pdl_wait
from .layout import KernelWeight
from .norm_act import ACT_CODES, activation
from .ops import plan_matmul
from .pending_norm import PendingNorm
from .rope_kv import head_norm_part, head_rms
from .triton_w4 import _round_to, sum_parked
from .x16 import X16

SILU_BLOCK = 128  # columns per program of the SiLU merge (H100 decode: 0.7 % faster than 256)
RESIDUAL_BLOCK = 256  # columns per program of the residual merge (and per parked sum of s^2)


@triton.jit
def _finished(tot, r, b_ptr, cols, mask, HAS_BIAS: tl.constexpr, ADT: tl.constexpr):
    """Merged one-row GEMV sums ``tot`` (``sum_parked``) scaled by ``r`` (a pending RMSNorm's; exact
    at 1.0), plus the bias, rounded to the activations' dtype (what the plain GEMV stores), as fp32."""
    tot = tot * r
    if HAS_BIAS:
        tot += tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    return tot.to(ADT).to(tl.float32)


@triton.jit
def _pending_scale(sq_ptr, N_SQ, H_NORM, eps, unscale, SQ_P2: tl.constexpr):
    """r = 1 / sqrt(mean(s^2) + eps) of a pending RMSNorm from its parked block sums of s^2 (as
    norm_act's kernel computes it), times ``unscale`` (1 / its headroom, a power of two); 1.0 when
    there is none (``SQ_P2`` = 0)."""
    if SQ_P2 == 0:  # (no early return: the compiler would still build the lines after it)
        r = 1.0
    else:
        i = tl.arange(0, SQ_P2)
        sq = tl.load(sq_ptr + i, mask=i < N_SQ, other=0.0, cache_modifier=".cg")
        r = (1.0 / tl.sqrt_rn(tl.sum(sq, axis=0) / H_NORM + eps)) * unscale
    return r


@triton.jit
def residual_merge_kernel(ws_ptr, b_ptr, res_ptr, w_ptr, s_ptr, xw_ptr, sq_ptr, N, SPLIT, headroom,
                          BLOCK: tl.constexpr, SPLIT_P2: tl.constexpr, HAS_BIAS: tl.constexpr, ADT: tl.constexpr,
                          X16: tl.constexpr = False, USE_PDL: tl.constexpr = False):
    """s = residual + y (y merged and rounded as the plain GEMV stores it, s rounded as norm_act's
    add does), stored; ``w * s * headroom`` stored as the next GEMV's input (``X16``: as fp16 of it
    / 16); the block's sum of s^2 parked at ``sq_ptr[program]``."""
    pdl_start(USE_PDL)
    j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = j < N
    w = tl.load(w_ptr + j, mask=m, other=0.0).to(tl.float32) * headroom  # constants: read before the wait
    pdl_wait(USE_PDL)
    y = _finished(sum_parked(ws_ptr, b_ptr, j, m, N, SPLIT, SPLIT_P2, False), 1.0, b_ptr, j, m, HAS_BIAS, ADT)
    s = (tl.load(res_ptr + j, mask=m, other=0.0).to(tl.float32) + y).to(ADT)
    tl.store(s_ptr + j, s, mask=m)
    s = s.to(tl.float32)
    tl.store(sq_ptr + tl.program_id(0), tl.sum(s * s, axis=0))
    xw = _round_to(w * s, ADT)  # rounded to nearest in the interpreter too (a plain bf16 cast truncates there)
    if X16:
        tl.store(xw_ptr + j, x16_from_f32(xw.to(tl.float32)), mask=m)
    else:
        tl.store(xw_ptr + j, xw, mask=m)


@triton.jit
def rope_merge_kernel(ws_ptr, b_ptr, sq_ptr, N_SQ, H_NORM, eps, unscale, cos_ptr, sin_ptr, q_ptr, kc_ptr, vc_ptr,
                      slot_ptr, N, SPLIT, H, HKV, stride_kh, stride_ks, stride_vh, stride_vs, qn_ptr, kn_ptr, qk_eps,
                      HEAD_D: tl.constexpr, BLOCK: tl.constexpr, SPLIT_P2: tl.constexpr, HAS_BIAS: tl.constexpr,
                      ADT: tl.constexpr, SQ_P2: tl.constexpr = 0, USE_PDL: tl.constexpr = False,
                      QK_NORM: tl.constexpr = False):
    """One head per program: merge its columns (d, d + D/2) (scaled by a pending RMSNorm's r, from
    ``N_SQ`` block sums at ``sq_ptr``, when ``SQ_P2`` > 0), normalise q and k heads (``QK_NORM``:
    weights ``qn_ptr``/``kn_ptr``, as rope_kv.py), rotate them, store q or the cache rows at this
    step's slot (v heads unrotated)."""
    pdl_start(USE_PDL)
    pdl_wait(USE_PDL)  # the partials are the GEMV's; q and the caches are read by the next kernels
    HALF: tl.constexpr = HEAD_D // 2
    head = tl.program_id(0)
    i = tl.arange(0, BLOCK)
    m = i < HALF
    col1, col2 = head * HEAD_D + i, head * HEAD_D + HALF + i
    t1 = sum_parked(ws_ptr, b_ptr, col1, m, N, SPLIT, SPLIT_P2, False)  # in flight before r's loads
    t2 = sum_parked(ws_ptr, b_ptr, col2, m, N, SPLIT, SPLIT_P2, False)
    r = _pending_scale(sq_ptr, N_SQ, H_NORM, eps, unscale, SQ_P2)
    x1 = _finished(t1, r, b_ptr, col1, m, HAS_BIAS, ADT)
    x2 = _finished(t2, r, b_ptr, col2, m, HAS_BIAS, ADT)
    if head < H + HKV:
        if QK_NORM:
            w_ptr = qn_ptr if head < H else kn_ptr
            rr = head_rms(x1, x2, tl.zeros((1,), tl.float32), HEAD_D, qk_eps)
            x1 = head_norm_part(x1, w_ptr, i, m, rr, ADT)
            x2 = head_norm_part(x2, w_ptr, HALF + i, m, rr, ADT)
        c1 = tl.load(cos_ptr + i, mask=m, other=0.0).to(tl.float32)
        c2 = tl.load(cos_ptr + HALF + i, mask=m, other=0.0).to(tl.float32)
        s1 = tl.load(sin_ptr + i, mask=m, other=0.0).to(tl.float32)
        s2 = tl.load(sin_ptr + HALF + i, mask=m, other=0.0).to(tl.float32)
        o1 = x1 * c1 - x2 * s1
        o2 = x2 * c2 + x1 * s2
        if head < H:
            dst = q_ptr + head * HEAD_D
            tl.store(dst + i, o1.to(q_ptr.dtype.element_ty), mask=m)
            tl.store(dst + HALF + i, o2.to(q_ptr.dtype.element_ty), mask=m)
        else:
            dst = kc_ptr + (head - H) * stride_kh + tl.load(slot_ptr) * stride_ks
            tl.store(dst + i, o1.to(kc_ptr.dtype.element_ty), mask=m)
            tl.store(dst + HALF + i, o2.to(kc_ptr.dtype.element_ty), mask=m)
    else:
        dst = vc_ptr + (head - H - HKV) * stride_vh + tl.load(slot_ptr) * stride_vs
        tl.store(dst + i, x1.to(vc_ptr.dtype.element_ty), mask=m)
        tl.store(dst + HALF + i, x2.to(vc_ptr.dtype.element_ty), mask=m)


@triton.jit
def silu_merge_kernel(ws_ptr, b_ptr, sq_ptr, N_SQ, H_NORM, eps, unscale, act_ptr, N, SPLIT, I, BLOCK: tl.constexpr,
                      SPLIT_P2: tl.constexpr, HAS_BIAS: tl.constexpr, ADT: tl.constexpr, SQ_P2: tl.constexpr = 0,
                      X16: tl.constexpr = False, USE_PDL: tl.constexpr = False, ACT: tl.constexpr = 0):
    """act[j] = silu(gate[j]) * up[j] (``ACT``: another of norm_act.ACT_CODES) from the merged
    [gate; up] columns (scaled by a pending RMSNorm's r as in ``rope_merge_kernel``; ``X16``:
    stored as fp16 act / 16)."""
    pdl_start(USE_PDL)
    pdl_wait(USE_PDL)
    j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = j < I
    tg = sum_parked(ws_ptr, b_ptr, j, m, N, SPLIT, SPLIT_P2, False)  # in flight before r's loads
    tu = sum_parked(ws_ptr, b_ptr, I + j, m, N, SPLIT, SPLIT_P2, False)
    r = _pending_scale(sq_ptr, N_SQ, H_NORM, eps, unscale, SQ_P2)
    g = _finished(tg, r, b_ptr, j, m, HAS_BIAS, ADT)
    u = _finished(tu, r, b_ptr, I + j, m, HAS_BIAS, ADT)
    a = activation(g, ACT).to(ADT).to(tl.float32)
    if X16:  # the down projection's input, already as fp16 x / 16
        tl.store(act_ptr + j, x16_from_f32(a * u), mask=m)
    else:
        tl.store(act_ptr + j, (a * u).to(ADT), mask=m)


def rope_shape_ok(n_out: int, n_heads: int, n_kv: int, head_dim: int) -> bool:
    """Whether a QKV output of ``n_out`` columns is these heads (even head_dim)."""
    return n_out == (n_heads + 2 * n_kv) * head_dim and head_dim % 2 == 0


def glu_shape_ok(splits: tuple[int, ...]) -> bool:
    """Whether a fused output split as ``splits`` is [gate; up] halves."""
    return len(splits) == 2 and splits[0] == splits[1]


def fits(kw: KernelWeight, x: Tensor | X16) -> bool:
    """Whether the fused kernels can take ``x``: one fp16 or bf16 (or ``X16``) row whose default
    kernel is the inline-PTX one-row GEMV."""
    x = x.t if isinstance(x, X16) else x
    return x.shape[0] == 1 and default_config(1, kw, x.device, x.dtype).kind == "gemv_f16x2" and PTX


def _parked(x: Tensor | X16 | PendingNorm, kw: KernelWeight, pdl: bool) -> tuple[Tensor, int, tuple, dict]:
    """Run the one-row GEMV with its partials parked: (partials [split, N], split, the merge
    kernels' pending-norm arguments, their common launch keywords: bias, split, dtype, norm, PDL).
    A ``PendingNorm`` row runs the GEMV on its ``w * s``; the merge then applies its scale."""
    pend = x if isinstance(x, PendingNorm) else None
    x = pend.xw if pend is not None else x
    x16 = isinstance(x, X16)
    t = x.t if x16 else x
    cfg = default_config(1, kw, t.device, t.dtype)
    plan = plan_matmul(t, kw, cfg, x16=x16, merge=False, pdl=pdl)
    plan()
    split = plan.grid[2]
    adt = tl.bfloat16 if x16 or t.dtype == torch.bfloat16 else tl.float16
    ws = plan.partials
    norm = ((ws, 0, 1, 0.0, 1.0) if pend is None else
            (pend.sumsq, pend.sumsq.numel(), pend.s.shape[-1], pend.eps, 1.0 / pend.headroom))
    sq_p2 = 0 if pend is None else triton.next_power_of_2(pend.sumsq.numel())
    return ws, split, norm, dict(SPLIT_P2=triton.next_power_of_2(split), HAS_BIAS=kw.bias is not None, ADT=adt,
                                 SQ_P2=sq_p2, **pdl_launch(t.device, pdl))


def qkv_rope(x: Tensor | X16 | PendingNorm, kw: KernelWeight, cos: Tensor, sin: Tensor, k_cache: Tensor,
             v_cache: Tensor, slot: Tensor, n_heads: int, n_kv: int, head_dim: int, pdl: bool = True,
             qk_norm: tuple[Tensor, Tensor, float] | None = None) -> Tensor:
    """``x [1, K]`` through the fused QKV weight, then RoPE and the cache write: returns rotated q as
    ``[1, n_heads, 1, head_dim]`` and stores rotated k and v at ``slot`` (int64 [1], on the device) of
    ``k_cache, v_cache [1, n_kv, S, head_dim]``. ``cos, sin``: this token's ``[head_dim]`` (any view
    with a contiguous last dim); ``qk_norm``: (q weight, k weight, eps) of the per-head RMSNorm
    before RoPE (Qwen3). Same values as ``w4_matmul`` followed by ``rope_kv.rope_kv_write``
    (an ``X16`` row: those of its bf16 row, q in bf16); a ``PendingNorm`` row is normalised here.
    ``pdl``: programmatic dependent launch where supported (launch.py)."""
    if not rope_shape_ok(kw.out_features, n_heads, n_kv, head_dim):
        raise ValueError(f"qkv_rope: {kw.out_features} outputs are not {n_heads} + 2 x {n_kv} heads of "
                         f"{head_dim}")
    xr = x.xw if isinstance(x, PendingNorm) else x
    dt = torch.bfloat16 if isinstance(xr, X16) else xr.dtype
    q = torch.empty(1, n_heads, 1, head_dim, dtype=dt, device=k_cache.device)
    ws, split, norm, meta = _parked(x, kw, pdl)
    rope_merge_kernel[(n_heads + 2 * n_kv,)](
        ws, kw.bias if kw.bias is not None else ws, *norm, cos, sin, q, k_cache, v_cache, slot, kw.out_features,
        split, n_heads, n_kv, k_cache.stride(1), k_cache.stride(2), v_cache.stride(1), v_cache.stride(2),
        *(qk_norm if qk_norm is not None else (ws, ws, 0.0)),
        HEAD_D=head_dim, BLOCK=triton.next_power_of_2(head_dim // 2), num_warps=1 if head_dim <= 128 else 2,
        QK_NORM=qk_norm is not None, **meta)
    return q


def gate_up_silu(x: Tensor | X16 | PendingNorm, kw: KernelWeight, pdl: bool = True, act: str = "silu") -> Tensor | X16:
    """``x [1, K]`` through the fused [gate; up] weight, then silu(gate) * up (``act``: another of
    ``norm_act.ACT_CODES``): ``[1, I]``. Same values as ``w4_matmul`` followed by
    ``norm_act.silu_mul``; for an ``X16`` row, an ``X16`` of them; a ``PendingNorm`` row is
    normalised here."""
    inter = kw.out_features // 2
    if not glu_shape_ok((inter, kw.out_features - inter)):
        raise ValueError(f"gate_up_silu: {kw.out_features} outputs are not two equal halves")
    xr = x.xw if isinstance(x, PendingNorm) else x
    x16 = isinstance(xr, X16)
    t = xr.t if x16 else xr
    out = torch.empty(1, inter, dtype=torch.float16 if x16 else t.dtype, device=t.device)
    ws, split, norm, meta = _parked(x, kw, pdl)
    block = SILU_BLOCK
    silu_merge_kernel[(triton.cdiv(inter, block),)](ws, kw.bias if kw.bias is not None else ws, *norm, out,
                                                    kw.out_features, split, inter, BLOCK=block, X16=x16,
                                                    ACT=ACT_CODES[act], num_warps=2, **meta)
    return X16(out) if x16 else out


def residual_pending_norm(a: Tensor | X16, kw: KernelWeight, residual: Tensor, w: Tensor, eps: float,
                          x16: bool = False, headroom: float = 1.0, pdl: bool = True) -> tuple[Tensor, PendingNorm]:
    """``a [1, K]`` through ``kw`` (an o or down projection) plus ``residual [1, N]``: returns (s, the
    RMSNorm of s with weight ``w`` left pending, pending_norm.py). s has the same bits as
    ``norm_act.add_rms_norm(residual, w4_matmul(a, kw), ...)``'s sum; ``x16`` (bf16): the pending
    row's ``w * s`` as an ``X16``; ``headroom``: a power of two <= 1 it is stored times (for weights
    above 1, so that it cannot overflow where s does not)."""
    if headroom <= 0 or headroom > 1 or math.frexp(headroom)[0] != 0.5:
        raise ValueError(f"residual_pending_norm: headroom must be a power of two <= 1, got {headroom}")
    N = kw.out_features
    if residual.numel() != N or not residual.is_contiguous():
        raise ValueError(f"residual_pending_norm: the residual must be {N} contiguous values, got "
                         f"{tuple(residual.shape)}")
    if x16 and residual.dtype != torch.bfloat16:
        raise TypeError(f"X16 output needs bf16 activations, got {residual.dtype}")
    block = RESIDUAL_BLOCK
    s = torch.empty_like(residual)
    xw = torch.empty(1, N, dtype=torch.float16 if x16 else residual.dtype, device=residual.device)
    sumsq = torch.empty(triton.cdiv(N, block), dtype=torch.float32, device=residual.device)
    ws, split, _, meta = _parked(a, kw, pdl)
    meta.pop("SQ_P2")
    residual_merge_kernel[(sumsq.numel(),)](ws, kw.bias if kw.bias is not None else ws, residual, w, s, xw, sumsq,
                                            N, split, headroom, BLOCK=block, X16=x16,
                                            num_warps=max(1, min(4, block // 32)), **meta)
    return s, PendingNorm(X16(xw) if x16 else xw, sumsq, s, w, eps, headroom)
