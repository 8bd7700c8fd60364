"""The transposed tensor-core tile (tile_t.py) in the interpreter: its plain-Triton emulation of the
asm dequantisation, the join into the MMA operand, split-K and row tiles.

Tolerance: TOL of test_triton_kernels (fp32 accumulation, one rounding on store: 4x the output's
unit roundoff), except the one-hot test, which is exact: a row of x selecting one k returns that
row of W, and W is the dequantised weight rounded once to the activation dtype.
"""

from __future__ import annotations

import pytest
import torch

from awqconv.errors import ShapeError
from awqconv.kernels.config import KernelConfig
from awqconv.kernels.layout import KernelWeight
from awqconv.kernels.ops import w4_matmul
from tests.kernels.kernel_checks import _check, _reference, _workspace_clean

# (m, n, k, g, kc, block_n, split, ring stages): N not a multiple of the block, K = one group,
# per-channel with a non-power-of-two group (576 = 9 x 64), two row tiles (m = 20), split-K 2-3,
# the default's 3-stage ring
CASES = [(1, 72, 256, 64, 64, 32, 1, 4), (5, 40, 64, 64, 64, 64, 1, 1), (16, 136, 256, 128, 32, 64, 3, 3),
         (9, 24, 576, 576, 64, 16, 2, 2), (20, 48, 128, 32, 16, 32, 0, 4), (3, 64, 384, 128, 128, 32, 2, 3)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,n,k,g,kc,bn,split,prefetch", CASES)
def test_tile_t_matches_reference(make_packed, dtype, m, n, k, g, kc, bn, split, prefetch):
    """TOL[dtype] against a float64 (q - z) s reference, bias added; tickets re-armed."""
    p = make_packed(n, k, g, dtype=dtype, bias=m % 2 == 1, seed=n + k + m)
    x = torch.randn(m, k).to(dtype)
    cfg = KernelConfig("tile_t", block_m=16, block_n=bn, kc=kc, split_k=split, prefetch=prefetch)
    _check(w4_matmul(x, KernelWeight.from_packed(p), cfg), _reference(x, p), dtype)
    assert _workspace_clean()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_tile_t_operand_is_the_dequantised_weight(make_packed, dtype):
    """Exact: one-hot rows of x pick single k, and the output equals those rows of W bit for bit, so
    the operand is (q - z) * s rounded once, at the right k, for every nibble position and group."""
    n, k, g = 40, 256, 64
    p = make_packed(n, k, g, dtype=dtype, seed=3)
    ks = torch.tensor([0, 1, 2, 7, 8, 15, 63, 64, 65, 100, 127, 128, 190, 200, 254, 255])
    x = torch.zeros(len(ks), k, dtype=dtype)
    x[torch.arange(len(ks)), ks] = 1
    cfg = KernelConfig("tile_t", block_m=16, block_n=32, kc=32, split_k=2)
    y = w4_matmul(x, KernelWeight.from_packed(p), cfg)
    assert torch.equal(y, p.dequantize(dtype).t()[ks])


def test_tile_t_refuses_a_narrow_row_block(make_packed):
    kw = KernelWeight.from_packed(make_packed(16, 64, 32, seed=1))
    with pytest.raises(ShapeError, match="block_m >= 16"):
        w4_matmul(torch.randn(2, 64).half(), kw, KernelConfig("tile_t", block_m=8, block_n=16, kc=32))
