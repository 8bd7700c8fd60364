"""The CPU INT4 paths (dense, int4pack, dequant) and the Int4Linear module on the CPU.

All run in fp32 with exact weights, so the tolerance is fp32 matmul rounding: relative 1e-5.
"""

from __future__ import annotations

import pytest
import torch

from awqconv.kernels.cpu import CPU_PATHS, make_cpu_linear
from awqconv.kernels.linear import Int4Linear


@pytest.mark.parametrize("path", CPU_PATHS)
@pytest.mark.parametrize("n,k,g,bias", [(48, 128, 32, True), (48, 576, 64, False)])
def test_cpu_paths_match_reference(make_packed, path, n, k, g, bias):
    p = make_packed(n, k, g, bias=bias, seed=n)
    x = torch.randn(5, k, dtype=torch.float64)
    ref = x @ p.dequantize(torch.float64).t()
    if bias:
        ref = ref + p.bias.double()
    y = make_cpu_linear(p, path)(x.float())
    assert y.dtype == torch.float32
    assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-5


@pytest.mark.parametrize("path", CPU_PATHS)
def test_fused_module_splits_back(make_packed, path):
    parts = [make_packed(n, 64, 32, bias=True, seed=n) for n in (32, 16, 16)]
    lin = Int4Linear.from_packed(parts, device="cpu", dtype=torch.float32, mode=path)
    x = torch.randn(2, 3, 64)
    ys = lin.split(lin(x))
    assert [y.shape for y in ys] == [torch.Size([2, 3, n]) for n in (32, 16, 16)]
    for y, p in zip(ys, parts):
        ref = x.double() @ p.dequantize(torch.float64).t() + p.bias.double()
        assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-5


def test_int4pack_rejects_odd_n_clearly(make_packed):
    from awqconv.errors import ShapeError

    with pytest.raises(ShapeError, match="divisible by 16"):
        make_cpu_linear(make_packed(40, 64, 32), "int4pack")
