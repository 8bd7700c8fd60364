"""One row times a dense fp16/bf16 matrix: the decode step's lm_head (``y = x W^T``, W ``[N, K]``).

cuBLAS runs Llama-2's [32000, 4096] fp16 lm_head for one row at ~2.6 TB/s (99.9 us on an H100);
this kernel streams W in [BLOCK_N, BLOCK_K] row tiles, the next tile's loads issued before the
current tile's arithmetic, at ~2.9 TB/s (90.4 us; docs/design.md).
fp32 accumulation, one rounding of each output. In the programmatic-dependent-launch chain its
first weight tile is read before it waits for the previous kernel (the final norm).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .launch import pdl_launch, pdl_start, pdl_wait

BLOCK_N, BLOCK_K, NUM_WARPS = 2, 2048, 4  # H100 sweep: 90.4 us; 4 x 1024 90.8, 8 x 512 92.6


@triton.jit
def dense_gemv_kernel(x_ptr, w_ptr, y_ptr, N, K, stride_w, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      USE_PDL: tl.constexpr = False):
    pdl_start(USE_PDL)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mn = rn < N
    rows = w_ptr + rn[:, None].to(tl.int64) * stride_w + rk[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    w = tl.load(rows, mask=mn[:, None] & (rk < K)[None, :], other=0.0, eviction_policy="evict_first")
    pdl_wait(USE_PDL)  # x is the previous kernel's output
    for k0 in range(0, K, BLOCK_K):
        nk = k0 + BLOCK_K  # the next tile (masked off past the end: no memory traffic)
        nw = tl.load(rows + nk, mask=mn[:, None] & (nk + rk < K)[None, :], other=0.0, eviction_policy="evict_first")
        x = tl.load(x_ptr + k0 + rk, mask=k0 + rk < K, other=0.0).to(tl.float32)
        acc += w.to(tl.float32) * x[None, :]
        w = nw
    tl.store(y_ptr + rn, tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty), mask=mn)


def dense_gemv(x: Tensor, w: Tensor, pdl: bool = True) -> Tensor:
    """``F.linear(x, w)`` for one row: ``x [..., K]`` holding K values, ``w [N, K]`` (last dim
    contiguous, same dtype) -> ``[..., N]``. ``pdl``: programmatic dependent launch where supported."""
    N, K = w.shape
    if x.numel() != K or x.shape[-1] != K or w.stride(1) != 1 or x.dtype != w.dtype:
        raise ValueError(f"dense_gemv: one row of {K} values in {w.dtype} and W [N, K] with contiguous rows")
    x = x.contiguous()
    y = torch.empty(*x.shape[:-1], N, dtype=x.dtype, device=x.device)
    dense_gemv_kernel[(triton.cdiv(N, BLOCK_N),)](x, w, y, N, K, w.stride(0), BLOCK_N=BLOCK_N,
                                                   BLOCK_K=min(BLOCK_K, triton.next_power_of_2(K)),
                                                   num_warps=NUM_WARPS, **pdl_launch(x.device, pdl))
    return y
