"""Mixture-of-experts decode in a fixed number of launches, whatever the experts chosen.

For T tokens routed to ``top_k`` experts each (P = T * top_k (token, expert) pairs):
  1. ``moe_route``: softmax over the router logits, top-k, the weights renormalised (or not): one
     program per token (expert ids int32 [T, top_k], weights fp32).
  2. the gate/up GEMV of every pair in ONE launch (``moe_gemv_kernel``): grid (column tiles, pairs,
     K splits); each program reads its pair's expert id and runs the one-row fp16x2 GEMV loop
     (gemv_f16x2.py) over that expert's stacked words (experts.py), parking fp32 partials;
  3. ``moe_act_kernel``: the split sums of gate and up, act(gate) * up per pair;
  4. the down GEMV of every pair in one launch (the same kernel, one input row per pair);
  5. ``moe_combine_kernel``: per token, the sum of its pairs' down outputs times their weights.
Rounding follows the per-expert path (each linear's output rounded to the activations' dtype, act
rounded before the multiply by up); the combination is summed in fp32 and rounded once. The
expert ids come from the previous kernel, so the GEMVs wait (PDL) before their first weight load.
``moe_dense_gemv_kernel`` is step 2/4 on dense fp16/bf16 expert stacks (the float baseline), so
both runtimes run the same launches. All of it is captured in the decode step's CUDA graph: no
host synchronisation, no data-dependent shapes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .config import INTERPRET, ONE_WAVE_PROGRAMS, PTX, one_wave_split, pow2_divisor
from .experts import ExpertWeight
from .gemv_f16x2 import _gemv_f16x2_loop, _gemv_f16x2_unscale
from .launch import pdl_launch, pdl_start, pdl_wait
from .norm_act import ACT_CODES, activation
from .triton_w4 import _round_to, sum_parked
from .workspace import WORKSPACE

GEMV_BLOCK_N = 64  # columns per grouped GEMV program (the one-row GEMV's tile, config.one_row_config)
MERGE_BLOCK = 256  # columns per program of the act and combine kernels
DENSE_BLOCK_N, DENSE_BLOCK_K = 2, 2048  # dense_gemv.py's tile


@triton.jit
def moe_route_kernel(logits_ptr, ids_ptr, w_ptr, E, stride_l, TOP_K: tl.constexpr, K_P2: tl.constexpr,
                     BLOCK_E: tl.constexpr, RENORM: tl.constexpr, USE_PDL: tl.constexpr = False):
    """One token: p = softmax(logits) in fp32; the TOP_K largest (lowest index first among equals),
    divided by their sum with RENORM."""
    pdl_start(USE_PDL)
    pdl_wait(USE_PDL)
    t = tl.program_id(0)
    e = tl.arange(0, BLOCK_E)
    m = e < E
    lg = tl.load(logits_ptr + t * stride_l + e, mask=m, other=float("-inf")).to(tl.float32)
    p = tl.where(m, tl.exp(lg - tl.max(lg, axis=0)), 0.0)
    p = tl.where(m, p / tl.sum(p, axis=0), -1.0)
    kk = tl.arange(0, K_P2)
    vals = tl.zeros((K_P2,), tl.float32)
    idxs = tl.zeros((K_P2,), tl.int32)
    for k in tl.static_range(TOP_K):
        best = tl.max(p, axis=0)
        # NaN logits match no lane (idx would be BLOCK_E): keep the id in range, the NaN flows on
        idx = tl.minimum(tl.min(tl.where(p == best, e, BLOCK_E), axis=0), E - 1)
        vals = tl.where(kk == k, best, vals)
        idxs = tl.where(kk == k, idx, idxs)
        p = tl.where(e == idx, -2.0, p)
    if RENORM:
        vals = vals / tl.sum(vals, axis=0)  # lanes past TOP_K hold 0
    tl.store(ids_ptr + t * TOP_K + kk, idxs, mask=kk < TOP_K)
    tl.store(w_ptr + t * TOP_K + kk, vals, mask=kk < TOP_K)


@triton.jit
def moe_gemv_kernel(x_ptr, ids_ptr, qw_ptr, s_ptr, z_ptr, ws_ptr, N, K, G, K_SPLIT, P, X_DIV, stride_x,
                    stride_qe, stride_se, BLOCK_N: tl.constexpr, KC: tl.constexpr, USE_ASM: tl.constexpr = True,
                    USE_PDL: tl.constexpr = False):
    """Program (column tile, pair, K split): the one-row GEMV of row ``pair // X_DIV`` of x through
    expert ``ids[pair]``'s columns, its fp32 partial parked at ``ws[split, pair]``."""
    pdl_start(USE_PDL)
    pdl_wait(USE_PDL)  # the expert ids (and x) are the previous kernels' outputs
    pair = tl.program_id(1)
    pid_k = tl.program_id(2)
    e = tl.load(ids_ptr + pair).to(tl.int64)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_lo = pid_k * K_SPLIT
    acc2 = _gemv_f16x2_loop(x_ptr + (pair // X_DIV) * stride_x, qw_ptr + e * stride_qe, s_ptr + e * stride_se,
                            z_ptr + e * stride_se, rn, N, G, k_lo, tl.minimum(k_lo + K_SPLIT, K), BLOCK_N, KC,
                            USE_ASM, False)
    acc = _gemv_f16x2_unscale(x_ptr.dtype.element_ty) * tl.sum(acc2, axis=0)
    tl.store(ws_ptr + (pid_k * P + pair) * N + rn, acc, mask=rn < N)


@triton.jit
def moe_dense_gemv_kernel(x_ptr, ids_ptr, w_ptr, y_ptr, N, K, X_DIV, stride_x, stride_we, stride_wn,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr = False):
    """Program (row tile, pair): rows of expert ``ids[pair]``'s dense ``[N, K]`` weight times row
    ``pair // X_DIV`` of x, fp32 accumulation, one rounding; the next weight tile's loads issued
    before the current tile's arithmetic (dense_gemv.py per pair, the float baseline's GEMV)."""
    pdl_start(USE_PDL)
    pdl_wait(USE_PDL)
    pair = tl.program_id(1)
    e = tl.load(ids_ptr + pair).to(tl.int64)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mn = rn < N
    rows = w_ptr + e * stride_we + rn[:, None].to(tl.int64) * stride_wn + rk[None, :]
    xr = x_ptr + (pair // X_DIV) * stride_x
    acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    w = tl.load(rows, mask=mn[:, None] & (rk < K)[None, :], other=0.0, eviction_policy="evict_first")
    for k0 in range(0, K, BLOCK_K):
        nk = k0 + BLOCK_K  # the next tile (masked off past the end: no memory traffic)
        nw = tl.load(rows + nk, mask=mn[:, None] & (nk + rk < K)[None, :], other=0.0, eviction_policy="evict_first")
        acc += w.to(tl.float32) * tl.load(xr + k0 + rk, mask=k0 + rk < K, other=0.0).to(tl.float32)[None, :]
        w = nw
    tl.store(y_ptr + pair * N + rn, tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty), mask=mn)


@triton.jit
def moe_act_kernel(src_ptr, act_ptr, N, I, P, SPLIT, BLOCK: tl.constexpr, SPLIT_P2: tl.constexpr,
                   ADT: tl.constexpr, ACT: tl.constexpr, USE_PDL: tl.constexpr = False):
    """act[pair, j] = act(gate) * up from a pair's [gate; up] row, summed over ``SPLIT`` parked
    partials (SPLIT = 1: the dense GEMV's output), each rounded as a linear's output."""
    pdl_start(USE_PDL)
    pdl_wait(USE_PDL)
    pair = tl.program_id(1)
    j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = j < I
    row = src_ptr + pair * N
    g = _round_to(sum_parked(row, row, j, m, P * N, SPLIT, SPLIT_P2, False), ADT).to(tl.float32)
    u = _round_to(sum_parked(row, row, I + j, m, P * N, SPLIT, SPLIT_P2, False), ADT).to(tl.float32)
    a = _round_to(activation(g, ACT), ADT).to(tl.float32)
    tl.store(act_ptr + pair * I + j, _round_to(a * u, ADT), mask=m)


@triton.jit
def moe_combine_kernel(src_ptr, w_ptr, y_ptr, H, P, SPLIT, TOP_K: tl.constexpr, BLOCK: tl.constexpr,
                       SPLIT_P2: tl.constexpr, ADT: tl.constexpr, USE_PDL: tl.constexpr = False):
    """y[t, j] = sum over token t's pairs of weight * down output (each output rounded as a
    linear's), in fp32, rounded once."""
    pdl_start(USE_PDL)
    pdl_wait(USE_PDL)
    t = tl.program_id(1)
    j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = j < H
    tot = tl.zeros((BLOCK,), tl.float32)
    for k in tl.static_range(TOP_K):
        row = src_ptr + (t * TOP_K + k) * H
        d = _round_to(sum_parked(row, row, j, m, P * H, SPLIT, SPLIT_P2, False), ADT).to(tl.float32)
        tot += d * tl.load(w_ptr + t * TOP_K + k)
    tl.store(y_ptr + t * H + j, _round_to(tot, ADT), mask=m)


def _adt(dtype: torch.dtype):
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}[dtype]


