"""The transposed tensor-core tile for small batches: y^T [BN, BM] = W^T x^T, weights as the MMA's
register operand.

Per chunk of KC input rows a program takes its packed words as [BN, KC/8] (16-byte loads, by
default through a cp.async ring of PREFETCH stages: the ring, not the instruction count, took M = 16
from ~120 to ~87 us per 7B layer on an H100), turns each word into its 8 dequantised fp16/bf16
weights in one asm block (mask into an fp16 1024 + q / bf16 128 + q, subtract the zero, multiply by
the scale: 1.9 instructions per weight; the product is rounded once, so the operand is exactly the
dequantised weight), and joins the 8 values of each word along k, so the register tile reaches the
MMA operand layout through 16-byte shared-memory stores. x^T [KC, BM] is the MMA's shared-memory
operand and the fp32 accumulator runs over the whole K slice (no per-chunk rescale). Split-K
partials are parked (``PARK``) for ``w4_merge_kernel`` (triton_w4.py). The interpreter runs a
plain-Triton emulation that yields the same operand bits.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .launch import pdl_start as _pdl_start
from .launch import pdl_wait as _pdl_wait
from .triton_w4 import _finish_tile, _nibble_shift, _round_to, _tile_id, _tile_index


def _dequant_word_ptx(magic: int, sub: str, mul: str) -> str:
    """One packed word -> 8 halves ($0..$7 in k order), from the word $8, the zero pair $9 (the
    magic's bias + z in both halves) and the scale pair $10. layout.py puts k = 2i, 2i+1 at bits 4i
    and 16 + 4i, so one mask of the word shifted by 4i gives the pair (2i, 2i+1)."""
    lines = ["{ .reg .b32 m, c, t, p0, p1, p2, p3;", "mov.b32 m, 0x000F000F;", f"mov.b32 c, {magic:#x};",
             "lop3.b32 p0, $8, m, c, 0xEA;"]
    for i in (1, 2, 3):
        lines += [f"shr.u32 t, $8, {4 * i};", f"lop3.b32 p{i}, t, m, c, 0xEA;"]
    lines += [f"{sub} p{i}, p{i}, $9;" for i in range(4)]
    lines += [f"{mul} p{i}, p{i}, $10;" for i in range(4)]
    lines += [f"mov.b32 {{${2 * i}, ${2 * i + 1}}}, p{i};" for i in range(4)]
    return "\n".join(lines + ["}"])


_F16_MAGIC = tl.constexpr(0x64006400)  # fp16 1024 + q in each half
_BF16_MAGIC = tl.constexpr(0x43004300)  # bf16 128 + q
_WORD_F16 = tl.constexpr(_dequant_word_ptx(_F16_MAGIC.value, "sub.f16x2", "mul.rn.f16x2"))
_WORD_BF16 = tl.constexpr(_dequant_word_ptx(_BF16_MAGIC.value, "sub.bf16x2", "mul.rn.bf16x2"))


@triton.jit
def _pairs(v):
    """int32 holding a 16-bit pattern in its low half -> the pattern in both halves."""
    return (v & 0xFFFF) * 0x10001


@triton.jit
def _dequant_words(w, s, z, dtype: tl.constexpr, USE_ASM: tl.constexpr):
    """Words [BN, C] (C = KC/8), scales (as ``dtype``) and int32 zeros [BN, 1] -> [BN, 8C] weights
    (q - z) * s in ``dtype``, k = 8c + j from nibble j of word c."""
    if USE_ASM:
        sbits = _pairs(s.to(tl.int16, bitcast=True).to(tl.int32)) + w * 0
        if dtype == tl.bfloat16:
            zz = z * 0x10001 + _BF16_MAGIC + w * 0
            o0, o1, o2, o3, o4, o5, o6, o7 = tl.inline_asm_elementwise(
                asm=_WORD_BF16, constraints="=h,=h,=h,=h,=h,=h,=h,=h,r,r,r", args=[w, zz, sbits],
                dtype=(tl.bfloat16,) * 8, is_pure=True, pack=1)
        else:
            zz = z * 0x10001 + _F16_MAGIC + w * 0
            o0, o1, o2, o3, o4, o5, o6, o7 = tl.inline_asm_elementwise(
                asm=_WORD_F16, constraints="=h,=h,=h,=h,=h,=h,=h,=h,r,r,r", args=[w, zz, sbits],
                dtype=(tl.float16,) * 8, is_pure=True, pack=1)
        # nested joins add the minor dims (c1, c2, c3); flat index 4 c1 + 2 c2 + c3 must be j
        v = tl.join(tl.join(tl.join(o0, o4), tl.join(o2, o6)), tl.join(tl.join(o1, o5), tl.join(o3, o7)))
    else:  # the same values in plain Triton: (q - z) * s exact in fp32, rounded once
        q = (w[:, :, None] >> _nibble_shift(tl.arange(0, 8))[None, None, :]) & 15
        v = _round_to((q - z[:, :, None]).to(tl.float32) * s.to(tl.float32)[:, :, None], dtype)
    return tl.reshape(v, (w.shape[0], 8 * w.shape[1]))


@triton.jit
def _load_chunk(w_ptrs, s_ptr, z_ptr, k0, rn, mn, N, GROUP: tl.constexpr):
    """A chunk's words [BN, KC/8] and its scales and zeros as [BN, 1]."""
    w = tl.load(w_ptrs + (k0 // 8) * N, mask=mn[:, None], other=0, eviction_policy="evict_first")
    g = (k0 // GROUP) * N + rn
    s = tl.load(s_ptr + g, mask=mn, other=0.0)[:, None]
    z = tl.load(z_ptr + g, mask=mn, other=0).to(tl.int32)[:, None]
    return w, s, z


@triton.jit
def _chunk_dot(acc, w, s, z, xt, DOT_F32: tl.constexpr, USE_ASM: tl.constexpr):
    """acc [BN, BM] += W^T (one chunk, dequantised) @ x^T [KC, BM]."""
    wt = _dequant_words(w, s, z, xt.dtype, USE_ASM)
    if DOT_F32:  # interpreter only: it multiplies bf16 operands as raw integers
        return acc + tl.dot(wt.to(tl.float32), xt.to(tl.float32))
    else:
        return tl.dot(wt, xt, acc)


@triton.jit
def w4_tile_t_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
                     M, N, K, K_SPLIT, SPLIT_K, stride_xm, stride_ym,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KC: tl.constexpr, GROUP: tl.constexpr,
                     SPLIT_P2: tl.constexpr, HAS_BIAS: tl.constexpr, PREFETCH: tl.constexpr = 4,
                     DOT_F32: tl.constexpr = False, USE_ASM: tl.constexpr = True, USE_PDL: tl.constexpr = False,
                     PARK: tl.constexpr = False):
    """y = x W + b for M <= BLOCK_M rows (BLOCK_M >= 16), BLOCK_N columns and one K split per
    program; the chunks come through a cp.async ring of PREFETCH stages (1: none). (A one-chunk
    register prefetch instead of the ring ran 119-126 against 85-87 us per 7B layer on the H100.)"""
    _pdl_start(USE_PDL)
    acc, pid_k, rm, rn = tile_t_slice(x_ptr, qw_ptr, s_ptr, z_ptr, M, N, K, K_SPLIT, stride_xm, BLOCK_M, BLOCK_N, KC,
                                      GROUP, PREFETCH, DOT_F32, USE_ASM, USE_PDL)
    _finish_tile(acc, rm, rn, M, N, y_ptr, stride_ym, b_ptr, ws_ptr, cnt_ptr, _tile_id(), pid_k, SPLIT_K,
                 SPLIT_P2, HAS_BIAS, PARK)


@triton.jit
def tile_t_slice(x_ptr, qw_ptr, s_ptr, z_ptr, M, N, K, K_SPLIT, stride_xm,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KC: tl.constexpr, GROUP: tl.constexpr,
                 PREFETCH: tl.constexpr, DOT_F32: tl.constexpr, USE_ASM: tl.constexpr, USE_PDL: tl.constexpr):
    """This program's K slice of its tile, before any split-K merge: (fp32 [BM, BN], split index,
    rows, columns). Waits for the previous kernel (PDL) before the first load of x."""
    pid_k, rm, rn = _tile_index(BLOCK_M, BLOCK_N)
    rk = tl.arange(0, KC)
    mm = rm < M
    mn = rn < N
    w_ptrs = qw_ptr + tl.arange(0, KC // 8)[None, :] * N + rn[:, None]
    x_ptrs = x_ptr + rm[None, :] * stride_xm + rk[:, None]
    k_lo = pid_k * K_SPLIT
    k_hi = tl.minimum(k_lo + K_SPLIT, K)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    _pdl_wait(USE_PDL)  # x is the previous kernel's output
    for k0 in tl.range(k_lo, k_hi, KC, num_stages=PREFETCH):  # a cp.async ring of PREFETCH stages
        w, s, z = _load_chunk(w_ptrs, s_ptr, z_ptr, k0, rn, mn, N, GROUP)
        xt = tl.load(x_ptrs + k0, mask=mm[None, :], other=0.0)
        acc = _chunk_dot(acc, w, s, z, xt, DOT_F32, USE_ASM)
    return tl.trans(acc), pid_k, rm, rn
