"""The fused RoPE + KV-cache write kernel (interpreter) against the runtime's torch path: rotated q
within fp16 rounding of the torch rotation (tolerance 2e-3 relative: one rounding against the torch
path's several), v copied bit for bit, untouched cache slots left as they were."""

from __future__ import annotations

import pytest
import torch

from awqconv.kernels.rope_kv import rope_kv_write
from awqconv.runtime.layer_ops import rope_qk as _rope_qk


@pytest.mark.parametrize("B,T,H,HKV,D", [(1, 1, 4, 2, 16), (2, 3, 4, 4, 8), (1, 5, 6, 2, 24)])
def test_rope_kv_write_matches_torch_path(B, T, H, HKV, D):
    torch.manual_seed(B * 100 + T * 10 + D)
    qkv = torch.randn(B, T, (H + 2 * HKV) * D).half()
    q, k, v = qkv.split([H * D, HKV * D, HKV * D], -1)
    ang = torch.randn(B, T, D // 2).repeat(1, 1, 2)
    cos, sin = ang.cos().half()[:, None], ang.sin().half()[:, None]
    S = 9
    kc, vc = torch.randn(B, HKV, S, D).half(), torch.randn(B, HKV, S, D).half()
    kc0, vc0 = kc.clone(), vc.clone()
    slots = torch.arange(T) + 2

    out = rope_kv_write(q, k, v, cos, sin, kc, vc, slots, H, HKV, D)

    qt = q.view(B, T, H, D).transpose(1, 2).float()
    kt = k.view(B, T, HKV, D).transpose(1, 2).float()
    rq, rk = _rope_qk(qt, kt, cos.float(), sin.float())
    assert out.shape == (B, H, T, D) and out.is_contiguous()
    assert ((out.float() - rq).norm() / rq.norm()) < 2e-3
    assert ((kc[:, :, slots].float() - rk).norm() / rk.norm()) < 2e-3
    assert torch.equal(vc[:, :, slots], v.view(B, T, HKV, D).transpose(1, 2))
    others = torch.ones(S, dtype=torch.bool)
    others[slots] = False
    assert torch.equal(kc[:, :, others], kc0[:, :, others]) and torch.equal(vc[:, :, others], vc0[:, :, others])


def test_rope_kv_write_refuses_separate_tensors():
    q, k, v = torch.randn(1, 1, 8).half(), torch.randn(1, 1, 16).half(), torch.randn(1, 1, 8).half()
    c = torch.ones(1, 1, 1, 8).half()
    with pytest.raises(ValueError, match="column slices of one"):
        rope_kv_write(q, k, v, c, c, torch.zeros(1, 1, 4, 8).half(), torch.zeros(1, 1, 4, 8).half(),
                      torch.tensor([0]), 1, 1, 8)
