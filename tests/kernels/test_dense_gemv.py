"""The one-row dense GEMV (the decode step's lm_head; interpreter) against fp32 math on the same
fp16 / bf16 inputs: tolerance one output rounding plus fp32 summation (2e-3 of max |y| for fp16,
1e-2 for bf16), over N not a multiple of its row tile, K below, at and not a multiple of its column
tile, and a [1, 1, K] input like the runtime's."""

from __future__ import annotations

import pytest
import torch

from awqconv.kernels.dense_gemv import BLOCK_K, BLOCK_N, dense_gemv


@pytest.mark.parametrize("N,K", [(37, 64), (BLOCK_N * 5, BLOCK_K), (101, BLOCK_K * 2 + 96), (3, 8)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dense_gemv_matches_fp32(N, K, dtype):
    g = torch.Generator().manual_seed(N * K)
    w = torch.randn(N, K, generator=g).to(dtype)
    x = torch.randn(1, 1, K, generator=g).to(dtype)
    y = dense_gemv(x, w)
    ref = x.float() @ w.float().t()
    assert y.shape == (1, 1, N) and y.dtype == dtype
    tol = 2e-3 if dtype == torch.float16 else 1e-2
    assert ((y.float() - ref).abs().max() / ref.abs().max()).item() < tol


def test_dense_gemv_refuses_several_rows():
    with pytest.raises(ValueError, match="one row"):
        dense_gemv(torch.zeros(2, 8).half(), torch.zeros(4, 8).half())
