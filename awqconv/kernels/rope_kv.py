"""RoPE on q and k and the KV-cache write in one Triton kernel (the runtime's attention prologue).

Replaces three small launches per layer (RoPE, two ``index_copy_``) with one: each program takes one
(token, head) pair of the fused QKV output, rotates q heads into a fresh ``[B, H, T, D]`` tensor,
rotates k heads into ``k_cache[b, h, slot]`` and copies the matching v head into ``v_cache``. The
rotation is ``x * cos + rotate_half(x) * sin`` in fp32, rounded once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .launch import pdl_launch, pdl_start, pdl_wait


@triton.jit
def rope_kv_kernel(q_src, k_src, v_src, cos_ptr, sin_ptr, q_out, kc_ptr, vc_ptr, slot_ptr,
                   T, H, stride_sb, stride_st, stride_cb, stride_ct,
                   stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
                   HALF: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr = False):
    pdl_start(USE_PDL)
    pdl_wait(USE_PDL)  # q, k, v are the previous kernel's output
    row = tl.program_id(0)  # b * T + t
    head = tl.program_id(1)  # q heads first, then kv heads
    b = row // T
    t = row % T
    r = tl.arange(0, BLOCK)
    m = r < HALF
    cs = cos_ptr + b * stride_cb + t * stride_ct
    sn = sin_ptr + b * stride_cb + t * stride_ct
    c1 = tl.load(cs + r, mask=m).to(tl.float32)
    c2 = tl.load(cs + HALF + r, mask=m).to(tl.float32)
    s1 = tl.load(sn + r, mask=m).to(tl.float32)
    s2 = tl.load(sn + HALF + r, mask=m).to(tl.float32)
    src_row = b * stride_sb + t * stride_st
    if head < H:
        src = q_src + src_row + head * 2 * HALF
    else:
        src = k_src + src_row + (head - H) * 2 * HALF
    x1 = tl.load(src + r, mask=m).to(tl.float32)
    x2 = tl.load(src + HALF + r, mask=m).to(tl.float32)
    o1 = x1 * c1 - x2 * s1
    o2 = x2 * c2 + x1 * s2
    if head < H:
        dst = q_out + ((b * H + head) * T + t) * 2 * HALF
        tl.store(dst + r, o1.to(q_out.dtype.element_ty), mask=m)
        tl.store(dst + HALF + r, o2.to(q_out.dtype.element_ty), mask=m)
    else:
        kh = head - H
        slot = tl.load(slot_ptr + t)
        kd = kc_ptr + b * stride_kb + kh * stride_kh + slot * stride_ks
        tl.store(kd + r, o1.to(kc_ptr.dtype.element_ty), mask=m)
        tl.store(kd + HALF + r, o2.to(kc_ptr.dtype.element_ty), mask=m)
        vs = v_src + src_row + kh * 2 * HALF
        vd = vc_ptr + b * stride_vb + kh * stride_vh + slot * stride_vs
        tl.store(vd + r, tl.load(vs + r, mask=m), mask=m)
        tl.store(vd + HALF + r, tl.load(vs + HALF + r, mask=m), mask=m)


def rope_kv_write(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor,
                  slots: Tensor, n_heads: int, n_kv: int, head_dim: int, pdl: bool = True) -> Tensor:
    """``q, k, v`` [B, T, heads * D] views of one fused QKV output; ``cos, sin`` [B, 1, T, D];
    caches [B, n_kv, S, D]; ``slots`` [T]. Writes k (rotated) and v at ``slots``; returns rotated
    q as [B, H, T, D]. ``pdl``: programmatic dependent launch where supported."""
    B, T, _ = q.shape
    if k.stride()[:2] != q.stride()[:2] or v.stride()[:2] != q.stride()[:2] or q.stride(2) != 1:
        raise ValueError("rope_kv_write: q, k and v must be column slices of one [B, T, N] tensor")
    out = torch.empty(B, n_heads, T, head_dim, dtype=q.dtype, device=q.device)
    half = head_dim // 2
    rope_kv_kernel[(B * T, n_heads + n_kv)](
        q, k, v, cos, sin, out, k_cache, v_cache, slots,
        T, n_heads, q.stride(0), q.stride(1), cos.stride(0), cos.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        HALF=half, BLOCK=triton.next_power_of_2(half), num_warps=1, **pdl_launch(q.device, pdl))
    return out
