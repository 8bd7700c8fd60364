"""RoPE on q and k and the KV-cache write in one Triton kernel (the runtime's attention prologue).

Replaces three small launches per layer (RoPE, two ``index_copy_``) with one: each program takes one
(token, head) pair of the fused QKV output, rotates q heads into a fresh ``[B, H, T, D]`` tensor,
rotates k heads into ``k_cache[b, h, slot]`` and copies the matching v head into ``v_cache``. The
rotation is ``x * cos + rotate_half(x) * sin`` in fp32, rounded once. Optional: a per-head RMSNorm
of q and k before the rotation (Qwen3, Gemma 3: ``q_norm``/``k_norm``, rounded as the runtime's
torch ``rms_norm``), and a rotation of only the first ``2 * HALF`` of the ``HEAD_D`` dims (partial
rotary, Phi-4-mini: the rest passes through).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .launch import pdl_launch, pdl_start, pdl_wait


@triton.jit
def head_norm_part(x, w_ptr, cols, mask, r, ADT: tl.constexpr):
    """One part of a head normalised by ``r`` (fp32): ``w * round(x * r)``, rounded to ``ADT``, as fp32."""
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    return (w * (x * r).to(ADT).to(tl.float32)).to(ADT).to(tl.float32)


@triton.jit
def head_rms(x1, x2, xp, HEAD_D: tl.constexpr, eps):
    """1 / sqrt(mean(x^2) + eps) over a head held as two rotary halves and a pass-through part."""
    ss = tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0) + tl.sum(xp * xp, axis=0)
    return 1.0 / tl.sqrt_rn(ss / HEAD_D + eps)


@triton.jit
def rope_kv_kernel(q_src, k_src, v_src, cos_ptr, sin_ptr, q_out, kc_ptr, vc_ptr, slot_ptr, qn_ptr, kn_ptr, eps,
                   T, H, stride_sb, stride_st, stride_cb, stride_ct,
                   stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
                   HALF: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr, BLOCK_P: tl.constexpr,
                   USE_PDL: tl.constexpr = False, QK_NORM: tl.constexpr = False):
    """``D`` is the head size; dims past 2 * HALF pass through unrotated (``BLOCK_P`` covers them)."""
    pdl_start(USE_PDL)
    pdl_wait(USE_PDL)  # q, k, v are the previous kernel's output
    row = tl.program_id(0)  # b * T + t
    head = tl.program_id(1)  # q heads first, then kv heads
    b = row // T
    t = row % T
    r = tl.arange(0, BLOCK)
    m = r < HALF
    rp = 2 * HALF + tl.arange(0, BLOCK_P)
    mp = rp < D
    cs = cos_ptr + b * stride_cb + t * stride_ct
    sn = sin_ptr + b * stride_cb + t * stride_ct
    c1 = tl.load(cs + r, mask=m).to(tl.float32)
    c2 = tl.load(cs + HALF + r, mask=m).to(tl.float32)
    s1 = tl.load(sn + r, mask=m).to(tl.float32)
    s2 = tl.load(sn + HALF + r, mask=m).to(tl.float32)
    src_row = b * stride_sb + t * stride_st
    if head < H:
        src = q_src + src_row + head * D
    else:
        src = k_src + src_row + (head - H) * D
    x1 = tl.load(src + r, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF + r, mask=m, other=0.0).to(tl.float32)
    xp = tl.load(src + rp, mask=mp, other=0.0).to(tl.float32)
    if QK_NORM:
        adt: tl.constexpr = q_src.dtype.element_ty
        w_ptr = qn_ptr if head < H else kn_ptr
        rr = head_rms(x1, x2, xp, D, eps)
        x1 = head_norm_part(x1, w_ptr, r, m, rr, adt)
        x2 = head_norm_part(x2, w_ptr, HALF + r, m, rr, adt)
        xp = head_norm_part(xp, w_ptr, rp, mp, rr, adt)
    o1 = x1 * c1 - x2 * s1
    o2 = x2 * c2 + x1 * s2
    if head < H:
        dst = q_out + ((b * H + head) * T + t) * D
        tl.store(dst + r, o1.to(q_out.dtype.element_ty), mask=m)
        tl.store(dst + HALF + r, o2.to(q_out.dtype.element_ty), mask=m)
        tl.store(dst + rp, xp.to(q_out.dtype.element_ty), mask=mp)
    else:
        kh = head - H
        slot = tl.load(slot_ptr + t)
        kd = kc_ptr + b * stride_kb + kh * stride_kh + slot * stride_ks
        tl.store(kd + r, o1.to(kc_ptr.dtype.element_ty), mask=m)
        tl.store(kd + HALF + r, o2.to(kc_ptr.dtype.element_ty), mask=m)
        tl.store(kd + rp, xp.to(kc_ptr.dtype.element_ty), mask=mp)
        vs = v_src + src_row + kh * D
        vd = vc_ptr + b * stride_vb + kh * stride_vh + slot * stride_vs
        tl.store(vd + r, tl.load(vs + r, mask=m), mask=m)
        tl.store(vd + HALF + r, tl.load(vs + HALF + r, mask=m), mask=m)
        tl.store(vd + rp, tl.load(vs + rp, mask=mp), mask=mp)


def rope_kv_write(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor,
                  slots: Tensor, n_heads: int, n_kv: int, head_dim: int, pdl: bool = True,
                  qk_norm: tuple[Tensor, Tensor, float] | None = None) -> Tensor:
    """``q, k, v`` [B, T, heads * D] views of one fused QKV output; ``cos, sin`` [B, 1, T, R] with
    R <= D the rotated dims (R < D: partial rotary); caches [B, n_kv, S, D]; ``slots`` [T]. Writes k
    (rotated) and v at ``slots``; returns rotated q as [B, H, T, D]. ``qk_norm``: (q weight, k
    weight, eps) of a per-head RMSNorm applied before the rotation. ``pdl``: programmatic dependent
    launch where supported."""
    B, T, _ = q.shape
    if k.stride()[:2] != q.stride()[:2] or v.stride()[:2] != q.stride()[:2] or q.stride(2) != 1:
        raise ValueError("rope_kv_write: q, k and v must be column slices of one [B, T, N] tensor")
    rot = cos.shape[-1]
    if rot % 2 or rot > head_dim:
        raise ValueError(f"rope_kv_write: {rot} rotary dims for heads of {head_dim}")
    out = torch.empty(B, n_heads, T, head_dim, dtype=q.dtype, device=q.device)
    half = rot // 2
    qn, kn, eps = qk_norm if qk_norm is not None else (q, q, 0.0)
    rope_kv_kernel[(B * T, n_heads + n_kv)](
        q, k, v, cos, sin, out, k_cache, v_cache, slots, qn, kn, eps,
        T, n_heads, q.stride(0), q.stride(1), cos.stride(0), cos.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        HALF=half, BLOCK=triton.next_power_of_2(half), D=head_dim,
        BLOCK_P=triton.next_power_of_2(max(1, head_dim - rot)), QK_NORM=qk_norm is not None,
        num_warps=1, **pdl_launch(q.device, pdl))
    return out
