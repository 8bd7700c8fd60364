"""Triton W4A16 kernels over the kernel layout (layout.py): GEMV, split-K/tile GEMM and dequantise.

Both matmul kernels use dot-then-scale per group chunk: with a chunk of KC input rows inside one
group, sum_k (q - z) s x = s (sum_k q x - z sum_k x), so the inner loop is unpack + FMA and the
scale/zero cost is paid once per (chunk, column). Split-K programs add fp32 partials into a
self-cleaning workspace; the last program of an output tile (a ticket counter) casts, adds the bias,
stores, and zeroes the workspace and counter again, so one launch does the whole linear (no memset,
no cast kernel; CUDA-graph safe). Everything also runs under TRITON_INTERPRET=1 on the CPU.
"""

from __future__ import annotations

import triton
import triton.language as tl


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
def _nibbles_f32(w, shift):
    """int32 words >> shift & 15 as fp32 without an int->float convert: OR into the mantissa of
    2^23 and subtract 2^23 (exact)."""
    return (((w >> shift) & 15) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _nibbles_half(w, shift, dtype: tl.constexpr):
    """The same for a 16-bit MMA operand: q | 0x6400 is fp16 1024 + q (1024 subtracted here, exact);
    q | 0x4300 is bf16 128 + q, returned as is: the caller adds ``_half_offset`` to the zero point."""
    if dtype == tl.bfloat16:
        return (((w >> shift) & 15) | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        v = (((w >> shift) & 15) | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
        return v - 1024.0


@triton.jit
def _half_offset(dtype: tl.constexpr):
    if dtype == tl.bfloat16:
        return 128.0
    else:
        return 0.0


@triton.jit
def _finish_tile(acc, rm, rn, M, N, y_ptr, stride_ym, b_ptr, ws_ptr, cnt_ptr, tile_id, pid_k, SPLIT_K,
                 USE_SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Store a tile; under split-K, park the fp32 partial and let the last program of the tile sum
    all partials in a fixed order (deterministic), store, and re-arm the tile's ticket."""
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    y_ptrs = y_ptr + rm[:, None] * stride_ym + rn[None, :]
    if not USE_SPLIT:
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        ws_tile = ws_ptr + rm[:, None] * N + rn[None, :]
        tl.store(ws_tile + pid_k * M * N, acc, mask=mask)
        tl.debug_barrier()  # every warp's partial is written before the release below
        ticket = tl.atomic_add(cnt_ptr + tile_id, 1, sem="acq_rel")
        if ticket == SPLIT_K - 1:
            tot = tl.zeros_like(acc)
            for kk in range(SPLIT_K):
                tot += tl.load(ws_tile + kk * M * N, mask=mask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                tot += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptrs, tot.to(y_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(cnt_ptr + tile_id, 0)


@triton.jit
def w4_gemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
                   M, N, K, G, K_SPLIT, SPLIT_K, stride_xm, stride_ym,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KC: tl.constexpr,
                   USE_SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, LATE_REDUCE: tl.constexpr = False):
    """Small M on CUDA cores: each packed word is loaded once and expanded to its 8 nibbles.

    LATE_REDUCE (M = 1): keep a [KC/8, BN] accumulator (the 8 nibbles of a word summed in-thread)
    and reduce across word rows once after the loop instead of every chunk."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rw = tl.arange(0, KC // 8)
    rj = tl.arange(0, 8)
    shifts = rj * 4
    mn = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((KC // 8, BLOCK_N), dtype=tl.float32)
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
        if LATE_REDUCE:
            x = tl.load(x_ptr + pid_m * stride_xm + koff, eviction_policy="evict_last").to(tl.float32)
            qx2 = tl.sum(x[:, :, None] * q, axis=1)  # [KC/8, BN], in-thread over the 8 nibbles
            xs2 = tl.sum(x, axis=1)  # [KC/8]
            acc2 += s[None, :] * (qx2 - z[None, :] * xs2[:, None])
        else:
            for mi in tl.static_range(BLOCK_M):
                row = pid_m * BLOCK_M + mi
                rowv = koff * 0 + row
                x = tl.load(x_ptr + row * stride_xm + koff, mask=(koff < K) & (rowv < M), other=0.0,
                            eviction_policy="evict_last").to(tl.float32)  # [KC/8, 8]
                qx = tl.sum(tl.sum(x[:, :, None] * q, axis=1), axis=0)  # [BN]
                xs = tl.sum(tl.sum(x, axis=1), axis=0)
                part = s * (qx - z * xs)
                acc += tl.where((tl.arange(0, BLOCK_M) == mi)[:, None], part[None, :], 0.0)
    if LATE_REDUCE:
        acc += tl.sum(acc2, axis=0)[None, :]
    tile_id = pid_m * tl.num_programs(0) + pid_n
    _finish_tile(acc, rm, rn, M, N, y_ptr, stride_ym, b_ptr, ws_ptr, cnt_ptr, tile_id, pid_k, SPLIT_K, USE_SPLIT, HAS_BIAS)


@triton.jit
def w4_gemm_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
                   M, N, K, G, K_SPLIT, SPLIT_K, stride_xm, stride_ym,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KC: tl.constexpr,
                   USE_SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, EXPAND: tl.constexpr = True,
                   DOT_F32: tl.constexpr = False):
    """Tensor-core tiles: unpack a [KC, BN] chunk (one group) in registers, dot, then scale."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, KC)
    shift = ((rk % 8) * 4)[:, None]
    rw = tl.arange(0, KC // 8)
    shifts = tl.arange(0, 8) * 4
    mm = rm < M
    mn = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_lo = pid_k * K_SPLIT
    k_hi = tl.minimum(k_lo + K_SPLIT, K)
    for k0 in range(k_lo, k_hi, KC):
        offs_k = k0 + rk
        x = tl.load(x_ptr + rm[:, None] * stride_xm + offs_k[None, :], mask=mm[:, None], other=0.0)
        if EXPAND:  # load each word once, expand to its 8 nibbles, flatten to [KC, BN]
            w = tl.load(qw_ptr + (k0 // 8 + rw)[:, None] * N + rn[None, :], mask=mn[None, :], other=0)
            q = tl.reshape(_nibbles_half(w[:, None, :], shifts[None, :, None], x_ptr.dtype.element_ty),
                           (KC, BLOCK_N))
        else:  # one (L1-served) load per nibble
            w = tl.load(qw_ptr + (offs_k // 8)[:, None] * N + rn[None, :], mask=mn[None, :], other=0)
            q = _nibbles_half(w, shift, x_ptr.dtype.element_ty)
        g = k0 // G
        s = tl.load(s_ptr + g * N + rn, mask=mn, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + g * N + rn, mask=mn, other=0).to(tl.float32) + _half_offset(x_ptr.dtype.element_ty)
        if DOT_F32:  # interpreter only: it multiplies bf16 operands as raw integers
            qx = tl.dot(x.to(tl.float32), q.to(tl.float32))
        else:
            qx = tl.dot(x, q)  # fp32 accumulate
        xs = tl.sum(x.to(tl.float32), axis=1)
        acc += s[None, :] * (qx - z[None, :] * xs[:, None])
    tile_id = pid_m * tl.num_programs(0) + pid_n
    _finish_tile(acc, rm, rn, M, N, y_ptr, stride_ym, b_ptr, ws_ptr, cnt_ptr, tile_id, pid_k, SPLIT_K, USE_SPLIT, HAS_BIAS)


@triton.jit
def w4_dequant_kernel(qw_ptr, s_ptr, z_ptr, w_ptr, N, K, G,
                      BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """Dense W [K, N] = (q - z) * s computed in fp32 and rounded once to the output dtype."""
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rk < K)[:, None] & (rn < N)[None, :]
    w = tl.load(qw_ptr + (rk // 8)[:, None] * N + rn[None, :], mask=mask, other=0)
    q = ((w >> ((rk % 8) * 4)[:, None]) & 15).to(tl.float32)
    g = (rk // G)[:, None] * N + rn[None, :]
    s = tl.load(s_ptr + g, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + g, mask=mask, other=0).to(tl.float32)
    tl.store(w_ptr + rk[:, None] * N + rn[None, :], _round_to((q - z) * s, w_ptr.dtype.element_ty), mask=mask)
