"""Triton W4A16 pieces over the kernel layout (layout.py): what every INT4 kernel shares (nibble
unpacking, the split-K merges), the fp32 CUDA-core GEMV and the dequantise kernel.

A split-K program either parks its fp32 partial sums in the workspace for ``w4_merge_kernel`` (a
second launch: the one-row fp16x2 GEMV, gemv_f16x2.py, and the transposed tile, tile_t.py) or, in
the fp32 GEMV, adds them there and the last program of the output tile (a ticket counter) sums them
in split order, adds the bias, stores, and re-arms the ticket, so one launch does the whole linear
(no memset, no cast kernel; CUDA-graph safe). Everything also runs under TRITON_INTERPRET=1 on the CPU.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .launch import pdl_start as _pdl_start
from .launch import pdl_wait as _pdl_wait


@triton.jit
def _round_to(v, dtype: tl.constexpr):
    """fp32 -> ``dtype`` with round-to-nearest-even done in integers for bf16 (the interpreter
    truncates a plain bf16 cast; GPUs round), so dequantised weights are bit-exact everywhere."""
    if dtype == tl.bfloat16:
        b = v.to(tl.int32, bitcast=True)
        b = b + 0x7FFF + ((b >> 16) & 1)
        return (b >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(dtype)


@triton.jit
def _nibble_shift(j):
    """Bit offset of q[8w + j] in word w (layout.NIBBLE_SHIFTS): pairs (2i, 2i+1) at 4i and 16 + 4i."""
    return (j >> 1) * 4 + (j & 1) * 16


@triton.jit
def _nibbles_f32(w, shift):
    """int32 words >> shift & 15 as fp32 without an int->float convert: OR into the mantissa of
    2^23 and subtract 2^23 (exact)."""
    return (((w >> shift) & 15) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _merged(acc, rm, rn, M, N, ws_ptr, cnt_ptr, tile_id, pid_k, SPLIT_K, SPLIT_P2: tl.constexpr):
    """(last, total) of a tile: without split-K (SPLIT_P2 = 1) this program's ``acc``; under split-K
    (SPLIT_P2 = next power of two >= SPLIT_K) every program parks its fp32 partial and only the last
    one of the tile (a ticket) gets the sum of all partials in a fixed order (deterministic). Its
    loads are unrolled and predicated, not a runtime loop, so they are all in flight at once: one L2
    round trip, not SPLIT_K of them, at the end of every kernel. The caller stores the total and
    re-arms the ticket (``_rearm``)."""
    if SPLIT_P2 == 1:
        return True, acc
    else:
        mask = (rm < M)[:, None] & (rn < N)[None, :]
        ws_tile = ws_ptr + rm[:, None] * N + rn[None, :]
        tl.store(ws_tile + pid_k * M * N, acc, mask=mask)
        tl.debug_barrier()  # every warp's partial is written before the release below
        ticket = tl.atomic_add(cnt_ptr + tile_id, 1, sem="acq_rel")
        last = ticket == SPLIT_K - 1
        tot = tl.zeros_like(acc)
        if last:
            for kk in tl.static_range(SPLIT_P2):
                live = mask & ((rn * 0 + kk) < SPLIT_K)[None, :]
                tot += tl.load(ws_tile + kk * M * N, mask=live, other=0.0, cache_modifier=".cg")
        return last, tot


@triton.jit
def _rearm(cnt_ptr, tile_id, SPLIT_P2: tl.constexpr):
    """The last program of a split tile sets its ticket back to zero (after its stores)."""
    if SPLIT_P2 > 1:
        tl.atomic_xchg(cnt_ptr + tile_id, 0)


@triton.jit
def _finish_tile(acc, rm, rn, M, N, y_ptr, stride_ym, b_ptr, ws_ptr, cnt_ptr, tile_id, pid_k, SPLIT_K,
                 SPLIT_P2: tl.constexpr, HAS_BIAS: tl.constexpr, PARK: tl.constexpr = False):
    """Store a tile (bias added, cast once), merging split-K partials first (``_merged``); with
    ``PARK`` every program only parks its partial (no bias), for a merge kernel to sum."""
    if PARK:
        tl.store(ws_ptr + pid_k * M * N + rm[:, None] * N + rn[None, :], acc,
                 mask=(rm < M)[:, None] & (rn < N)[None, :])
        return
    last, tot = _merged(acc, rm, rn, M, N, ws_ptr, cnt_ptr, tile_id, pid_k, SPLIT_K, SPLIT_P2)
    if last:
        if HAS_BIAS:
            tot += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        mask = (rm < M)[:, None] & (rn < N)[None, :]
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], tot.to(y_ptr.dtype.element_ty), mask=mask)
        _rearm(cnt_ptr, tile_id, SPLIT_P2)


@triton.jit
def w4_merge_kernel(ws_ptr, b_ptr, y_ptr, M, N, SPLIT_K, stride_ym, SPLIT_P2: tl.constexpr,
                    HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr = False):
    """The split-K merge as its own kernel after a parking launch (``PARK``): y = sum of the parked
    partials in split order (+ bias), cast once: the same bits as the last-program merge, without a
    fence and ticket round trip at the end of every program of the GEMV."""
    _pdl_start(USE_PDL)
    _pdl_wait(USE_PDL)
    m = tl.program_id(1)
    rn = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mn = rn < N
    tot = sum_parked(ws_ptr + m * N, b_ptr, rn, mn, M * N, SPLIT_K, SPLIT_P2, HAS_BIAS)
    tl.store(y_ptr + m * stride_ym + rn, tot.to(y_ptr.dtype.element_ty), mask=mn)


@triton.jit
def sum_parked(ws_ptr, b_ptr, cols, mask, SPLIT_STRIDE, SPLIT_K, SPLIT_P2: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Columns ``cols`` of one output row from its parked split-K partials (``ws_ptr`` at the row,
    splits ``SPLIT_STRIDE`` apart): summed in split order, all loads in flight, plus the bias; fp32."""
    tot = tl.zeros(cols.shape, dtype=tl.float32)
    for kk in tl.static_range(SPLIT_P2):
        tot += tl.load(ws_ptr + kk * SPLIT_STRIDE + cols, mask=mask & (cols * 0 + kk < SPLIT_K), other=0.0,
                       cache_modifier=".cg")
    if HAS_BIAS:
        tot += tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    return tot


