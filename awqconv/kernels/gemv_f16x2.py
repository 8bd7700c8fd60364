"""The one-row (decode) INT4 GEMV on packed fp16x2 math, and the X16 conversions (x16.py).

Each program takes BLOCK_N columns and one K split of the row; per 32-bit word of 8 weights one asm
block dequantises them two at a time into fp16x2 registers and multiplies them into the activation
pairs (``_word_dot_f16x2``); the interpreter runs a plain-Triton emulation that gives the same bits.
bf16 activations enter as fp16 x / 16: exact for 2^-10 <= |x| < 2^20 (fp16's 11 significant bits
hold bf16's 8), so the dot is the fp16 one; an ``X16`` row arrives converted already.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .launch import pdl_start as _pdl_start
from .launch import pdl_wait as _pdl_wait
from .triton_w4 import _finish_tile
from .x16 import X16_SCALE

# the word's dequantisation and dot product, composed into one asm block below
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
_WORD_DOT_ASM = tl.constexpr("{ .reg .b32 m, c, t, a, b, d, e, p; .reg .b16 lo, hi; .reg .f32 flo, fhi, r;\n"
                             + _DEQUANT_PTX.format(d0="a", d1="b", d2="d", d3="e", w="$1", o="$6")
                             + _DOT_PTX.format(d0="a", d1="b", d2="d", d3="e", x0="$2", x1="$3", x2="$4", x3="$5", out="$0")
                             + "}")


@triton.jit
def _word_dot_f16x2(w, x0, x1, x2, x3, o):
    """sum over the word's 8 weights of (q - z) / 64 * x, from the word ``w``, the zero pair ``o``
    (``_zero_f16x2``) and the activation pairs x0..x3 = (x[2i], x[2i+1]), in one asm block.

    One mask of the shifted word ORed into fp16 16.0 gives the pair (16 + q[2i]/64, 16 + q[2i+1]/64)
    (layout.py pairs k = 2i, 2i+1 in the two halves; the fp16 ulp at 16 is 1/64); subtracting
    o = (16 + z/64, 16 + z/64) leaves (q - z)/64 exactly: two weights per instruction. Then fp16x2
    FMAs (each lane sums 4 products of |q - z|/64 <= 15/64 and |x| <= 65504, so it stays inside
    fp16), the two lanes added in fp32. The dequantised pairs live only inside the block: 86
    registers a thread, not 128 with separate dequantise and dot blocks."""
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
    """One fp16 lane of ``_word_dot_f16x2``, emulated: (q - z)/64 * x + acc exact in fp32, rounded to fp16."""
    return ((q.to(tl.float32) - zf) * 0.015625 * x + acc).to(tl.float16).to(tl.float32)


@triton.jit
def _f16_lane(v):
    """The fp16 in the low 16 bits of int32 ``v``, as fp32."""
    return v.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _word_dot_emulated(w, z, x0, x1, x2, x3):
    """What ``_word_dot_f16x2(w, ..., _zero_f16x2(z))`` computes, in plain Triton (the interpreter
    runs no inline PTX)."""
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
                     USE_ASM: tl.constexpr, USE_PDL: tl.constexpr):
    """The one-row GEMV's K loop over rows [k_lo, k_hi) for columns ``rn``: returns the [KC/8, BN] fp32
    accumulator (x the caller's 64x). Every load of the next chunk (words, activations, scales,
    zeros) is issued before the current chunk is computed, so no warp waits on a load it just issued.
    Waits for the previous kernel (PDL) after the first weight loads."""
    rw = tl.arange(0, KC // 8)
    mn = rn < N
    acc2 = tl.zeros((KC // 8, BLOCK_N), dtype=tl.float32)
    w_ptrs = qw_ptr + rw[:, None] * N + rn[None, :]
    xdt: tl.constexpr = x_ptr.dtype.element_ty
    xw_ptr = x_ptr.to(tl.pointer_type(tl.int32))
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
    return acc2


@triton.jit
def w4_gemv_f16x2_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
                         M, N, K, G, K_SPLIT, SPLIT_K, stride_xm, stride_ym,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KC: tl.constexpr,
                         SPLIT_P2: tl.constexpr, HAS_BIAS: tl.constexpr, USE_ASM: tl.constexpr = True,
                         USE_PDL: tl.constexpr = False, X16: tl.constexpr = False, PARK: tl.constexpr = False):
    """Decode GEMV (M = 1; fp16, or bf16 read as fp16 x / 16, or with ``X16`` fp16 x / 16 already
    converted by the producer for a bf16 output) on packed fp16x2 math (``_word_dot_f16x2``: about
    3.3 SASS instructions per weight against 4.3+ for the fp32 GEMV); each word's 8-product sum is
    rounded to fp16, everything above it accumulates in fp32 ([KC/8, BN] per program, one reduction
    at the end). Split-K partials are parked (``PARK``) for ``w4_merge_kernel``."""
    _pdl_start(USE_PDL)
    acc, pid_n, pid_k, rn = gemv_f16x2_slice(x_ptr, qw_ptr, s_ptr, z_ptr, N, K, G, K_SPLIT, BLOCK_N, KC, USE_ASM,
                                             USE_PDL, X16)
    _finish_tile(acc[None, :], tl.arange(0, 1), rn, M, N, y_ptr, stride_ym, b_ptr, ws_ptr, cnt_ptr, pid_n, pid_k,
                 SPLIT_K, SPLIT_P2, HAS_BIAS, PARK)


@triton.jit
def gemv_f16x2_slice(x_ptr, qw_ptr, s_ptr, z_ptr, N, K, G, K_SPLIT, BLOCK_N: tl.constexpr, KC: tl.constexpr,
                     USE_ASM: tl.constexpr, USE_PDL: tl.constexpr, X16: tl.constexpr):
    """The one-row GEMV program's K slice, before any split-K merge: (fp32 [BN] sums, column tile,
    split index, columns)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_lo = pid_k * K_SPLIT
    acc2 = _gemv_f16x2_loop(x_ptr, qw_ptr, s_ptr, z_ptr, rn, N, G, k_lo, tl.minimum(k_lo + K_SPLIT, K),
                            BLOCK_N, KC, USE_ASM, USE_PDL)
    return _gemv_f16x2_unscale(x_ptr.dtype.element_ty, X16) * tl.sum(acc2, axis=0), pid_n, pid_k, rn
