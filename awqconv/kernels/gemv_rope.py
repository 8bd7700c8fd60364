"""The decode step's QKV projection with RoPE and the KV-cache write as its epilogue (one kernel).

The one-row fp16x2 GEMV (triton_w4) over the fused QKV weight, with each program's 64 output
columns chosen as two 32-column runs half a head apart, (d, d + D/2): exactly the pairs RoPE
rotates. The program that completes a tile (the last split-K contributor) rounds its sums to fp16
(the values the plain GEMV would store), rotates q and k pairs in fp32 with one rounding (as
rope_kv.py), and writes q heads to ``q_out [1, H, 1, D]``, k and v heads into the caches at this
step's slot. The QKV output itself is never stored, and the separate RoPE/cache kernel is gone.
Weights are not permuted: only which columns a program takes changes. Needs M = 1, fp16, and
head_dim / 2 a multiple of half the tile width.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .launch import pdl_launch
from .launch import pdl_start as _pdl_start
from .layout import KernelWeight
from .triton_w4 import _gemv_f16x2_loop, _merged, _rearm

BLOCK_N = 64  # the decode GEMV's tile (ops.default_config, M = 1): 32 rotation pairs per program


@triton.jit
def _rope_columns(t, HEAD_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Tile ``t``'s columns: P = BLOCK_N / 2 pairs (d, d + D/2) of one head, first members first."""
    P: tl.constexpr = BLOCK_N // 2
    HALF: tl.constexpr = HEAD_D // 2
    head = t // (HALF // P)
    i0 = (t % (HALF // P)) * P
    c = tl.arange(0, BLOCK_N)
    return head, i0, head * HEAD_D + i0 + tl.where(c < P, c, HALF + c - P)


@triton.jit
def _rope_store(y, head, i0, cos_ptr, sin_ptr, q_ptr, kc_ptr, vc_ptr, slot_ptr, H, HKV, stride_kh, stride_ks,
                stride_vh, stride_vs, HEAD_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """A finished tile ``y [BLOCK_N]`` (fp16 values as fp32): rotate and store q or k, or store v."""
    P: tl.constexpr = BLOCK_N // 2
    HALF: tl.constexpr = HEAD_D // 2
    x1, x2 = tl.split(tl.trans(tl.reshape(y, (2, P))))  # the pair members
    i = i0 + tl.arange(0, P)
    c1 = tl.load(cos_ptr + i).to(tl.float32)
    c2 = tl.load(cos_ptr + HALF + i).to(tl.float32)
    s1 = tl.load(sin_ptr + i).to(tl.float32)
    s2 = tl.load(sin_ptr + HALF + i).to(tl.float32)
    o1 = x1 * c1 - x2 * s1
    o2 = x2 * c2 + x1 * s2
    if head < H:
        dst = q_ptr + head * HEAD_D
        tl.store(dst + i, o1.to(q_ptr.dtype.element_ty))
        tl.store(dst + HALF + i, o2.to(q_ptr.dtype.element_ty))
    elif head < H + HKV:
        dst = kc_ptr + (head - H) * stride_kh + tl.load(slot_ptr) * stride_ks
        tl.store(dst + i, o1.to(kc_ptr.dtype.element_ty))
        tl.store(dst + HALF + i, o2.to(kc_ptr.dtype.element_ty))
    else:
        dst = vc_ptr + (head - H - HKV) * stride_vh + tl.load(slot_ptr) * stride_vs
        tl.store(dst + i, x1.to(vc_ptr.dtype.element_ty))
        tl.store(dst + HALF + i, x2.to(vc_ptr.dtype.element_ty))


@triton.jit
def w4_gemv_rope_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, ws_ptr, cnt_ptr,
                        cos_ptr, sin_ptr, q_ptr, kc_ptr, vc_ptr, slot_ptr,
                        N, K, G, K_SPLIT, SPLIT_K, H, HKV, stride_kh, stride_ks, stride_vh, stride_vs,
                        HEAD_D: tl.constexpr, BLOCK_N: tl.constexpr, KC: tl.constexpr, SPLIT_P2: tl.constexpr,
                        HAS_BIAS: tl.constexpr, USE_ASM: tl.constexpr = True, USE_PDL: tl.constexpr = False):
    _pdl_start(USE_PDL)
    t = tl.program_id(0)
    pid_k = tl.program_id(2)
    head, i0, rn = _rope_columns(t, HEAD_D, BLOCK_N)
    k_lo = pid_k * K_SPLIT
    acc2 = _gemv_f16x2_loop(x_ptr, qw_ptr, s_ptr, z_ptr, rn, N, G, k_lo, tl.minimum(k_lo + K_SPLIT, K),
                            BLOCK_N, KC, 1, USE_ASM, USE_PDL)
    rm = tl.arange(0, 1)
    last, tot = _merged((64.0 * tl.sum(acc2, axis=0))[None, :], rm, rn, 1, N, ws_ptr, cnt_ptr, t, pid_k, SPLIT_K,
                        SPLIT_P2)
    if last:
        if HAS_BIAS:
            tot += tl.load(b_ptr + rn).to(tl.float32)[None, :]
        y = tl.reshape(tot.to(q_ptr.dtype.element_ty).to(tl.float32), (BLOCK_N,))  # what the GEMV would store
        _rope_store(y, head, i0, cos_ptr, sin_ptr, q_ptr, kc_ptr, vc_ptr, slot_ptr, H, HKV,
                    stride_kh, stride_ks, stride_vh, stride_vs, HEAD_D, BLOCK_N)
        _rearm(cnt_ptr, t, SPLIT_P2)


def supports_rope(kw: KernelWeight, x: Tensor, head_dim: int) -> bool:
    """Whether ``qkv_rope`` can run: one fp16 row on a GPU backend with the inline-PTX GEMV, and RoPE
    pairs that fill whole tiles."""
    from .ops import _PTX, default_config

    cfg = default_config(1, kw, x.device, x.dtype)
    return (x.shape[0] == 1 and x.dtype == torch.float16 and cfg.kind == "gemv_f16x2" and cfg.block_n == BLOCK_N
            and head_dim % BLOCK_N == 0 and _PTX)


def qkv_rope(x: Tensor, kw: KernelWeight, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor,
             slot: Tensor, n_heads: int, n_kv: int, head_dim: int) -> Tensor:
    """``x [1, K]`` through the fused QKV weight, then RoPE and the cache write: returns rotated q as
    ``[1, n_heads, 1, head_dim]`` and stores rotated k and v at ``slot`` (int64 [1], on the device) of
    ``k_cache, v_cache [1, n_kv, S, head_dim]``. ``cos, sin``: this token's ``[head_dim]`` (any view
    with a contiguous last dim). Same values as ``w4_matmul`` followed by ``rope_kv.rope_kv_write``."""
    from .launch import INTERPRET
    from .ops import _PTX, _split_for, default_config
    from .workspace import WORKSPACE

    N, K = kw.out_features, kw.in_features
    if N != (n_heads + 2 * n_kv) * head_dim or head_dim % BLOCK_N:
        raise ValueError(f"qkv_rope: {N} outputs are not {n_heads} + 2 x {n_kv} heads of {head_dim} in whole tiles")
    cfg = default_config(1, kw, x.device, x.dtype)
    n_tiles = N // BLOCK_N
    split, k_split = _split_for(cfg, n_tiles, K, x.device)
    split_p2 = triton.next_power_of_2(split) if split > 1 else 1
    ws, cnt = WORKSPACE.get(x.device, split * N if split > 1 else 0, n_tiles)
    q = torch.empty(1, n_heads, 1, head_dim, dtype=x.dtype, device=x.device)
    bias = kw.bias if kw.bias is not None else kw.scales  # dummy pointer when absent
    w4_gemv_rope_kernel[(n_tiles, 1, split)](
        x, kw.qw, kw.scales, kw.zeros, bias, ws, cnt, cos, sin, q, k_cache, v_cache, slot,
        N, K, kw.group_size, k_split, split, n_heads, n_kv,
        k_cache.stride(1), k_cache.stride(2), v_cache.stride(1), v_cache.stride(2),
        HEAD_D=head_dim, BLOCK_N=BLOCK_N, KC=cfg.kc, SPLIT_P2=split_p2, HAS_BIAS=kw.bias is not None,
        USE_ASM=_PTX and not INTERPRET, num_warps=cfg.num_warps, **pdl_launch(x.device, cfg.pdl))
    return q
