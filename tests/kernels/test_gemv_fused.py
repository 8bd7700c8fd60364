"""The one-row GEMVs with fused epilogues (kernels/gemv_fused.py), in the interpreter, against the
two-kernel paths they replace: QKV + RoPE/cache write against ``w4_matmul`` then ``rope_kv_write``,
gate/up + SiLU-mul against ``w4_matmul`` then ``norm_act.silu_mul``. The same split-K sums in the
same order and the same fp32 epilogue math rounded the same way, so outputs (and caches) must come
out bit-equal, whatever the split count, with and without a bias, grouped KV heads, head dims 48,
64 and 128. The o / down merge with the residual add and the RMSNorm left pending: against
``w4_matmul`` then ``norm_act.add_rms_norm`` (the sum and the normed row bit-equal), and the pending
scale in the RoPE and SiLU merges, exact where it is a power of two."""

from __future__ import annotations

import pytest
import torch

from awqconv.kernels import gemv_fused
from awqconv.kernels.gemv_fused import (
    fits,
    gate_up_silu,
    qkv_rope,
    residual_pending_norm,
)
from awqconv.kernels.layout import KernelWeight
from awqconv.kernels.norm_act import add_rms_norm, silu_mul
from awqconv.kernels.ops import w4_matmul
from awqconv.kernels.pending_norm import PendingNorm
from awqconv.kernels.rope_kv import rope_kv_write
from awqconv.kernels.workspace import WORKSPACE
from awqconv.kernels.x16 import X16


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


@pytest.mark.parametrize("dt,x16", [(torch.float16, False), (torch.bfloat16, False), (torch.bfloat16, True)])
@pytest.mark.parametrize("N,K,g,bias", [(320, 128, 64, False), (128, 256, 128, True), (512, 192, 64, True)])
def test_residual_pending_norm_matches_gemv_then_add_rms_norm(make_packed, N, K, g, bias, dt, x16):
    """s bit-equal to add_rms_norm's sum, w * s rounded once, the block sums of s^2 (fp32, 1e-6),
    and ``normed()`` bit-equal to add_rms_norm's normalised row (an X16 for an X16 step)."""
    p = make_packed(N, K, g, dtype=dt, bias=bias, seed=N + K)
    kw = KernelWeight.from_packed(p)
    gen = torch.Generator().manual_seed(N)
    a = torch.randn(1, K, generator=gen).to(dt)
    a = X16.of(a) if x16 else a
    res = torch.randn(1, N, generator=gen).to(dt)
    w = (torch.rand(N, generator=gen) + 0.5).to(dt)
    s_ref, h_ref = add_rms_norm(res, w4_matmul(a, kw), w, 1e-5, x16=x16)
    s, pend = residual_pending_norm(a, kw, res, w, 1e-5, x16=x16)
    assert torch.equal(s, s_ref) and pend.s is s and pend.x16 == x16
    ws = (w.float() * s.float()).to(dt)
    assert torch.equal(pend.xw.t, X16.of(ws).t) if x16 else torch.equal(pend.xw, ws)
    assert pend.sumsq.shape == (-(-N // gemv_fused.RESIDUAL_BLOCK),)
    assert torch.allclose(pend.sumsq.sum(), s.float().pow(2).sum(), rtol=1e-6)
    h = pend.normed()
    assert torch.equal(h.t, h_ref.t) if x16 else torch.equal(h, h_ref)
    with pytest.raises(ValueError, match="residual"):
        residual_pending_norm(a, kw, res[:, 1:], w, 1e-5, x16=x16)


@pytest.mark.parametrize("dt,x16", [(torch.float16, False), (torch.bfloat16, True)])
def test_pending_norm_scale_reaches_the_rope_and_silu_merges(make_packed, dt, x16):
    """A PendingNorm whose block sums give r = 1 or r = 2 exactly (eps 0): QKV + RoPE and gate/up +
    SiLU give the bits of the plain kernels fed ``xw`` or ``2 * xw`` (doubling is exact in the GEMV's
    sums), so the scale is applied to the sums, once, before the bias."""
    H, HKV, D, K, inter = 2, 1, 64, 128, 96
    gen = torch.Generator().manual_seed(3)
    xw = torch.randn(1, K, generator=gen).to(dt)

    def pending(r):  # sums of s^2 in three blocks, mean 1 / r^2 over K columns
        ss = torch.full((3,), K / (3 * r * r), dtype=torch.float32)
        return PendingNorm(X16.of(xw) if x16 else xw, ss, xw, torch.ones(K, dtype=dt), 0.0)

    def plain(r):
        x = xw * r
        return X16.of(x) if x16 else x

    qkv = KernelWeight.from_packed(make_packed((H + 2 * HKV) * D, K, 64, dtype=dt, bias=True, seed=5))
    glu = KernelWeight.from_packed(make_packed(2 * inter, K, 64, dtype=dt, bias=True, seed=6))
    ang = torch.rand(D // 2, generator=gen) * 6
    cos, sin = torch.cat([ang.cos()] * 2).to(dt), torch.cat([ang.sin()] * 2).to(dt)
    for r in (1, 2):
        outs = []
        for x in (pending(r), plain(r)):
            kc, vc = torch.zeros(1, HKV, 8, D, dtype=dt), torch.zeros(1, HKV, 8, D, dtype=dt)
            q = qkv_rope(x, qkv, cos, sin, kc, vc, torch.tensor([3]), H, HKV, D)
            act = gate_up_silu(x, glu)
            outs.append((q, kc, vc, act.t if x16 else act))
        for got, want in zip(*outs):
            assert torch.equal(got, want)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on the overflowing case
def test_pending_norm_headroom_keeps_large_fp16_rows_finite(make_packed):
    """fp16, a norm weight up to 40 and a residual of ~3000: w * s (~1.2e5) overflows fp16 when
    stored as it is (headroom 1: the SiLU output is not finite), and with headroom 1 / 64 (what the
    runtime's RMSNorm picks) gate/up + SiLU matches the norm-kernel path (relative max error < 5e-3)."""
    K, inter = 128, 96
    glu = KernelWeight.from_packed(make_packed(2 * inter, K, 64, dtype=torch.float16, seed=7))
    o = KernelWeight.from_packed(make_packed(K, 64, 64, dtype=torch.float16, seed=8))
    gen = torch.Generator().manual_seed(4)
    a = torch.randn(1, 64, generator=gen).half()
    res = (torch.randn(1, K, generator=gen) * 3000).half()
    w = (torch.rand(K, generator=gen) * 40).half()
    _, h = add_rms_norm(res, w4_matmul(a, o), w, 1e-5)
    want = gate_up_silu(h, glu).float()
    got = {}
    for headroom in (1.0, 1 / 64):
        _, pend = residual_pending_norm(a, o, res, w, 1e-5, headroom=headroom)
        got[headroom] = gate_up_silu(pend, glu).float()
    assert not torch.isfinite(got[1.0]).all()
    assert ((got[1 / 64] - want).abs().max() / want.abs().max()).item() < 5e-3
    with pytest.raises(ValueError, match="power of two"):
        residual_pending_norm(a, o, res, w, 1e-5, headroom=0.3)
