"""The decode step's one-row GEMV with the next elementwise step as its epilogue (one kernel fewer).

Both kernels run the fp16x2 GEMV (triton_w4) with each program's 64 output columns chosen as two
32-column runs that the epilogue pairs up; the weights are not permuted, only which columns a
program takes. The program that completes a tile (the last split-K contributor) rounds its sums to
the activations' dtype (the values the plain GEMV would store) and then:
  - QKV + RoPE (``qkv_rope``): the runs are (d, d + D/2) of one head, the pairs RoPE rotates; q and k
    are rotated in fp32 with one rounding (as rope_kv.py), q heads go to ``q [1, H, 1, D]``, k and
    v heads into the caches at this step's slot.
  - gate/up + SiLU (``gate_up_silu``): the runs are gate j and up j of the fused gate_up output; the
    tile stores silu(gate) * up, rounded as norm_act.silu_mul does.
The fused output itself is never stored. One fp16 or bf16 row only, and tile-aligned shapes (``fits``).
A bf16 row may come as an ``X16`` (x16.py, fp16 x / 16 written by the producer); then the SiLU
epilogue writes its output as an ``X16`` too, for the down projection's GEMV.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .launch import pdl_launch
from .launch import pdl_start as _pdl_start
from .layout import KernelWeight
from .triton_w4 import (
    _gemv_f16x2_loop,
    _gemv_f16x2_unscale,
    _merged,
    _rearm,
    x16_from_f32,
)
from .x16 import X16

BLOCK_N = 64  # the decode GEMV's tile (ops.default_config, M = 1): two runs of 32 columns


@triton.jit
def _pair_tile(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, ws_ptr, cnt_ptr, first, second, N, K, G, K_SPLIT, SPLIT_K,
               BLOCK_N: tl.constexpr, KC: tl.constexpr, SPLIT_P2: tl.constexpr, HAS_BIAS: tl.constexpr,
               USE_ASM: tl.constexpr, USE_PDL: tl.constexpr, X16: tl.constexpr):
    """The GEMV over columns first + [0, P) and second + [0, P) (P = BLOCK_N / 2): (last, x1, x2), the
    two runs' values rounded to the activations' dtype (bf16 for ``X16`` input), as fp32 [P],
    meaningful in the program that completes the tile."""
    P: tl.constexpr = BLOCK_N // 2
    t = tl.program_id(0)
    pid_k = tl.program_id(2)
    c = tl.arange(0, BLOCK_N)
    rn = tl.where(c < P, first + c, second + c - P)
    k_lo = pid_k * K_SPLIT
    acc2 = _gemv_f16x2_loop(x_ptr, qw_ptr, s_ptr, z_ptr, rn, N, G, k_lo, tl.minimum(k_lo + K_SPLIT, K),
                            BLOCK_N, KC, 1, USE_ASM, USE_PDL)
    acc = _gemv_f16x2_unscale(x_ptr.dtype.element_ty, X16) * tl.sum(acc2, axis=0)
    last, tot = _merged(acc[None, :], tl.arange(0, 1), rn, 1, N, ws_ptr, cnt_ptr, t, pid_k, SPLIT_K, SPLIT_P2)
    if HAS_BIAS:  # (only the completing program's tot is used; the others' loads are L2 hits)
        tot += tl.load(b_ptr + rn).to(tl.float32)[None, :]
    adt: tl.constexpr = tl.bfloat16 if X16 else x_ptr.dtype.element_ty
    y = tl.reshape(tot.to(adt).to(tl.float32), (BLOCK_N,))  # what the plain GEMV would store
    x1, x2 = tl.split(tl.trans(tl.reshape(y, (2, P))))
    return last, x1, x2


@triton.jit
def w4_gemv_rope_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, ws_ptr, cnt_ptr,
                        cos_ptr, sin_ptr, q_ptr, kc_ptr, vc_ptr, slot_ptr,
                        N, K, G, K_SPLIT, SPLIT_K, H, HKV, stride_kh, stride_ks, stride_vh, stride_vs,
                        HEAD_D: tl.constexpr, BLOCK_N: tl.constexpr, KC: tl.constexpr, SPLIT_P2: tl.constexpr,
                        HAS_BIAS: tl.constexpr, USE_ASM: tl.constexpr = True, USE_PDL: tl.constexpr = False,
                        X16: tl.constexpr = False):
    _pdl_start(USE_PDL)
    P: tl.constexpr = BLOCK_N // 2
    HALF: tl.constexpr = HEAD_D // 2
    t = tl.program_id(0)
    head = t // (HALF // P)
    i0 = (t % (HALF // P)) * P
    last, x1, x2 = _pair_tile(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, ws_ptr, cnt_ptr, head * HEAD_D + i0,
                              head * HEAD_D + HALF + i0, N, K, G, K_SPLIT, SPLIT_K, BLOCK_N, KC, SPLIT_P2, HAS_BIAS,
                              USE_ASM, USE_PDL, X16)
    if last:
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
        _rearm(cnt_ptr, t, SPLIT_P2)


@triton.jit
def w4_gemv_silu_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, ws_ptr, cnt_ptr, act_ptr,
                        N, K, G, K_SPLIT, SPLIT_K, I,
                        BLOCK_N: tl.constexpr, KC: tl.constexpr, SPLIT_P2: tl.constexpr,
                        HAS_BIAS: tl.constexpr, USE_ASM: tl.constexpr = True, USE_PDL: tl.constexpr = False,
                        X16: tl.constexpr = False):
    _pdl_start(USE_PDL)
    P: tl.constexpr = BLOCK_N // 2
    j0 = tl.program_id(0) * P
    last, g, u = _pair_tile(x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, ws_ptr, cnt_ptr, j0, I + j0, N, K, G, K_SPLIT,
                            SPLIT_K, BLOCK_N, KC, SPLIT_P2, HAS_BIAS, USE_ASM, USE_PDL, X16)
    if last:
        dt: tl.constexpr = tl.bfloat16 if X16 else act_ptr.dtype.element_ty
        a = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
        if X16:  # the down projection's input, already as fp16 x / 16
            tl.store(act_ptr + j0 + tl.arange(0, P), x16_from_f32(a * u))
        else:
            tl.store(act_ptr + j0 + tl.arange(0, P), (a * u).to(dt))
        _rearm(cnt_ptr, tl.program_id(0), SPLIT_P2)


def rope_shape_ok(n_out: int, n_heads: int, n_kv: int, head_dim: int) -> bool:
    """Whether a QKV output of ``n_out`` columns is these heads, each a whole number of tiles."""
    return n_out == (n_heads + 2 * n_kv) * head_dim and head_dim % BLOCK_N == 0


def glu_shape_ok(splits: tuple[int, ...]) -> bool:
    """Whether a fused output split as ``splits`` is [gate; up] halves of whole 32-column runs."""
    return len(splits) == 2 and splits[0] == splits[1] and splits[0] % (BLOCK_N // 2) == 0


def fits(kw: KernelWeight, x: Tensor | X16) -> bool:
    """Whether the fused kernels can take ``x``: one fp16 or bf16 (or ``X16``) row whose default
    kernel is the inline-PTX GEMV with the tile width these kernels pair up."""
    from .ops import _PTX, default_config

    x = x.t if isinstance(x, X16) else x
    cfg = default_config(1, kw, x.device, x.dtype)
    return x.shape[0] == 1 and cfg.kind == "gemv_f16x2" and cfg.block_n == BLOCK_N and _PTX


def _launch(kernel, x: Tensor | X16, kw: KernelWeight, outputs: tuple, shape_args: tuple, **constexprs) -> None:
    """Run ``kernel`` over the N / BLOCK_N tiles with the default decode config's split-K: arguments
    (inputs, weight, scratch, ``outputs``, sizes and split, ``shape_args``, constexprs)."""
    from .launch import INTERPRET
    from .ops import _PTX, _split_for, default_config
    from .workspace import WORKSPACE

    if isinstance(x, X16):
        x, constexprs = x.t, {**constexprs, "X16": True}

    N, K = kw.out_features, kw.in_features
    if x.data_ptr() % 16 or not x.is_contiguous():  # read as aligned int32 pairs: odd views get a copy
        x = x.clone(memory_format=torch.contiguous_format)
    cfg = default_config(1, kw, x.device, x.dtype)
    n_tiles = N // BLOCK_N
    split, k_split = _split_for(cfg, n_tiles, K, x.device)
    ws, cnt = WORKSPACE.get(x.device, split * N if split > 1 else 0, n_tiles)
    bias = kw.bias if kw.bias is not None else kw.scales  # dummy pointer when absent
    kernel[(n_tiles, 1, split)](
        x, kw.qw, kw.scales, kw.zeros, bias, ws, cnt, *outputs, N, K, kw.group_size, k_split, split, *shape_args,
        BLOCK_N=BLOCK_N, KC=cfg.kc, SPLIT_P2=triton.next_power_of_2(split) if split > 1 else 1,
        HAS_BIAS=kw.bias is not None, USE_ASM=_PTX and not INTERPRET, num_warps=cfg.num_warps,
        **constexprs, **pdl_launch(x.device, cfg.pdl))


def qkv_rope(x: Tensor | X16, kw: KernelWeight, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor,
             slot: Tensor, n_heads: int, n_kv: int, head_dim: int) -> Tensor:
    """``x [1, K]`` through the fused QKV weight, then RoPE and the cache write: returns rotated q as
    ``[1, n_heads, 1, head_dim]`` and stores rotated k and v at ``slot`` (int64 [1], on the device) of
    ``k_cache, v_cache [1, n_kv, S, head_dim]``. ``cos, sin``: this token's ``[head_dim]`` (any view
    with a contiguous last dim). Same values as ``w4_matmul`` followed by ``rope_kv.rope_kv_write``
    (an ``X16`` row: those of its bf16 row, q in bf16)."""
    if not rope_shape_ok(kw.out_features, n_heads, n_kv, head_dim):
        raise ValueError(f"qkv_rope: {kw.out_features} outputs are not {n_heads} + 2 x {n_kv} heads of "
                         f"{head_dim} in whole tiles")
    dt = torch.bfloat16 if isinstance(x, X16) else x.dtype
    q = torch.empty(1, n_heads, 1, head_dim, dtype=dt, device=k_cache.device)
    _launch(w4_gemv_rope_kernel, x, kw, (cos, sin, q, k_cache, v_cache, slot),
            (n_heads, n_kv, k_cache.stride(1), k_cache.stride(2), v_cache.stride(1), v_cache.stride(2)),
            HEAD_D=head_dim)
    return q


def gate_up_silu(x: Tensor | X16, kw: KernelWeight) -> Tensor | X16:
    """``x [1, K]`` through the fused [gate; up] weight, then silu(gate) * up: ``[1, I]``. Same values
    as ``w4_matmul`` followed by ``norm_act.silu_mul``; for an ``X16`` row, an ``X16`` of them."""
    inter = kw.out_features // 2
    if not glu_shape_ok((inter, kw.out_features - inter)):
        raise ValueError(f"gate_up_silu: {kw.out_features} outputs are not two halves of whole half-tiles")
    if isinstance(x, X16):
        act = torch.empty(1, inter, dtype=torch.float16, device=x.t.device)
        _launch(w4_gemv_silu_kernel, x, kw, (act,), (inter,))
        return X16(act)
    act = torch.empty(1, inter, dtype=x.dtype, device=x.device)
    _launch(w4_gemv_silu_kernel, x, kw, (act,), (inter,))
    return act
