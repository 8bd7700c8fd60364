"""The decode step's one-row GEMVs with the next elementwise step fused into their split-K merge.

The GEMV is the plain one-row fp16x2 kernel (triton_w4) with every program parking its fp32 partial
sums (``plan_matmul(..., merge=False)``). Instead of the generic merge (``w4_merge_kernel``), one of
the kernels below sums the partials in split order, adds the bias and rounds to the activations'
dtype (the values the plain GEMV would store), then applies the next step:
  - QKV + RoPE (``qkv_rope``): one program per head takes columns d and d + D/2, the pairs RoPE
    rotates; q and k are rotated in fp32 with one rounding (as rope_kv.py), q heads go to
    ``q [1, H, 1, D]``, k and v heads into the caches at this step's slot.
  - gate/up + SiLU (``gate_up_silu``): gate j and up j give silu(gate) * up, rounded as
    norm_act.silu_mul does.
The fused output itself is never stored. One fp16 or bf16 row only (``fits``). A bf16 row may come
as an ``X16`` (x16.py, fp16 x / 16 written by the producer); then the SiLU step writes its output
as an ``X16`` too, for the down projection's GEMV.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .launch import pdl_launch, pdl_start, pdl_wait
from .layout import KernelWeight
from .triton_w4 import sum_parked, x16_from_f32
from .x16 import X16


@triton.jit
def _merged_cols(ws_ptr, b_ptr, cols, mask, N, SPLIT, SPLIT_P2: tl.constexpr, HAS_BIAS: tl.constexpr,
                 ADT: tl.constexpr):
    """Columns ``cols`` of the one-row GEMV output from its parked partials [SPLIT, N], merged as
    ``w4_merge_kernel`` does and rounded to the activations' dtype (what the plain GEMV stores), as fp32."""
    return sum_parked(ws_ptr, b_ptr, cols, mask, N, SPLIT, SPLIT_P2, HAS_BIAS).to(ADT).to(tl.float32)


@triton.jit
def rope_merge_kernel(ws_ptr, b_ptr, cos_ptr, sin_ptr, q_ptr, kc_ptr, vc_ptr, slot_ptr, N, SPLIT, H, HKV,
                      stride_kh, stride_ks, stride_vh, stride_vs,
                      HEAD_D: tl.constexpr, BLOCK: tl.constexpr, SPLIT_P2: tl.constexpr, HAS_BIAS: tl.constexpr,
                      ADT: tl.constexpr, USE_PDL: tl.constexpr = False):
    """One head per program: merge its columns (d, d + D/2), rotate q and k heads, store q or the
    cache rows at this step's slot (v heads unrotated)."""
    pdl_start(USE_PDL)
    pdl_wait(USE_PDL)  # the partials are the GEMV's; q and the caches are read by the next kernels
    HALF: tl.constexpr = HEAD_D // 2
    head = tl.program_id(0)
    i = tl.arange(0, BLOCK)
    m = i < HALF
    x1 = _merged_cols(ws_ptr, b_ptr, head * HEAD_D + i, m, N, SPLIT, SPLIT_P2, HAS_BIAS, ADT)
    x2 = _merged_cols(ws_ptr, b_ptr, head * HEAD_D + HALF + i, m, N, SPLIT, SPLIT_P2, HAS_BIAS, ADT)
    if head < H + HKV:
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
def silu_merge_kernel(ws_ptr, b_ptr, act_ptr, N, SPLIT, I, BLOCK: tl.constexpr, SPLIT_P2: tl.constexpr,
                      HAS_BIAS: tl.constexpr, ADT: tl.constexpr, X16: tl.constexpr = False,
                      USE_PDL: tl.constexpr = False):
    """act[j] = silu(gate[j]) * up[j] from the merged [gate; up] columns (``X16``: stored as fp16 act / 16)."""
    pdl_start(USE_PDL)
    pdl_wait(USE_PDL)
    j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = j < I
    g = _merged_cols(ws_ptr, b_ptr, j, m, N, SPLIT, SPLIT_P2, HAS_BIAS, ADT)
    u = _merged_cols(ws_ptr, b_ptr, I + j, m, N, SPLIT, SPLIT_P2, HAS_BIAS, ADT)
    a = (g / (1.0 + tl.exp(-g))).to(ADT).to(tl.float32)
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
    from .ops import _PTX, default_config

    x = x.t if isinstance(x, X16) else x
    return x.shape[0] == 1 and default_config(1, kw, x.device, x.dtype).kind == "gemv_f16x2" and _PTX


