"""Split-KV decode attention (interpreter) against torch SDPA in fp32 on the same fp16 inputs:
tolerance 2e-3 relative (fp16 output rounding; the kernel accumulates in fp32), over single and
several cache slices, grouped-query heads, head dims that are not powers of two, cache views whose
strides are those of the full static cache, masked (padding) slots, and a slice that is all masked."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from awqconv.kernels.decode_attention import decode_attention, rope_decode_attention
from awqconv.kernels.rope_kv import rope_kv_write
from awqconv.kernels.workspace import WORKSPACE


def _ref(q, k, v, bias):
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=bias.float(),
                                          enable_gqa=k.shape[1] != q.shape[1])


@pytest.mark.parametrize("B,H,HKV,D,S,n_split", [(1, 4, 4, 64, 40, 1), (2, 4, 2, 32, 200, 3), (1, 6, 2, 24, 130, None),
                                                 (2, 2, 1, 128, 256, 16)])
def test_decode_attention_matches_sdpa(B, H, HKV, D, S, n_split):
    torch.manual_seed(S + D)
    S_max = S + 17  # views of a bigger cache, as the runtime passes kc[:, :, :kv_len]
    kc = torch.randn(B, HKV, S_max, D).half()
    vc = torch.randn(B, HKV, S_max, D).half()
    k, v = kc[:, :, :S], vc[:, :, :S]
    q = torch.randn(B, H, 1, D).half()
    bias = torch.zeros(B, 1, 1, S).half()
    bias[0, ..., :5] = float("-inf")  # left padding of row 0
    if S > 128:
        bias[-1, ..., 64:128] = float("-inf")  # a whole 64-slot block masked
    out = decode_attention(q, k, v, bias, n_split)
    ref = _ref(q, k, v, bias)
    assert out.shape == q.shape and out.dtype == torch.float16
    err = ((out.float() - ref).norm() / ref.norm()).item()
    assert err < 2e-3, err
    cnt = WORKSPACE.cnt.get(torch.device("cpu"))
    assert cnt is None or not cnt.any()  # tickets re-armed


def test_decode_attention_refuses_several_tokens():
    q = torch.randn(1, 2, 3, 16).half()
    k = torch.randn(1, 2, 8, 16).half()
    with pytest.raises(ValueError, match="one query token"):
        decode_attention(q, k, k, torch.zeros(1, 1, 3, 8).half())


@pytest.mark.parametrize("B,H,HKV,D,S,slot,n_split,early", [(1, 4, 4, 64, 40, 39, 1, False), (2, 4, 2, 32, 200, 77, 3, True),
                                                          (1, 6, 2, 24, 130, 129, None, True),
                                                          (2, 2, 1, 128, 256, 5, 16, False)])
def test_rope_decode_attention_matches_rope_kv_then_attention(B, H, HKV, D, S, slot, n_split, early):
    """The fused kernel (RoPE + cache write + attention) against rope_kv_write followed by
    decode_attention on a copy of the cache: the same output within 2e-3 (as above; the new row's
    score and value are summed in a different order), and the cache bit-equal afterwards (the
    new row written once per KV head, nothing else touched), slots in the first, a middle and the
    last slice, grouped heads, early and late first-block reads."""
    torch.manual_seed(S + slot)
    S_max = S + 9
    kc = torch.randn(B, HKV, S_max, D).half()
    vc = torch.randn(B, HKV, S_max, D).half()
    qkv = torch.randn(B, 1, (H + 2 * HKV) * D).half()
    q, k, v = qkv.split([H * D, HKV * D, HKV * D], -1)
    ang = torch.rand(B, 1, 1, D // 2) * 6
    cos, sin = torch.cat([ang.cos()] * 2, -1).half(), torch.cat([ang.sin()] * 2, -1).half()
    bias = torch.zeros(B, 1, 1, S).half()
    bias[0, ..., :3] = float("-inf")
    slots = torch.tensor([slot])
    kc2, vc2 = kc.clone(), vc.clone()
    q_rot = rope_kv_write(q, k, v, cos, sin, kc2, vc2, slots, H, HKV, D)
    ref = decode_attention(q_rot, kc2[:, :, :S], vc2[:, :, :S], bias, n_split)
    out = rope_decode_attention(q, k, v, cos, sin, kc[:, :, :S], vc[:, :, :S], slots, bias, H, n_split, early)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    assert out.shape == (B, H, 1, D) and err < 2e-3, err
