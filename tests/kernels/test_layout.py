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
    # word w holds q[:, 8w + 2i] at bits 4i..4i+3 and q[:, 8w + 2i + 1] at bits 16+4i..16+4i+3
    for i in range(4):
        assert torch.equal((kw.qw >> (4 * i)) & 15, q[:, 2 * i::8].t())
        assert torch.equal((kw.qw >> (16 + 4 * i)) & 15, q[:, 2 * i + 1::8].t())
    # so one mask of the shifted word yields the pair (q[2i], q[2i+1]) in its two 16-bit halves
    pair = (kw.qw >> 4) & 0x000F000F
    assert torch.equal(pair & 0xFFFF, q[:, 2::8].t()) and torch.equal(pair >> 16, q[:, 3::8].t())
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
