"""Chained one-row GEMVs: split-K sums in fixed-point atomics, finished by the next GEMV's prologue.

A decode step's projections otherwise end in a merge kernel each (gemv_fused.py). Here every
program of the one-row fp16x2 GEMV (triton_w4) adds its partial sums into zeroed int64
accumulators (``to_fixed``; the same bits in any order, pending_sum.py), and the next GEMV takes
that row as a ``PendingResidual`` or ``PendingSilu``: after its first weight loads and the PDL
wait, each program computes the slice of the input it reads, as the merge kernel would (same
roundings), writes it to a scratch row and reads it back in its K loop. Programs of the same slice
write the same bits to the same places, so the repeats do no harm. The programs of the first column
tile also store s = residual + y (the new residual row) and the sums of s^2 of their slices: the
pending RMSNorm's scale, which the RoPE merge (after QKV) or the SiLU prologue (after gate/up) applies.

Per layer of a decode step: QKV GEMV -> RoPE merge -> attention -> o GEMV -> gate/up GEMV -> down
GEMV, against three more merge kernels in gemv_fused.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..errors import ShapeError
from .gemv_fused import (
    _finished,
    _pending_scale,
    residual_merge,
    rope_merge,
    silu_merge,
)
from .launch import pdl_launch, pdl_start, pdl_wait
from .layout import KernelWeight
from .pending_norm import PendingNorm
from .pending_sum import PendingResidual, PendingSilu, PendingSum, SumPool
from .triton_w4 import (
    _gemv_f16x2_load_wsz,
    _gemv_f16x2_unscale,
    _round_to,
    from_fixed,
    gemv_f16x2_stream,
    to_fixed,
    x16_from_f32,
)
from .x16 import X16

PROLOGUE_BLOCK = 128  # input values per step of a program's prologue

_PLAIN, _RESIDUAL, _SILU = 0, 1, 2  # the GEMV's input: a row, a PendingResidual, a PendingSilu


@triton.jit
def _residual_prologue(x_ptr, in_ptr, in_b_ptr, res_ptr, s_out_ptr, nw_ptr, sq_out_ptr, headroom, k_lo, k_hi,
                       pid_k, KEEP, IN_BIAS: tl.constexpr, ADT: tl.constexpr, X16: tl.constexpr,
                       BLOCK: tl.constexpr):
    """Input rows [k_lo, k_hi) of a ``PendingResidual``: s = residual + y, ``w * s * headroom`` to
    ``x_ptr`` (residual_merge_kernel's values); with ``KEEP`` also s and its slice's sum of s^2."""
    sq = tl.zeros([BLOCK], dtype=tl.float32)
    for k in range(k_lo, k_hi, BLOCK):
        j = k + tl.arange(0, BLOCK)
        m = j < k_hi
        y = _finished(from_fixed(tl.load(in_ptr + j, mask=m, other=0, cache_modifier=".cg")), 1.0, in_b_ptr, j, m,
                      IN_BIAS, ADT)
        sv = (tl.load(res_ptr + j, mask=m, other=0.0, cache_modifier=".cg").to(tl.float32) + y).to(ADT)
        if KEEP:
            tl.store(s_out_ptr + j, sv, mask=m)
        sv = sv.to(tl.float32)
        sq += sv * sv
        xw = _round_to(tl.load(nw_ptr + j, mask=m, other=0.0).to(tl.float32) * headroom * sv, ADT)
        if X16:
            tl.store(x_ptr + j, x16_from_f32(xw.to(tl.float32)), mask=m)
        else:
            tl.store(x_ptr + j, xw, mask=m)
    if KEEP:
        tl.store(sq_out_ptr + pid_k, tl.sum(sq, axis=0))


@triton.jit
def _silu_prologue(x_ptr, in_ptr, in_b_ptr, I, r, k_lo, k_hi, IN_BIAS: tl.constexpr, ADT: tl.constexpr,
                   X16: tl.constexpr, BLOCK: tl.constexpr):
    """Input rows [k_lo, k_hi) of a ``PendingSilu``: silu(gate) * up to ``x_ptr`` (silu_merge_kernel's values)."""
    for k in range(k_lo, k_hi, BLOCK):
        j = k + tl.arange(0, BLOCK)
        m = j < k_hi
        tg = from_fixed(tl.load(in_ptr + j, mask=m, other=0, cache_modifier=".cg"))
        tu = from_fixed(tl.load(in_ptr + I + j, mask=m, other=0, cache_modifier=".cg"))
        g = _finished(tg, r, in_b_ptr, j, m, IN_BIAS, ADT)
        u = _finished(tu, r, in_b_ptr, I + j, m, IN_BIAS, ADT)
        a = (g / (1.0 + tl.exp(-g))).to(ADT).to(tl.float32)
        if X16:
            tl.store(x_ptr + j, x16_from_f32(a * u), mask=m)
        else:
            tl.store(x_ptr + j, (a * u).to(ADT), mask=m)


@triton.jit
def w4_gemv_chain_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, out_ptr, in_ptr, in_b_ptr, res_ptr, s_out_ptr, nw_ptr,
                         sq_out_ptr, sq_in_ptr, N_SQ_IN, H_NORM, eps, unscale, headroom, N, K, G, K_SPLIT,
                         BLOCK_N: tl.constexpr, KC: tl.constexpr, MODE: tl.constexpr, IN_BIAS: tl.constexpr,
                         ADT: tl.constexpr, X16: tl.constexpr, SQ_P2: tl.constexpr, PRO_BLOCK: tl.constexpr,
                         USE_ASM: tl.constexpr = True, USE_PDL: tl.constexpr = False):
    """The one-row fp16x2 GEMV (grid: column tiles, K splits) adding its sums to ``out_ptr`` as
    fixed point. ``MODE`` 0: ``x_ptr`` is the input row; 1 / 2: the input is the previous GEMV's
    sums at ``in_ptr``, finished into ``x_ptr`` by this program's prologue for its own K slice."""
    pdl_start(USE_PDL)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mn = rn < N
    rw = tl.arange(0, KC // 8)
    k_lo = pid_k * K_SPLIT
    k_hi = tl.minimum(k_lo + K_SPLIT, K)
    w_ptrs = qw_ptr + rw[:, None] * N + rn[None, :]
    w, s, z = _gemv_f16x2_load_wsz(w_ptrs, s_ptr, z_ptr, k_lo, rw, rn, mn, N, G)  # constants: before the wait
    pdl_wait(USE_PDL)
    if MODE == 1:
        _residual_prologue(x_ptr, in_ptr, in_b_ptr, res_ptr, s_out_ptr, nw_ptr, sq_out_ptr, headroom, k_lo, k_hi,
                           pid_k, pid_n == 0, IN_BIAS, ADT, X16, PRO_BLOCK)
        tl.debug_barrier()  # the slice is in memory before any thread of the program reads it back
    elif MODE == 2:
        r = _pending_scale(sq_in_ptr, N_SQ_IN, H_NORM, eps, unscale, SQ_P2)
        _silu_prologue(x_ptr, in_ptr, in_b_ptr, K, r, k_lo, k_hi, IN_BIAS, ADT, X16, PRO_BLOCK)
        tl.debug_barrier()
    xdt: tl.constexpr = x_ptr.dtype.element_ty
    acc2 = tl.zeros((KC // 8, BLOCK_N), dtype=tl.float32)
    acc2 = gemv_f16x2_stream(w, s, z, acc2, w_ptrs, x_ptr.to(tl.pointer_type(tl.int32)), s_ptr, z_ptr, k_lo, k_hi,
                             rw, rn, mn, N, G, KC, xdt, USE_ASM)
    y = _gemv_f16x2_unscale(xdt, X16) * tl.sum(acc2, axis=0)
    tl.atomic_add(out_ptr + rn, to_fixed(y), mask=mn, sem="relaxed")


def _adt(dtype: torch.dtype):
    return tl.bfloat16 if dtype == torch.bfloat16 else tl.float16


def chain_gemv(x: Tensor | X16 | PendingSum, kw: KernelWeight, pool: SumPool) -> tuple[Tensor, int, Tensor | None]:
    """One row through ``kw`` into fixed-point sums: (accumulators [1, N] from ``pool``, the split
    count, the sums of s^2 per split where ``x`` is a ``PendingResidual``, else None). Its s is
    stored as the ``PendingResidual`` asks."""
    from .ops import _INTERPRET, _PTX, _split_for, default_config

    N, K = kw.out_features, kw.in_features
    mode = _RESIDUAL if isinstance(x, PendingResidual) else _SILU if isinstance(x, PendingSilu) else _PLAIN
    if mode == _PLAIN:
        x16 = isinstance(x, X16)
        row = x.t if x16 else x
        dtype = torch.bfloat16 if x16 else row.dtype
        if row.data_ptr() % 16:  # read as aligned int32 pairs
            row = row.clone()
    else:
        x16, dtype = x.x16, x.dtype
        row = torch.empty(1, K, dtype=torch.float16 if x16 else dtype, device=x.acc.device)
    if (x.width if mode != _PLAIN else row.shape[-1]) != K:
        raise ShapeError(f"chain_gemv: the weight takes {K} inputs, the row has "
                         f"{x.width if mode != _PLAIN else row.shape[-1]}")
    cfg = default_config(1, kw, row.device, dtype)
    split, k_split = _split_for(cfg, triton.cdiv(N, cfg.block_n), K, row.device)
    out = pool.take(N)
    sq = torch.empty(split, dtype=torch.float32, device=row.device) if mode == _RESIDUAL else None
    dummy = out
    p_in = x.acc if mode != _PLAIN else dummy
    in_b = x.bias if mode != _PLAIN and x.bias is not None else dummy
    res = s_out = nw = dummy
    sq_in, n_sq_in, h_norm, eps, unscale, headroom = dummy, 1, 1, 0.0, 1.0, 1.0
    if mode == _RESIDUAL:
        res, s_out, nw, headroom = x.residual, x.s, x.w, x.headroom
    elif mode == _SILU:
        sq_in, n_sq_in, h_norm, eps, unscale = x.sumsq, x.sumsq.numel(), x.h_norm, x.eps, x.unscale
    w4_gemv_chain_kernel[(triton.cdiv(N, cfg.block_n), split)](
        row, kw.qw, kw.scales, kw.zeros, out, p_in, in_b, res, s_out, nw, sq if sq is not None else dummy, sq_in,
        n_sq_in, h_norm, eps, unscale, headroom, N, K, kw.group_size, k_split,
        BLOCK_N=cfg.block_n, KC=cfg.kc, MODE=mode, IN_BIAS=mode != _PLAIN and x.bias is not None,
        ADT=_adt(dtype), X16=x16, SQ_P2=triton.next_power_of_2(n_sq_in) if mode == _SILU else 0,
        PRO_BLOCK=PROLOGUE_BLOCK, USE_ASM=_PTX and not _INTERPRET, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, **pdl_launch(row.device, cfg.pdl))
    return out, split, sq


def residual_sum(a: Tensor | X16 | PendingSilu, kw: KernelWeight, residual: Tensor, w: Tensor, eps: float,
                 x16: bool, headroom: float, pool: SumPool) -> tuple[Tensor, PendingResidual]:
    """``a [1, K]`` through ``kw`` (an o or down projection) plus ``residual [1, N]``, left pending:
    (s, to be stored by the consumer, and the ``PendingResidual``)."""
    out, _, _ = chain_gemv(a, kw, pool)
    s = torch.empty_like(residual)
    return s, PendingResidual(out, kw.bias, residual, s, w, eps, headroom, x16, pool)


def gate_up_sum(x: PendingResidual, kw: KernelWeight) -> PendingSilu:
    """The [gate; up] projection of a ``PendingResidual`` (its s stored), left as a ``PendingSilu``."""
    out, _, sq = chain_gemv(x, kw, x.pool)
    return PendingSilu(out, kw.bias, sq, x.width, x.eps, 1.0 / x.headroom, x.dtype, x.x16, x.pool)


def qkv_rope_sum(x: PendingResidual, kw: KernelWeight, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor,
                 slot: Tensor, n_heads: int, n_kv: int, head_dim: int) -> Tensor:
    """The QKV projection of a ``PendingResidual`` (its s stored), then RoPE and the cache write
    (gemv_fused.rope_merge over the fixed-point sums): rotated q as ``qkv_rope`` returns it."""
    out, split, sq = chain_gemv(x, kw, x.pool)
    norm = (sq, split, x.width, x.eps, 1.0 / x.headroom)
    return rope_merge(out, 1, norm, _merge_meta(out, kw.bias, x.dtype, triton.next_power_of_2(split)), kw.bias,
                      cos, sin, k_cache, v_cache, slot, n_heads, n_kv, head_dim)


def _merge_meta(acc: Tensor, bias: Tensor | None, dtype: torch.dtype, sq_p2: int) -> dict:
    """gemv_fused's merge keywords for fixed-point sums (one split)."""
    return dict(SPLIT_P2=1, HAS_BIAS=bias is not None, ADT=_adt(dtype), SQ_P2=sq_p2, **pdl_launch(acc.device))


def materialize_residual(p: PendingResidual) -> PendingNorm:
    """A ``PendingResidual`` for a consumer without a prologue: s stored, the row as a PendingNorm."""
    return residual_merge(p.acc, 1, _merge_meta(p.acc, p.bias, p.dtype, 0), p.bias, p.residual, p.s, p.w, p.eps,
                          p.x16, p.headroom)


def materialize_silu(p: PendingSilu) -> Tensor | X16:
    """A ``PendingSilu`` for a consumer without a prologue: silu(gate) * up as a row."""
    norm = (p.sumsq, p.sumsq.numel(), p.h_norm, p.eps, p.unscale)
    meta = _merge_meta(p.acc, p.bias, p.dtype, triton.next_power_of_2(p.sumsq.numel()))
    return silu_merge(p.acc, 1, norm, meta, p.bias, p.width, p.x16)
