"""The one-row GEMVs with fused epilogues (kernels/gemv_fused.py), in the interpreter, against the
two-kernel paths they replace: QKV + RoPE/cache write against ``w4_matmul`` then ``rope_kv_write``,
gate/up + SiLU-mul against ``w4_matmul`` then ``norm_act.silu_mul``. The same split-K sums in the
same order and the same fp32 epilogue math rounded the same way, so outputs (and caches) must come
out bit-equal, whatever the split count, with and without a bias, grouped KV heads, head dims 48,
64 and 128."""

from __future__ import annotations

import pytest
import torch

from awqconv.kernels.gemv_fused import fits, gate_up_silu, qkv_rope
from awqconv.kernels.layout import KernelWeight
from awqconv.kernels.norm_act import silu_mul
from awqconv.kernels.ops import w4_matmul
from awqconv.kernels.rope_kv import rope_kv_write
from awqconv.kernels.workspace import WORKSPACE


@pytest.mark.parametrize("dt", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("H,HKV,D,K,g,bias", [(2, 2, 64, 128, 64, False), (4, 2, 64, 256, 128, True),
                                              (2, 1, 128, 192, 64, False), (3, 1, 48, 128, 64, True)])
def test_qkv_rope_matches_gemv_then_rope_kv(make_packed, H, HKV, D, K, g, bias, dt):
    torch.manual_seed(H + D + K)
    N = (H + 2 * HKV) * D
    p = make_packed(N, K, g, dtype=dt, bias=bias, seed=N + K)
    kw = KernelWeight.from_packed(p)
    x = torch.randn(1, K).to(dt)
    S = 24
    slot = torch.tensor([S - 5])
    kc, vc = torch.randn(1, HKV, S, D).to(dt), torch.randn(1, HKV, S, D).to(dt)
    kc2, vc2 = kc.clone(), vc.clone()
    ang = torch.rand(1, 1, 1, D // 2) * 6
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(dt), torch.cat([ang.sin()] * 2, -1).to(dt)

    y = w4_matmul(x, kw)[:, None]  # [1, T=1, N]
    q_ref = rope_kv_write(*y.split([H * D, HKV * D, HKV * D], -1), cos, sin, kc2, vc2, slot, H, HKV, D)
    assert fits(kw, x)
    q = qkv_rope(x, kw, cos[0, 0, 0], sin[0, 0, 0], kc, vc, slot, H, HKV, D)
    assert q.shape == (1, H, 1, D)
    assert torch.equal(q, q_ref)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)
    assert not WORKSPACE.cnt[torch.device("cpu")].any()  # tickets re-armed


def test_qkv_rope_refuses_mismatched_heads(make_packed):
    p = make_packed(4 * 64, 64, 64)
    kw = KernelWeight.from_packed(p)
    x = torch.randn(1, 64).half()
    cs = torch.ones(64).half()
    kc = torch.zeros(1, 1, 8, 64).half()
    with pytest.raises(ValueError, match="heads"):
        qkv_rope(x, kw, cs, cs, kc, kc, torch.tensor([0]), 3, 1, 64)  # 3 + 2 heads != 4


@pytest.mark.parametrize("dt", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("inter,K,g,bias", [(32, 64, 64, False), (96, 256, 128, True), (160, 192, 64, False)])
def test_gate_up_silu_matches_gemv_then_silu_mul(make_packed, inter, K, g, bias, dt):
    p = make_packed(2 * inter, K, g, dtype=dt, bias=bias, seed=inter + K)
    kw = KernelWeight.from_packed(p)
    x = torch.randn(1, K).to(dt)
    gate, up = w4_matmul(x, kw).split(inter, -1)
    want = silu_mul(gate, up)
    assert fits(kw, x)
    got = gate_up_silu(x, kw)
    assert got.shape == (1, inter) and torch.equal(got, want)
    odd = torch.cat([torch.zeros(1, 1).to(dt), x], 1)[:, 1:]  # a view 2 bytes off alignment
    assert torch.equal(gate_up_silu(odd, kw), want)
    assert not WORKSPACE.cnt[torch.device("cpu")].any()
    with pytest.raises(ValueError, match="halves"):
        gate_up_silu(x, KernelWeight.from_packed(make_packed(2 * inter + 1, K, g)))  # unequal halves
