"""Triton W4A16 kernels over the kernel layout (layout.py): GEMV, split-K/tile GEMM and dequantise.

Both matmul kernels use dot-then-scale per group chunk: with a chunk of KC input rows inside one
group, sum_k (q - z) s x = s (sum_k q x - z sum_k x), so the inner loop is unpack + FMA and the
scale/zero cost is paid once per (chunk, column). Split-K programs add fp32 partials into a
self-cleaning workspace; the last program of an output tile (a ticket counter) casts, adds the bias,
stores, and zeroes the workspace and counter again, so one launch does the whole linear (no memset,
no cast kernel; CUDA-graph safe). Everything also runs under TRITON_INTERPRET=1 on the CPU.

USE_PDL (launch.py): the GEMVs load their first weight chunk before waiting for the previous kernel,
so back-to-back linears overlap one kernel's tail and split-K epilogue with the next one's first loads.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .launch import pdl_start as _pdl_start
from .launch import pdl_wait as _pdl_wait
from .x16 import X16_SCALE


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
    fence and ticket round trip at the end of every program of the GEMV (notes, runs BG-BJ)."""
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
                   SPLIT_P2: tl.constexpr, HAS_BIAS: tl.constexpr, LATE_REDUCE: tl.constexpr = False,
                   USE_PDL: tl.constexpr = False):
    """Small M on CUDA cores: each packed word is loaded once and expanded to its 8 nibbles.

    LATE_REDUCE (M = 1): keep a [KC/8, BN] accumulator (the 8 nibbles of a word summed in-thread)
    and reduce across word rows once after the loop instead of every chunk."""
    _pdl_start(USE_PDL)
    _pdl_wait(USE_PDL)
    pid_k, rm, rn = _tile_index(BLOCK_M, BLOCK_N)
    pid_m = tl.program_id(1)
    rw = tl.arange(0, KC // 8)
    rj = tl.arange(0, 8)
    shifts = _nibble_shift(rj)
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
    _finish_tile(acc, rm, rn, M, N, y_ptr, stride_ym, b_ptr, ws_ptr, cnt_ptr, _tile_id(), pid_k, SPLIT_K, SPLIT_P2,
                 HAS_BIAS)


# PTX of the fp16x2 pieces (see _dequant_f16x2 / _dot_f16x2), shared by the split and fused forms
_DEQUANT_PTX = """    mov.b32 m, 0x000F000F;
    mov.b32 c, 0x4C004C00;
    lop3.b32 {d0}, {w}, m, c, 0xEA;
    shr.u32 t, {w}, 4;
    lop3.b32 {d1}, t, m, c, 0xEA;
    shr.u32 t, {w}, 8;
    lop3.b32 {d2}, t, m, c, 0xEA;
    shr.u32 t, {w}, 12;
    lop3.b32 {d3}, t, m, c, 0xEA;
    sub.f16x2 {d0}, {d0}, {o};
    sub.f16x2 {d1}, {d1}, {o};
    sub.f16x2 {d2}, {d2}, {o};
    sub.f16x2 {d3}, {d3}, {o};
"""
_DOT_PTX = """    mul.rn.f16x2 p, {d0}, {x0};
    fma.rn.f16x2 p, {d1}, {x1}, p;
    fma.rn.f16x2 p, {d2}, {x2}, p;
    fma.rn.f16x2 p, {d3}, {x3}, p;
    mov.b32 {{lo, hi}}, p;
    cvt.f32.f16 flo, lo;
    cvt.f32.f16 fhi, hi;
    add.f32 r, flo, fhi;
    mov.b32 {out}, r;
"""
_DEQUANT_ASM = tl.constexpr("{ .reg .b32 m, c, t;\n" + _DEQUANT_PTX.format(d0="$0", d1="$1", d2="$2", d3="$3", w="$4", o="$5") + "}")
_DOT_ASM = tl.constexpr("{ .reg .b32 p; .reg .b16 lo, hi; .reg .f32 flo, fhi, r;\n"
                        + _DOT_PTX.format(d0="$1", d1="$2", d2="$3", d3="$4", x0="$5", x1="$6", x2="$7", x3="$8", out="$0")
                        + "}")
# dequantise + dot of one word in one asm block: the dequantised pairs live only inside it (fewer registers)
_WORD_DOT_ASM = tl.constexpr("{ .reg .b32 m, c, t, a, b, d, e, p; .reg .b16 lo, hi; .reg .f32 flo, fhi, r;\n"
                             + _DEQUANT_PTX.format(d0="a", d1="b", d2="d", d3="e", w="$1", o="$6")
                             + _DOT_PTX.format(d0="a", d1="b", d2="d", d3="e", x0="$2", x1="$3", x2="$4", x3="$5", out="$0")
                             + "}")


@triton.jit
def _dequant_f16x2(w, o):
    """The 8 weights of each word as four fp16x2 registers (q[2i] - z, q[2i+1] - z) / 64, exact.

    One mask of the shifted word ORed into fp16 16.0 gives the pair (16 + q[2i]/64, 16 + q[2i+1]/64)
    (layout.py pairs k = 2i, 2i+1 in the two halves; the fp16 ulp at 16 is 1/64); subtracting
    o = (16 + z/64, 16 + z/64) leaves (q - z)/64 exactly: two weights per instruction."""
    return tl.inline_asm_elementwise(
        asm=_DEQUANT_ASM,
        constraints="=r,=r,=r,=r,r,r", args=[w, o], dtype=(tl.int32, tl.int32, tl.int32, tl.int32),
        is_pure=True, pack=1,
    )


@triton.jit
def _dot_f16x2(d0, d1, d2, d3, x0, x1, x2, x3):
    """sum_i d_i * x_i over four fp16x2 pairs: fp16x2 FMAs (each lane sums 4 products of
    |q - z|/64 <= 15/64 and |x| <= 65504, so it stays inside fp16), the two lanes added in fp32.
    x0..x3 are the raw activation pairs (x[2i], x[2i+1])."""
    return tl.inline_asm_elementwise(
        asm=_DOT_ASM,
        constraints="=r,r,r,r,r,r,r,r,r", args=[d0, d1, d2, d3, x0, x1, x2, x3], dtype=tl.int32,
        is_pure=True, pack=1,
    ).to(tl.float32, bitcast=True)


@triton.jit
def _word_dot_f16x2(w, x0, x1, x2, x3, o):
    """``_dot_f16x2(*_dequant_f16x2(w, o), x0..x3)`` in one asm block (M = 1: 86 registers, not 128)."""
    return tl.inline_asm_elementwise(
        asm=_WORD_DOT_ASM, constraints="=r,r,r,r,r,r,r", args=[w, x0, x1, x2, x3, o], dtype=tl.int32,
        is_pure=True, pack=1,
    ).to(tl.float32, bitcast=True)


@triton.jit
def _zero_f16x2(z):
    """fp16x2 (16 + z/64, 16 + z/64) for int32 zero points: z is the mantissa at exponent 16."""
    return z * 0x10001 + 0x4C004C00


@triton.jit
def _lane_fma(q, zf, x, acc):
    """One fp16 lane of ``_dequant_f16x2`` + ``_dot_f16x2``, emulated: (q - z)/64 * x + acc exact in fp32, rounded to fp16."""
    return ((q.to(tl.float32) - zf) * 0.015625 * x + acc).to(tl.float16).to(tl.float32)


@triton.jit
def _f16_lane(v):
    """The fp16 in the low 16 bits of int32 ``v``, as fp32."""
    return v.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _word_dot_emulated(w, z, x0, x1, x2, x3):
    """What ``_dot_f16x2(*_dequant_f16x2(w, o), x0..x3)`` computes, in plain Triton (the
    interpreter runs no inline PTX)."""
    zf = z.to(tl.float32)
    pa = _lane_fma(w & 15, zf, _f16_lane(x0), 0.0)
    pb = _lane_fma((w >> 16) & 15, zf, _f16_lane(x0 >> 16), 0.0)
    pa = _lane_fma((w >> 4) & 15, zf, _f16_lane(x1), pa)
    pb = _lane_fma((w >> 20) & 15, zf, _f16_lane(x1 >> 16), pb)
    pa = _lane_fma((w >> 8) & 15, zf, _f16_lane(x2), pa)
    pb = _lane_fma((w >> 24) & 15, zf, _f16_lane(x2 >> 16), pb)
    pa = _lane_fma((w >> 12) & 15, zf, _f16_lane(x3), pa)
    pb = _lane_fma((w >> 28) & 15, zf, _f16_lane(x3 >> 16), pb)
    return pa + pb


@triton.jit
def _gemv_f16x2_load_wsz(w_ptrs, s_ptr, z_ptr, k0, rw, rn, mn, N, G):
    """A chunk's words [KC/8, BN] and its scales/zeros as [KC/8, BN] tiles (rows equal, L1-served) so
    they come in the word tile's register layout ([BN] loads cost a shared-memory layout change)."""
    w = tl.load(w_ptrs + (k0 // 8) * N, mask=mn[None, :], other=0, eviction_policy="evict_first")
    sz = (k0 // G) * N + rn[None, :] + rw[:, None] * 0
    s = tl.load(s_ptr + sz, mask=mn[None, :], other=0.0)
    z = tl.load(z_ptr + sz, mask=mn[None, :], other=0).to(tl.int32)
    return w, s, z


# bf16 activations enter the fp16x2 dot as fp16 pairs of x / 16: the bf16 -> fp16 conversion is then
# exact for 2^-10 <= |x| < 2^20 (fp16's 11 significant bits hold bf16's 8), so the dot is the fp16 one
_BF16_X_SCALE = tl.constexpr(X16_SCALE)


@triton.jit
def x16_from_f32(v):
    """An fp32 activation rounded to bf16, then as the fp16 x / 16 the one-row GEMV reads (x16.py):
    what a producer kernel stores for an ``X16`` output."""
    return (v.to(tl.bfloat16).to(tl.float32) * _BF16_X_SCALE).to(tl.float16)


_BF16_TO_F16X2_ASM = tl.constexpr("""{ .reg .b32 lo, hi;
    shl.b32 lo, $1, 16;
    and.b32 hi, $1, 0xFFFF0000;
    mul.rn.f32 lo, lo, 0f3D800000;
    mul.rn.f32 hi, hi, 0f3D800000;
    cvt.rn.f16x2.f32 $0, hi, lo; }""")


@triton.jit
def _bf16x2_to_f16x2(v, USE_ASM: tl.constexpr):
    """int32 bf16 pairs (x[2i], x[2i+1]) -> int32 fp16 pairs of x / 16 (round to nearest)."""
    if USE_ASM:
        return tl.inline_asm_elementwise(asm=_BF16_TO_F16X2_ASM, constraints="=r,r", args=[v], dtype=tl.int32,
                                         is_pure=True, pack=1)
    else:  # the same in plain Triton (the interpreter runs no inline PTX)
        lo = ((v << 16).to(tl.float32, bitcast=True) * _BF16_X_SCALE).to(tl.float16)
        hi = ((v & -65536).to(tl.float32, bitcast=True) * _BF16_X_SCALE).to(tl.float16)
        lo_bits = lo.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        return lo_bits | (hi.to(tl.int16, bitcast=True).to(tl.int32) << 16)


@triton.jit
def _gemv_f16x2_unscale(xdt: tl.constexpr, X16: tl.constexpr = False):
    """What the summed fp16x2 word dots are multiplied by: 64 (the weights enter as (q - z) / 64),
    times 16 for bf16 activations (x / 16, converted here or already by the producer: ``X16``)."""
    if xdt == tl.bfloat16 or X16:
        return 1024.0
    else:
        return 64.0


@triton.jit
def _gemv_f16x2_load_x(xw_ptr, k0, rw, xdt: tl.constexpr, USE_ASM: tl.constexpr):
    """The fp16x2 activation pairs (x[2i], x[2i+1]) of each word row of a chunk, as [KC/8, 1]
    (``xdt`` bf16: converted, x / 16)."""
    xw = xw_ptr + k0 // 2 + rw * 4
    x0, x1, x2, x3 = tl.load(xw), tl.load(xw + 1), tl.load(xw + 2), tl.load(xw + 3)
    if xdt == tl.bfloat16:
        x0, x1 = _bf16x2_to_f16x2(x0, USE_ASM), _bf16x2_to_f16x2(x1, USE_ASM)
        x2, x3 = _bf16x2_to_f16x2(x2, USE_ASM), _bf16x2_to_f16x2(x3, USE_ASM)
    return x0[:, None], x1[:, None], x2[:, None], x3[:, None]


@triton.jit
def _gemv_f16x2_load(w_ptrs, xw_ptr, s_ptr, z_ptr, k0, rw, rn, mn, N, G, xdt: tl.constexpr, USE_ASM: tl.constexpr):
    """Everything one chunk of the one-row GEMV reads: words, activation pairs, scales, zeros."""
    w, s, z = _gemv_f16x2_load_wsz(w_ptrs, s_ptr, z_ptr, k0, rw, rn, mn, N, G)
    x0, x1, x2, x3 = _gemv_f16x2_load_x(xw_ptr, k0, rw, xdt, USE_ASM)
    return w, x0, x1, x2, x3, s, z


@triton.jit
def _gemv_f16x2_chunk(w, x0, x1, x2, x3, s, z, USE_ASM: tl.constexpr):
    """s * (q - z) x / 64 summed over each word: [KC/8, BN] fp32 (the caller sums the rows)."""
    if USE_ASM:
        r = _word_dot_f16x2(w, x0, x1, x2, x3, _zero_f16x2(z))
    else:
        r = _word_dot_emulated(w, z, x0, x1, x2, x3)
    return s.to(tl.float32) * r


@triton.jit
def _gemv_f16x2_loop(x_ptr, qw_ptr, s_ptr, z_ptr, rn, N, G, k_lo, k_hi, BLOCK_N: tl.constexpr, KC: tl.constexpr,
                     PREFETCH: tl.constexpr, USE_ASM: tl.constexpr, USE_PDL: tl.constexpr):
    """The one-row GEMV's K loop over rows [k_lo, k_hi) for columns ``rn``: returns the [KC/8, BN] fp32
    accumulator (x the caller's 64x). Waits for the previous kernel (PDL) after the first weight loads."""
    rw = tl.arange(0, KC // 8)
    mn = rn < N
    acc2 = tl.zeros((KC // 8, BLOCK_N), dtype=tl.float32)
    w_ptrs = qw_ptr + rw[:, None] * N + rn[None, :]
    xdt: tl.constexpr = x_ptr.dtype.element_ty
    xw_ptr = x_ptr.to(tl.pointer_type(tl.int32))
    if PREFETCH >= 2:  # a PREFETCH-stage cp.async ring in shared memory: loads in flight without registers
        _pdl_wait(USE_PDL)
        for k0 in tl.range(k_lo, k_hi, KC, num_stages=PREFETCH):
            # scales/zeros as row-broadcast tiles: >= 4 contiguous bytes per thread, so they go through
            # cp.async too ([BN] loads of 1-2 bytes per thread stayed synchronous inside the loop)
            w, s, z = _gemv_f16x2_load_wsz(w_ptrs, s_ptr, z_ptr, k0, rw, rn, mn, N, G)
            x0, x1, x2, x3 = _gemv_f16x2_load_x(xw_ptr, k0, rw, xdt, USE_ASM)
            acc2 += _gemv_f16x2_chunk(w, x0, x1, x2, x3, s, z, USE_ASM)
    elif PREFETCH:
        last = k_hi - KC  # the prefetch past the end re-reads the last chunk (L2/L1 hits), no masks
        w, s, z = _gemv_f16x2_load_wsz(w_ptrs, s_ptr, z_ptr, k_lo, rw, rn, mn, N, G)
        _pdl_wait(USE_PDL)  # the first weights are on their way; x is the previous kernel's output
        x0, x1, x2, x3 = _gemv_f16x2_load_x(xw_ptr, k_lo, rw, xdt, USE_ASM)
        for k0 in range(k_lo, k_hi, KC):
            nw, nx0, nx1, nx2, nx3, ns, nz = _gemv_f16x2_load(w_ptrs, xw_ptr, s_ptr, z_ptr,
                                                              tl.minimum(k0 + KC, last), rw, rn, mn, N, G,
                                                              xdt, USE_ASM)
            acc2 += _gemv_f16x2_chunk(w, x0, x1, x2, x3, s, z, USE_ASM)
            w, x0, x1, x2, x3, s, z = nw, nx0, nx1, nx2, nx3, ns, nz
    else:
        _pdl_wait(USE_PDL)
        for k0 in range(k_lo, k_hi, KC):
            w, x0, x1, x2, x3, s, z = _gemv_f16x2_load(w_ptrs, xw_ptr, s_ptr, z_ptr, k0, rw, rn, mn, N, G,
                                                       xdt, USE_ASM)
            acc2 += _gemv_f16x2_chunk(w, x0, x1, x2, x3, s, z, USE_ASM)
    return acc2


@triton.jit
def w4_gemv_f16x2_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
                         M, N, K, G, K_SPLIT, SPLIT_K, stride_xm, stride_ym,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KC: tl.constexpr,
                         SPLIT_P2: tl.constexpr, HAS_BIAS: tl.constexpr, PREFETCH: tl.constexpr = 1,
                         USE_ASM: tl.constexpr = True, USE_PDL: tl.constexpr = False, X16: tl.constexpr = False,
                         PARK: tl.constexpr = False):
    """Decode GEMV (M = 1; fp16, or bf16 read as fp16 x / 16, or with ``X16`` fp16 x / 16 already
    converted by the producer for a bf16 output) on packed fp16x2 math
    (``_word_dot_f16x2``: about 3.3 SASS instructions per weight against 4.3+ for the fp32 GEMV);
    each word's 8-product sum is rounded to fp16, everything
    above it accumulates in fp32 ([KC/8, BN] per program, one reduction at the end). PREFETCH = 1
    issues every load of the next chunk (words, activations, scales, zeros) before computing the
    current one, so no warp waits on a load it just issued (0: load, then compute); PREFETCH >= 2
    keeps PREFETCH - 1 chunks in flight through shared memory (Triton's cp.async pipeline), which
    costs no registers."""
    _pdl_start(USE_PDL)
    acc, pid_n, pid_k, rn = gemv_f16x2_slice(x_ptr, qw_ptr, s_ptr, z_ptr, N, K, G, K_SPLIT, BLOCK_N, KC, PREFETCH,
                                             USE_ASM, USE_PDL, X16)
    _finish_tile(acc[None, :], tl.arange(0, 1), rn, M, N, y_ptr, stride_ym, b_ptr, ws_ptr, cnt_ptr, pid_n, pid_k,
                 SPLIT_K, SPLIT_P2, HAS_BIAS, PARK)


@triton.jit
def gemv_f16x2_slice(x_ptr, qw_ptr, s_ptr, z_ptr, N, K, G, K_SPLIT, BLOCK_N: tl.constexpr, KC: tl.constexpr,
                     PREFETCH: tl.constexpr, USE_ASM: tl.constexpr, USE_PDL: tl.constexpr, X16: tl.constexpr):
    """The one-row GEMV program's K slice, before any split-K merge: (fp32 [BN] sums, column tile,
    split index, columns)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_lo = pid_k * K_SPLIT
    acc2 = _gemv_f16x2_loop(x_ptr, qw_ptr, s_ptr, z_ptr, rn, N, G, k_lo, tl.minimum(k_lo + K_SPLIT, K),
                            BLOCK_N, KC, PREFETCH, USE_ASM, USE_PDL)
    return _gemv_f16x2_unscale(x_ptr.dtype.element_ty, X16) * tl.sum(acc2, axis=0), pid_n, pid_k, rn


@triton.jit
def _rows_chunk(w, s, z, xp, x_ok, USE_ASM: tl.constexpr):
    """One chunk of the rows kernel: words [KC/8, BN] dequantised once, times each row's activation
    pairs at ``xp`` [BLOCK_M, KC/8]; returns s * sum / 64 as [BLOCK_M, KC/8, BN] fp32."""
    x0 = tl.load(xp, mask=x_ok, other=0)[:, :, None]
    x1 = tl.load(xp + 1, mask=x_ok, other=0)[:, :, None]
    x2 = tl.load(xp + 2, mask=x_ok, other=0)[:, :, None]
    x3 = tl.load(xp + 3, mask=x_ok, other=0)[:, :, None]
    if USE_ASM:
        d0, d1, d2, d3 = _dequant_f16x2(w, _zero_f16x2(z))
        r = _dot_f16x2(d0[None], d1[None], d2[None], d3[None], x0, x1, x2, x3)
    else:
        r = _word_dot_emulated(w[None], z[None], x0, x1, x2, x3)
    return s.to(tl.float32)[None] * r


@triton.jit
def w4_gemv_f16x2_rows_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
                              M, N, K, G, K_SPLIT, SPLIT_K, stride_xm, stride_ym,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KC: tl.constexpr,
                              SPLIT_P2: tl.constexpr, HAS_BIAS: tl.constexpr, PREFETCH: tl.constexpr = 1,
                              USE_ASM: tl.constexpr = True, USE_PDL: tl.constexpr = False):
    """Small batches (fp16, BLOCK_M rows a program): each word is dequantised once into fp16x2 pairs
    (``_dequant_f16x2``) and multiplied into every row's activation pairs (``_dot_f16x2`` over a
    [BLOCK_M, KC/8, BN] broadcast), so the weight bytes and the dequantisation are shared by all
    rows; the word rows are summed once after the K loop. Use a small KC (the default is 8): the
    accumulator holds BLOCK_M * KC/8 * BN fp32. PREFETCH = 1 loads the next chunk's words, scales and
    zeros first; PREFETCH >= 2 pipelines chunks through shared memory as in the one-row GEMV."""
    _pdl_start(USE_PDL)
    pid_k, rm, rn = _tile_index(BLOCK_M, BLOCK_N)
    rw = tl.arange(0, KC // 8)
    mn = rn < N
    acc3 = tl.zeros((BLOCK_M, KC // 8, BLOCK_N), dtype=tl.float32)
    k_lo = pid_k * K_SPLIT
    k_hi = tl.minimum(k_lo + K_SPLIT, K)
    w_ptrs = qw_ptr + rw[:, None] * N + rn[None, :]
    xw_ptr = x_ptr.to(tl.pointer_type(tl.int32))
    x_rows = xw_ptr + rm[:, None] * (stride_xm // 2) + rw[None, :] * 4  # [BLOCK_M, KC/8] pair pointers
    x_ok = (rm < M)[:, None] & (rw >= 0)[None, :]
    if PREFETCH >= 2:  # a PREFETCH-stage cp.async ring in shared memory (no registers held by loads)
        _pdl_wait(USE_PDL)
        for k0 in tl.range(k_lo, k_hi, KC, num_stages=PREFETCH):
            w, s, z = _gemv_f16x2_load_wsz(w_ptrs, s_ptr, z_ptr, k0, rw, rn, mn, N, G)  # all via cp.async
            acc3 += _rows_chunk(w, s, z, x_rows + k0 // 2, x_ok, USE_ASM)
    else:
        last = k_hi - KC  # loads past the end re-read the last chunk (L2 hits), no masks
        w, s, z = _gemv_f16x2_load_wsz(w_ptrs, s_ptr, z_ptr, k_lo, rw, rn, mn, N, G)
        _pdl_wait(USE_PDL)
        for k0 in range(k_lo, k_hi, KC):
            nxt = tl.minimum(k0 + KC, last)
            if PREFETCH:
                nw, ns, nz = _gemv_f16x2_load_wsz(w_ptrs, s_ptr, z_ptr, nxt, rw, rn, mn, N, G)
            acc3 += _rows_chunk(w, s, z, x_rows + k0 // 2, x_ok, USE_ASM)
            if PREFETCH:
                w, s, z = nw, ns, nz
            else:
                w, s, z = _gemv_f16x2_load_wsz(w_ptrs, s_ptr, z_ptr, nxt, rw, rn, mn, N, G)
    tile_id = _tile_id()
    _finish_tile(64.0 * tl.sum(acc3, axis=1), rm, rn, M, N, y_ptr, stride_ym, b_ptr, ws_ptr, cnt_ptr, tile_id,
                 pid_k, SPLIT_K, SPLIT_P2, HAS_BIAS)


@triton.jit
def w4_gemm_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
                   M, N, K, G, K_SPLIT, SPLIT_K, stride_xm, stride_ym,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KC: tl.constexpr,
                   SPLIT_P2: tl.constexpr, HAS_BIAS: tl.constexpr, EXPAND: tl.constexpr = True,
                   DOT_F32: tl.constexpr = False, USE_PDL: tl.constexpr = False):
    """Tensor-core tiles: unpack a [KC, BN] chunk (one group) in registers, dot, then scale.
    (tile_t.py has the transposed form that serves small M by default.)"""
    _pdl_start(USE_PDL)
    _pdl_wait(USE_PDL)
    pid_k, rm, rn = _tile_index(BLOCK_M, BLOCK_N)
    rk = tl.arange(0, KC)
    shift = _nibble_shift(rk % 8)[:, None]
    rw = tl.arange(0, KC // 8)
    shifts = _nibble_shift(tl.arange(0, 8))
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