def moe_route(logits: Tensor, top_k: int, renormalize: bool, pdl: bool = True) -> tuple[Tensor, Tensor]:
    """(expert ids int32 ``[T, top_k]``, weights fp32 ``[T, top_k]``) of router ``logits [T, E]``."""
    T, E = logits.shape
    if not 1 <= top_k <= E or logits.stride(1) != 1:
        raise ValueError(f"moe_route: top_k {top_k} of {E} experts, logits with contiguous rows")
    ids = torch.empty(T, top_k, dtype=torch.int32, device=logits.device)
    w = torch.empty(T, top_k, dtype=torch.float32, device=logits.device)
    moe_route_kernel[(T,)](logits, ids, w, E, logits.stride(0), TOP_K=top_k, K_P2=triton.next_power_of_2(top_k),
                           BLOCK_E=triton.next_power_of_2(E), RENORM=renormalize, num_warps=1,
                           **pdl_launch(logits.device, pdl))
    return ids, w


def _grouped(x: Tensor, ids: Tensor, x_div: int, kw: ExpertWeight | None, dense: Tensor | None,
             pdl: bool) -> tuple[Tensor, int]:
    """Every pair's GEMV in one launch: (parked partials [split, P, N] fp32, split) for ``kw``, or
    (the outputs [P, N] in x's dtype, 1) for a dense stack ``[E, N, K]``."""
    x = x.contiguous()
    if x.data_ptr() % 16:  # read as aligned int32 pairs
        x = x.clone()
    P = ids.numel()
    launch = pdl_launch(x.device, pdl)
    if kw is None:
        E, N, K = dense.shape
        y = torch.empty(P, N, dtype=x.dtype, device=x.device)
        moe_dense_gemv_kernel[(triton.cdiv(N, DENSE_BLOCK_N), P)](
            x, ids, dense, y, N, K, x_div, x.stride(0), dense.stride(0), dense.stride(1), BLOCK_N=DENSE_BLOCK_N,
            BLOCK_K=min(DENSE_BLOCK_K, triton.next_power_of_2(K)), num_warps=4, **launch)
        return y, 1
    N, K, G = kw.out_features, kw.in_features, kw.group_size
    kc = pow2_divisor(G, 64)
    # one resident wave of ONE_WAVE_PROGRAMS per SM over all pairs (config.one_row_config's rule)
    split = min(one_wave_split(N * P, GEMV_BLOCK_N, ONE_WAVE_PROGRAMS, x.device), K // kc)
    k_split = triton.cdiv(K // kc, split) * kc
    split = triton.cdiv(K, k_split)
    ws, _ = WORKSPACE.get(x.device, split * P * N, 0)
    extra = {"maxnreg": 64} if not INTERPRET and x.is_cuda else {}
    moe_gemv_kernel[(triton.cdiv(N, GEMV_BLOCK_N), P, split)](
        x, ids, kw.qw, kw.scales, kw.zeros, ws, N, K, G, k_split, P, x_div, x.stride(0), kw.qw.stride(0),
        kw.scales.stride(0), BLOCK_N=GEMV_BLOCK_N, KC=kc, USE_ASM=PTX and not INTERPRET, num_warps=2, **extra,
        **launch)
    return ws, split


def moe_experts(h: Tensor, ids: Tensor, weights: Tensor, gate_up, down, act: str = "silu",
                pdl: bool = True) -> Tensor:
    """The MoE block's expert part for rows ``h [T, H]`` routed to ``ids, weights [T, top_k]``
    (``moe_route``): sum_k weights[t, k] * down_e(act(gate_e h) * up_e h), e = ids[t, k], in four
    launches. ``gate_up``, ``down``: ``ExpertLinear`` with a kernel layout (``kw``; fp16/bf16 rows)
    or a dense stack (``dense``) on the GPU."""
    T, H = h.shape
    top_k = ids.shape[1]
    P = T * top_k
    ids = ids.reshape(P)
    inter = gate_up.out_features // 2
    if gate_up.splits != (inter, inter) or down.in_features != inter or down.out_features != H:
        raise ValueError(f"moe_experts: gate/up {gate_up.splits} and down {down.in_features}->{down.out_features} "
                         f"do not chain over hidden {H}")
    adt = _adt(h.dtype)
    launch = pdl_launch(h.device, pdl)
    src, split = _grouped(h, ids, top_k, gate_up.kw, gate_up.dense, pdl)
    a = torch.empty(P, inter, dtype=h.dtype, device=h.device)
    moe_act_kernel[(triton.cdiv(inter, MERGE_BLOCK), P)](src, a, gate_up.out_features, inter, P, split,
                                                        BLOCK=MERGE_BLOCK, SPLIT_P2=triton.next_power_of_2(split),
                                                        ADT=adt, ACT=ACT_CODES[act], num_warps=4, **launch)
    src, split = _grouped(a, ids, 1, down.kw, down.dense, pdl)
    y = torch.empty(T, H, dtype=h.dtype, device=h.device)
    moe_combine_kernel[(triton.cdiv(H, MERGE_BLOCK), T)](src, weights, y, H, P, split, TOP_K=top_k,
                                                        BLOCK=MERGE_BLOCK, SPLIT_P2=triton.next_power_of_2(split),
                                                        ADT=adt, num_warps=4, **launch)
    return y
