"""The cross-kernel L2 prefetch (l2_prefetch.py): its byte budget, the split of the range over a
grid (run in the interpreter; the prefetch instruction itself is GPU-only and changes no result),
and that it stays off where it cannot run."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from awqconv.kernels.l2_prefetch import budget, prefetch_args, share_of
from awqconv.kernels.layout import KernelWeight


@triton.jit
def _shares_kernel(out_ptr, pf_bytes):
    lo, size = share_of(pf_bytes)
    pid = (tl.program_id(2) * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(0) + tl.program_id(0)
    tl.store(out_ptr + 2 * pid, lo)
    tl.store(out_ptr + 2 * pid + 1, size)


@pytest.mark.parametrize("grid,nbytes", [((7, 1, 3), 4096), ((192, 1, 11), 12_582_912), ((5, 2, 1), 16),
                                          ((3, 1, 1), 48_000)])
def test_shares_tile_the_range_in_aligned_pieces(grid, nbytes):
    """Pieces start on 16-byte boundaries, do not overlap, and cover [0, nbytes) exactly."""
    n = grid[0] * grid[1] * grid[2]
    out = torch.zeros(2 * n, dtype=torch.int32)
    _shares_kernel[grid](out, nbytes)
    lo, size = out[0::2].tolist(), out[1::2].tolist()
    live = [(a, s) for a, s in zip(lo, size) if s > 0]
    assert all(a % 16 == 0 for a, _ in live)
    assert live[0][0] == 0 and all(a + s == b for (a, s), (b, _) in zip(live, live[1:]))
    assert live[-1][0] + live[-1][1] == nbytes


def test_budget():
    assert budget(1000, 10_000, 0.5) == 496  # half our own bytes, a multiple of 16
    assert budget(10_000, 1000, 2.0) == 992  # never more than the next weight
    assert budget(10_000, 1000, 0.0) == 0


def test_off_on_the_cpu(make_packed):
    """No GPU (or the interpreter): the kernels get HAS_PF False and a harmless pointer."""
    kw = KernelWeight.from_packed(make_packed(32, 64, 32, seed=1))
    args = prefetch_args(kw, kw, torch.device("cpu"))
    assert args["HAS_PF"] is False and args["pf_bytes"] == 0
