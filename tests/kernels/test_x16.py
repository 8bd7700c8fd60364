"""bf16 activations handed over as ``X16`` (fp16 x / 16, kernels/x16.py), in the interpreter.

Each producer's X16 output must be, bit for bit, ``X16.of`` of its bf16 output, and each consumer
given ``X16.of(x)`` must return exactly what it returns for the bf16 ``x`` (the one-row GEMV makes
the same conversion inside): tolerance zero everywhere.
"""

from __future__ import annotations

import pytest
import torch

from awqconv.errors import ShapeError
from awqconv.kernels.decode_attention import decode_attention
from awqconv.kernels.gemv_fused import gate_up_silu, qkv_rope
from awqconv.kernels.config import KernelConfig
from awqconv.kernels.layout import KernelWeight
from awqconv.kernels.linear import Int4Linear
from awqconv.kernels.norm_act import add_rms_norm, rms_norm
from awqconv.kernels.ops import w4_matmul
from awqconv.kernels.x16 import X16
from awqconv.runtime.decode_chain import project
from awqconv.runtime.layer_ops import StepPaths

BF = torch.bfloat16


def _same(a: X16, b: X16) -> bool:
    return a.t.dtype == b.t.dtype == torch.float16 and torch.equal(a.t, b.t)


def test_x16_round_trip_and_range():
    """In range (2^-10 <= |x| < 2^20) bf16 -> X16 -> bf16 is exact; below, fp16 rounding (as the
    GEMV's own conversion); only bf16 converts."""
    x = (torch.randn(4096) * torch.logspace(-3, 5, 4096)).to(BF)
    x = x[(x.float().abs() >= 2 ** -10) & (x.float().abs() < 2 ** 20)]
    assert x.numel() > 3000 and torch.equal(X16.of(x).bf16(), x)
    tiny = torch.tensor([2 ** -20], dtype=BF)
    assert X16.of(tiny).t.item() == torch.tensor(2 ** -24, dtype=torch.float32).half().item()
    with pytest.raises(TypeError, match="bf16"):
        X16.of(torch.ones(3).half())


@pytest.mark.parametrize("n,k,g,bias", [(192, 256, 64, False), (64, 128, 128, True)])
def test_one_row_gemv_takes_x16(make_packed, n, k, g, bias):
    p = make_packed(n, k, g, dtype=BF, bias=bias, seed=n)
    kw = KernelWeight.from_packed(p)
    x = torch.randn(1, k).to(BF)
    y = w4_matmul(X16.of(x), kw)
    assert y.dtype == BF and torch.equal(y, w4_matmul(x, kw))
    lin = Int4Linear(kw, None, (n,), k)  # the decode chain hands an X16 row to the GEMV as it is
    assert torch.equal(project(lin, X16.of(x.view(1, 1, k)), StepPaths()), y.view(1, 1, n))
    with pytest.raises(ShapeError, match="one-row"):
        w4_matmul(X16.of(x), kw, KernelConfig("tile_t", block_m=16, block_n=64, kc=64))


def test_linear_without_kernel_weights_takes_x16_back_to_bf16(make_packed):
    """In the decode chain a linear on dense weights (no kernel layout) reads an X16 row as its
    bf16 values."""
    p = make_packed(48, 64, 32, dtype=BF, seed=3)
    lin = Int4Linear.from_packed([p], "cpu", BF, mode="dense")
    x = torch.randn(1, 1, 64).to(BF)
    assert torch.equal(project(lin, X16.of(x), StepPaths()), lin(x))


@pytest.mark.parametrize("rows", [1, 3])
def test_norms_write_x16(rows):
    torch.manual_seed(rows)
    x, r = torch.randn(rows, 320).to(BF), torch.randn(rows, 320).to(BF)
    w = torch.rand(320).to(BF) + 0.5
    assert _same(rms_norm(x, w, 1e-6, x16=True), X16.of(rms_norm(x, w, 1e-6)))
    s16, h16 = add_rms_norm(x, r, w, 1e-6, x16=True)
    s, h = add_rms_norm(x, r, w, 1e-6)
    assert torch.equal(s16, s) and s16.dtype == BF and _same(h16, X16.of(h))
    with pytest.raises(TypeError, match="bf16"):
        rms_norm(x.half(), w.half(), 1e-6, x16=True)


@pytest.mark.parametrize("S,n_split", [(40, 1), (200, 4)])
def test_decode_attention_writes_x16(S, n_split):
    """Both output stores: one slice per head, and the merge of several."""
    torch.manual_seed(S)
    q = torch.randn(1, 4, 1, 64).to(BF)
    k, v = torch.randn(1, 2, S, 64).to(BF), torch.randn(1, 2, S, 64).to(BF)
    bias = torch.zeros(1, 1, 1, S).to(BF)
    bias[..., :3] = float("-inf")
    got = decode_attention(q, k, v, bias, n_split, x16=True)
    assert _same(got, X16.of(decode_attention(q, k, v, bias, n_split)))


def test_fused_one_row_kernels_take_x16(make_packed):
    """QKV + RoPE + cache write: the same q and caches from an X16 row; gate/up + SiLU: X16 in,
    X16 of the same activations out."""
    H, HKV, D, K = 2, 1, 64, 128
    p = make_packed((H + 2 * HKV) * D, K, 64, dtype=BF, seed=7)
    kw = KernelWeight.from_packed(p)
    x = torch.randn(1, K).to(BF)
    kc, vc = torch.zeros(1, HKV, 8, D).to(BF), torch.zeros(1, HKV, 8, D).to(BF)
    kc2, vc2 = kc.clone(), vc.clone()
    cs, sn = torch.rand(D).to(BF), torch.rand(D).to(BF)
    q = qkv_rope(x, kw, cs, sn, kc, vc, torch.tensor([5]), H, HKV, D)
    q16 = qkv_rope(X16.of(x), kw, cs, sn, kc2, vc2, torch.tensor([5]), H, HKV, D)
    assert q16.dtype == BF and torch.equal(q16, q) and torch.equal(kc2, kc) and torch.equal(vc2, vc)
    kw2 = KernelWeight.from_packed(make_packed(2 * 96, K, 64, dtype=BF, seed=8))
    got = gate_up_silu(X16.of(x), kw2)
    assert isinstance(got, X16) and _same(got, X16.of(gate_up_silu(x, kw2)))
