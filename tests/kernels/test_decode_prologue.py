"""The one-kernel decode-step prologue (interpreter) against the torch construction it replaces:
exact equality (the mask is 0 / -inf, the rows are copies), over batch rows with padding, stale
valid flags after the step's slot (masked), a sliding window, masks and embedding rows longer than
one program's share, and the slot marked valid in place."""

from __future__ import annotations

import pytest
import torch

from awqconv.kernels.decode_prologue import (
    BLOCK_ROW,
    BLOCK_S,
    decode_prologue,
    stage_step_inputs,
)


def _torch_prologue(tokens, positions, slot, embed, table, key_valid, kv_len, window):
    kv = key_valid.clone()
    kv[:, slot] = True
    s_idx = torch.arange(kv_len)
    mask = kv[:, None, None, :kv_len] & (s_idx <= slot)
    if window:
        mask = mask & (slot - s_idx < window)
    bias = torch.zeros(mask.shape, dtype=embed.dtype).masked_fill_(~mask, float("-inf"))
    cos, sin = (t[positions][:, None] for t in table)
    return embed[tokens], cos, sin, bias, kv


@pytest.mark.parametrize("B,kv_len,slot,window,hidden", [(1, 40, 17, None, 96), (3, 300, 299, None, 2 * BLOCK_ROW + 40),
                                                         (2, 2 * BLOCK_S + 77, 2 * BLOCK_S + 1, None, 96),
                                                         (2, 256, 130, 64, 96)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_prologue_matches_torch(B, kv_len, slot, window, hidden, dtype):
    """Cases: one program; an embedding row over three programs; a mask over three; a window."""
    g = torch.Generator().manual_seed(kv_len + slot)
    V, hd, max_len = 50, 32, kv_len + 5
    embed = torch.randn(V, hidden, generator=g).to(dtype)
    table = (torch.randn(max_len, hd, generator=g).to(dtype), torch.randn(max_len, hd, generator=g).to(dtype))
    key_valid = torch.rand(B, max_len, generator=g) < 0.8  # padding, and stale flags after the slot
    tokens = torch.randint(0, V, (B, 1), generator=g)
    positions = torch.randint(0, max_len, (B, 1), generator=g)
    want = _torch_prologue(tokens, positions, slot, embed, table, key_valid, kv_len, window)
    kv = key_valid.clone()
    got = decode_prologue(tokens, positions, torch.tensor(slot), embed, table, kv, kv_len, window)
    for w, o in zip(want[:4], got):
        assert w.shape == o.shape and w.dtype == o.dtype
        assert torch.equal(w, o)
    assert torch.equal(kv, want[4])  # the step's slot marked valid, nothing else changed


def test_decode_prologue_refuses_several_tokens():
    t = torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="one token per row"):
        decode_prologue(t, t, torch.tensor(0), torch.zeros(4, 8), (torch.zeros(4, 2), torch.zeros(4, 2)),
                        torch.zeros(1, 4, dtype=torch.bool), 4)


@pytest.mark.parametrize("B,history", [(1, True), (3, True), (5, False)])
def test_stage_step_inputs(B, history):
    """The one staging launch writes what the five torch ops did: the graph's token, position and
    slot buffers, the output column (a strided view), and returns the next positions."""
    g = torch.Generator().manual_seed(B)
    tok = torch.randint(0, 1000, (B,), generator=g)
    pos = torch.randint(0, 100, (B, 1), generator=g)
    t_buf, p_buf, s_buf = torch.zeros(B, 1, dtype=torch.long), torch.zeros(B, 1, dtype=torch.long), torch.zeros(
        (), dtype=torch.long)
    out = torch.full((B, 7), -1, dtype=torch.long)
    nxt = stage_step_inputs(tok, pos, 3_000_000_000, t_buf, p_buf, s_buf, out[:, 4] if history else None)
    assert torch.equal(t_buf.view(B), tok) and torch.equal(p_buf, pos) and s_buf.item() == 3_000_000_000
    assert torch.equal(nxt, pos.view(B) + 1)
    want = torch.full((B, 7), -1, dtype=torch.long)
    if history:
        want[:, 4] = tok
    assert torch.equal(out, want)
