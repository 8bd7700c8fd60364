"""The split greedy argmax (interpreter) against ``torch.argmax``, exactly: ties (the first index
wins, also across chunks), NaN (the first NaN wins), all -inf rows, fp16 / bf16 / fp32, vocabularies
smaller than a block, not a multiple of the chunk, and Llama-2's 32 000."""

from __future__ import annotations

import pytest
import torch

from awqconv.kernels.argmax import greedy_argmax
from awqconv.kernels.workspace import WORKSPACE


@pytest.mark.parametrize("V,block", [(7, 16), (1000, 64), (32000, 2048), (5003, 128)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_greedy_argmax_matches_torch(V, block, dtype):
    g = torch.Generator().manual_seed(V)
    x = torch.randn(6, V, generator=g).to(dtype)
    x[1, :] = 0.0  # all tied: index 0
    x[2, V // 3] = x[2, V - 1] = 100.0  # a tie across chunks: the earlier
    x[3, :] = float("-inf")
    x[4, V // 2] = float("nan")
    x[4, V - 1] = float("inf")
    x[5, V - 2] = float("nan")
    x[5, V // 4] = float("nan")
    got = greedy_argmax(x, block=block)
    assert got.dtype == torch.long
    assert torch.equal(got, x.argmax(-1))
    assert not WORKSPACE.cnt[torch.device("cpu")].any()  # tickets re-armed


def test_greedy_argmax_other_shapes():
    x = torch.randn(40, 3, 5, generator=torch.Generator().manual_seed(1)).half()
    for v in (x.transpose(0, 2), x[:, 0, :], x):  # strided rows, a 2-d view, three dims
        assert torch.equal(greedy_argmax(v, block=16), v.argmax(-1))
    with pytest.raises(ValueError, match="vocabulary"):
        greedy_argmax(torch.zeros(2, 0))
