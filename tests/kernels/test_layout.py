"""The kernel layout is a lossless, invertible re-layout of canonical PackedLinear integers."""

from __future__ import annotations

import pytest
import torch

from awqconv.errors import ShapeError
from awqconv.kernels.layout import KernelWeight, supports
from awqconv.packed import PackedLinear


@pytest.mark.parametrize("out,n_in,g,bias", [(24, 64, 32, False), (40, 96, 96, True), (8, 256, 128, True)])
def test_roundtrip_is_bit_exact(make_packed, out, n_in, g, bias):
    p = make_packed(out, n_in, g, bias=bias, seed=out)
    kw = KernelWeight.from_packed(p)
    assert kw.qw.dtype == torch.int32 and tuple(kw.qw.shape) == (n_in // 8, out)
    (back,) = kw.to_packed()
    assert back.equal(p)


def test_nibble_order_matches_canonical(make_packed):
    p = make_packed(16, 64, 32, seed=3)
    kw = KernelWeight.from_packed(p)
    q = p.unpack().to(torch.int32)  # [N, K]
    for j in range(8):  # word w, nibble j holds q[:, 8w + j]
        assert torch.equal((kw.qw >> (4 * j)) & 15, q[:, j::8].t())
    # the torch reference dequantisation of the layout equals the canonical one exactly
    assert torch.equal(kw.dequantize_ref(), p.dequantize().t())


def test_fuse_concatenates_and_splits_back(make_packed):
    parts = [make_packed(n, 64, 32, bias=b, seed=n) for n, b in ((32, True), (16, False), (16, True))]
    kw = KernelWeight.fuse(parts)
    assert kw.splits == (32, 16, 16) and kw.out_features == 64
    assert torch.equal(kw.bias[32:48], torch.zeros(16, dtype=kw.bias.dtype))
    for a, b in zip(kw.to_packed(), parts):
        if b.bias is None:  # fused zero bias comes back as a zero vector, integers bit-exact
            assert torch.equal(a.qweight, b.qweight) and torch.equal(a.scales, b.scales)
        else:
            assert a.equal(b)


def test_unsupported_shapes_are_named(make_packed):
    q = torch.zeros(4, 12, dtype=torch.uint8)
    p = PackedLinear.from_ints(q, torch.zeros(4, 1, dtype=torch.uint8), torch.ones(4, 1).half(), 12)
    assert "multiple of 8" in supports(p)
    with pytest.raises(ShapeError, match="multiple of 8"):
        KernelWeight.from_packed(p)
    with pytest.raises(ShapeError, match="share"):
        KernelWeight.fuse([make_packed(8, 64, 32), make_packed(8, 64, 64)])