def _parked(x: Tensor | X16, kw: KernelWeight) -> tuple[Tensor, int, dict]:
    """Run the one-row GEMV with its partials parked: (partials [split, N], split, the merge
    kernels' common launch keywords: bias, split, dtype, PDL)."""
    from .ops import default_config, plan_matmul

    x16 = isinstance(x, X16)
    t = x.t if x16 else x
    cfg = default_config(1, kw, t.device, t.dtype)
    plan = plan_matmul(t, kw, cfg, x16=x16, merge=False)
    plan()
    split = plan.grid[2]
    adt = tl.bfloat16 if x16 or t.dtype == torch.bfloat16 else tl.float16
    return plan.partials, split, dict(SPLIT_P2=triton.next_power_of_2(split), HAS_BIAS=kw.bias is not None,
                                      ADT=adt, **pdl_launch(t.device, cfg.pdl))


def qkv_rope(x: Tensor | X16, kw: KernelWeight, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor,
             slot: Tensor, n_heads: int, n_kv: int, head_dim: int) -> Tensor:
    """``x [1, K]`` through the fused QKV weight, then RoPE and the cache write: returns rotated q as
    ``[1, n_heads, 1, head_dim]`` and stores rotated k and v at ``slot`` (int64 [1], on the device) of
    ``k_cache, v_cache [1, n_kv, S, head_dim]``. ``cos, sin``: this token's ``[head_dim]`` (any view
    with a contiguous last dim). Same values as ``w4_matmul`` followed by ``rope_kv.rope_kv_write``
    (an ``X16`` row: those of its bf16 row, q in bf16)."""
    if not rope_shape_ok(kw.out_features, n_heads, n_kv, head_dim):
        raise ValueError(f"qkv_rope: {kw.out_features} outputs are not {n_heads} + 2 x {n_kv} heads of "
                         f"{head_dim}")
    dt = torch.bfloat16 if isinstance(x, X16) else x.dtype
    q = torch.empty(1, n_heads, 1, head_dim, dtype=dt, device=k_cache.device)
    ws, split, meta = _parked(x, kw)
    rope_merge_kernel[(n_heads + 2 * n_kv,)](
        ws, kw.bias if kw.bias is not None else ws, cos, sin, q, k_cache, v_cache, slot, kw.out_features, split,
        n_heads, n_kv, k_cache.stride(1), k_cache.stride(2), v_cache.stride(1), v_cache.stride(2),
        HEAD_D=head_dim, BLOCK=triton.next_power_of_2(head_dim // 2), num_warps=1 if head_dim <= 128 else 2,
        **meta)
    return q


def gate_up_silu(x: Tensor | X16, kw: KernelWeight) -> Tensor | X16:
    """``x [1, K]`` through the fused [gate; up] weight, then silu(gate) * up: ``[1, I]``. Same values
    as ``w4_matmul`` followed by ``norm_act.silu_mul``; for an ``X16`` row, an ``X16`` of them."""
    inter = kw.out_features // 2
    if not glu_shape_ok((inter, kw.out_features - inter)):
        raise ValueError(f"gate_up_silu: {kw.out_features} outputs are not two equal halves")
    x16 = isinstance(x, X16)
    t = x.t if x16 else x
    act = torch.empty(1, inter, dtype=torch.float16 if x16 else t.dtype, device=t.device)
    ws, split, meta = _parked(x, kw)
    block = 256
    silu_merge_kernel[(triton.cdiv(inter, block),)](ws, kw.bias if kw.bias is not None else ws, act,
                                                    kw.out_features, split, inter, BLOCK=block, X16=x16,
                                                    num_warps=2, **meta)
    return X16(act) if x16 else act
