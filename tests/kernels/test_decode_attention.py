"""Split-KV decode attention (interpreter) against torch SDPA in fp32 on the same fp16 inputs:
tolerance 2e-3 relative (fp16 output rounding; the kernel accumulates in fp32), over single and
several cache slices, grouped-query heads, head dims that are not powers of two, cache views whose
strides are those of the full static cache, masked (padding) slots, a slice that is all masked, and
the step's slot given (the slots after it, which the runtime's bias masks, are not read; here the
bias leaves them open, so reading them would show)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from awqconv.kernels.decode_attention import decode_attention
from awqconv.kernels.workspace import WORKSPACE


def _ref(q, k, v, bias):
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=bias.float(),
                                          enable_gqa=k.shape[1] != q.shape[1])


@pytest.mark.parametrize("B,H,HKV,D,S,n_split", [(1, 4, 4, 64, 40, 1), (2, 4, 2, 32, 200, 3), (1, 6, 2, 24, 130, None),
                                                 (2, 2, 1, 128, 256, 16)])
@pytest.mark.parametrize("early,slot_given", [(False, False), (True, True), (False, True)])
def test_decode_attention_matches_sdpa(B, H, HKV, D, S, n_split, early, slot_given):
    """``early``: the step's slot is passed, so the first K/V block is read before the PDL wait and
    the slot's row read again after it (the same values here: the interpreter runs no kernels
    concurrently, so this checks that the row patch keeps the result, not the overlap)."""
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
    slot = torch.tensor([S - 3]) if slot_given else None
    out = decode_attention(q, k, v, bias, n_split, slot=slot, early=early)
    if slot is not None:  # the two slots after the step's are the future: not attended
        bias[..., S - 2:] = float("-inf")
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



@pytest.mark.parametrize("early", [False, True])
def test_decode_attention_reads_nothing_past_the_slot(early):
    """Slices wholly after the step's slot load nothing: NaN there (unmasked by the bias) changes
    nothing, while one NaN at or before the slot poisons the output (so the test can fail)."""
    torch.manual_seed(7)
    S, slot = 256, 70
    k, v = torch.randn(1, 2, S, 32).half(), torch.randn(1, 2, S, 32).half()
    q, bias = torch.randn(1, 2, 1, 32).half(), torch.zeros(1, 1, 1, S).half()
    k[..., slot + 1:, :] = float("nan")
    v[..., slot + 1:, :] = float("nan")
    kw = {"n_split": 4, "slot": torch.tensor([slot]), "early": early}
    out = decode_attention(q, k, v, bias, **kw)
    ref = _ref(q[..., :], k[..., :slot + 1, :], v[..., :slot + 1, :], bias[..., :slot + 1])
    assert ((out.float() - ref).norm() / ref.norm()).item() < 2e-3
    v[..., slot, :] = float("nan")
    assert decode_attention(q, k, v, bias, **kw).isnan().all()