@triton.jit
def _tile_index(BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's split index and its row and column ranges (grid: column tiles, row tiles, K splits)."""
    pid_m = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    return tl.program_id(2), rm, rn


@triton.jit
def _tile_id():
    """The output tile's ticket index (column tiles fastest)."""
    return tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)


@triton.jit
def w4_gemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
                   M, N, K, G, K_SPLIT, SPLIT_K, stride_xm, stride_ym,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KC: tl.constexpr,
                   SPLIT_P2: tl.constexpr, HAS_BIAS: tl.constexpr, USE_PDL: tl.constexpr = False):
    """Up to BLOCK_M rows on CUDA cores in fp32: each packed word is loaded once and expanded to its
    8 nibbles; the scale and zero are applied once per (chunk, column): sum_k (q - z) s x =
    s (sum_k q x - z sum_k x). Split-K partials merge through the tile's ticket (``_finish_tile``)."""
    _pdl_start(USE_PDL)
    _pdl_wait(USE_PDL)
    pid_k, rm, rn = _tile_index(BLOCK_M, BLOCK_N)
    pid_m = tl.program_id(1)
    rw = tl.arange(0, KC // 8)
    rj = tl.arange(0, 8)
    shifts = _nibble_shift(rj)
    mn = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_lo = pid_k * K_SPLIT
    k_hi = tl.minimum(k_lo + K_SPLIT, K)
    for k0 in range(k_lo, k_hi, KC):
        w = tl.load(qw_ptr + (k0 // 8 + rw)[:, None] * N + rn[None, :], mask=mn[None, :], other=0,
                    eviction_policy="evict_first")  # [KC/8, BN]
        q = _nibbles_f32(w[:, None, :], shifts[None, :, None])  # [KC/8, 8, BN]
        koff = k0 + rw[:, None] * 8 + rj[None, :]  # [KC/8, 8]
        g = k0 // G
        s = tl.load(s_ptr + g * N + rn, mask=mn, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + g * N + rn, mask=mn, other=0).to(tl.float32)
        for mi in tl.static_range(BLOCK_M):
            row = pid_m * BLOCK_M + mi
            rowv = koff * 0 + row
            x = tl.load(x_ptr + row * stride_xm + koff, mask=(koff < K) & (rowv < M), other=0.0,
                        eviction_policy="evict_last").to(tl.float32)  # [KC/8, 8]
            qx = tl.sum(tl.sum(x[:, :, None] * q, axis=1), axis=0)  # [BN]
            xs = tl.sum(tl.sum(x, axis=1), axis=0)
            part = s * (qx - z * xs)
            acc += tl.where((tl.arange(0, BLOCK_M) == mi)[:, None], part[None, :], 0.0)
    _finish_tile(acc, rm, rn, M, N, y_ptr, stride_ym, b_ptr, ws_ptr, cnt_ptr, _tile_id(), pid_k, SPLIT_K, SPLIT_P2,
                 HAS_BIAS)


@triton.jit
def w4_dequant_kernel(qw_ptr, s_ptr, z_ptr, w_ptr, N, K, G,
                      BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, EXPAND: tl.constexpr = True):
    """Dense W [K, N] = (q - z) * s computed in fp32 and rounded once to the output dtype.

    EXPAND (BLOCK_K divides G): each packed word is loaded once and expanded to its 8 rows, and the
    tile's one row of scales and zeros is loaded once; otherwise one (L1-served) word load per
    element and per-row scales."""
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mn = rn < N
    if EXPAND:
        k0 = pid_k * BLOCK_K
        rw = tl.arange(0, BLOCK_K // 8)
        w = tl.load(qw_ptr + (k0 // 8 + rw)[:, None] * N + rn[None, :], mask=mn[None, :], other=0)
        q = tl.reshape(_nibbles_f32(w[:, None, :], _nibble_shift(tl.arange(0, 8))[None, :, None]), (BLOCK_K, BLOCK_N))
        g = (k0 // G) * N + rn
        s = tl.load(s_ptr + g, mask=mn, other=0.0).to(tl.float32)[None, :]
        z = tl.load(z_ptr + g, mask=mn, other=0).to(tl.float32)[None, :]
        rk = k0 + tl.arange(0, BLOCK_K)
        mask = (rk < K)[:, None] & mn[None, :]
    else:
        rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        mask = (rk < K)[:, None] & mn[None, :]
        w = tl.load(qw_ptr + (rk // 8)[:, None] * N + rn[None, :], mask=mask, other=0)
        q = (w >> _nibble_shift(rk % 8)[:, None]) & 15
        g = (rk // G)[:, None] * N + rn[None, :]
        s = tl.load(s_ptr + g, mask=mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + g, mask=mask, other=0).to(tl.float32)
    tl.store(w_ptr + rk[:, None] * N + rn[None, :], _round_to((q.to(tl.float32) - z) * s, w_ptr.dtype.element_ty),
             mask=mask)
