"""Shared checks of the INT4 kernel tests: a float64 reference of x (q - z) s + b and the error bound.

Tolerances come from the output dtype: the kernels accumulate in fp32 and round once on store, so
||y - ref|| / ||ref|| sits near the unit roundoff of the output (fp16 2^-11, bf16 2^-8); we allow
4x fp16 (2e-3) and 4x bf16 (1.6e-2).
"""

from __future__ import annotations

import torch

from awqconv.kernels.workspace import WORKSPACE

TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _reference(x, p):
    y = x.double() @ p.dequantize(torch.float64).t()
    return y if p.bias is None else y + p.bias.double()


def _check(y, ref, dtype):
    assert y.dtype == dtype and y.shape == ref.shape
    assert torch.isfinite(y).all()
    err = ((y.double() - ref).norm() / ref.norm()).item()
    assert err < TOL[dtype], f"relative error {err:.2e} over {TOL[dtype]:.1e}"


def _workspace_clean(device=torch.device("cpu")):
    """Split-K tile tickets are re-armed to zero by the last program of each tile."""
    cnt = WORKSPACE.cnt.get(device)
    return cnt is None or not cnt.any()
