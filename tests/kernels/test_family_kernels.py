"""What the decode kernels gained for the model families beyond Llama (interpreter, against plain
PyTorch or the two-kernel path they fuse):

- decode attention with a score scale other than 1/sqrt(D) and tanh soft-capping (Gemma 2): against
  transformers' eager math in fp32 on the same inputs (2e-3 relative, the fp16 output rounding);
- RoPE + cache write with per-head q/k RMSNorm (Qwen3, Gemma 3) and with partial rotary dims
  (Phi-4-mini): against the runtime's torch path (2e-3 relative, one rounding against several);
- the fused QKV GEMV + q/k norm + RoPE merge: bit-equal to the GEMV then the RoPE kernel;
- gate/up with GeLU-tanh or exact GeLU in the merge and in the elementwise kernel: bit-equal to the
  GEMV then the elementwise kernel, and within an output rounding of torch's GeLU;
- the decode prologue's embedding scaling (Gemma): bit-equal to torch's product in the dtype.
"""

from __future__ import annotations

import pytest
import torch

from awqconv.kernels.decode_attention import decode_attention
from awqconv.kernels.decode_prologue import decode_prologue
from awqconv.kernels.gemv_fused import gate_up_silu, qkv_rope
from awqconv.kernels.layout import KernelWeight
from awqconv.kernels.norm_act import silu_mul
from awqconv.kernels.ops import w4_matmul
from awqconv.kernels.rope_kv import rope_kv_write
from awqconv.runtime.layer_ops import _attention_math, act_mul, rms_norm, rotate


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("B,H,HKV,D,S,n_split", [(1, 4, 2, 32, 40, 1), (2, 4, 4, 64, 200, 3), (1, 6, 2, 24, 130, None)])
@pytest.mark.parametrize("scale,cap", [(0.2, None), (None, 2.0), (0.15, 5.0)])
def test_decode_attention_scale_and_softcap(B, H, HKV, D, S, n_split, scale, cap):
    k = (torch.randn(B, HKV, S, D) * 2).half()
    v = torch.randn(B, HKV, S, D).half()
    q = (torch.randn(B, H, 1, D) * 2).half()
    bias = torch.zeros(B, 1, 1, S).half()
    bias[0, ..., :3] = float("-inf")
    out = decode_attention(q, k, v, bias, n_split=n_split, scale=scale, cap=cap)
    want = _attention_math(q.float(), k.float(), v.float(), bias.float(), D ** -0.5 if scale is None else scale, cap)
    assert _rel(out, want) < 2e-3


def _cos_sin(B, T, rot, dtype):
    ang = torch.randn(B, T, rot // 2).repeat(1, 1, 2) * 3
    return ang.cos().to(dtype)[:, None], ang.sin().to(dtype)[:, None]


@pytest.mark.parametrize("B,T,H,HKV,D,rot,norm", [(1, 1, 4, 2, 32, 32, True), (2, 3, 4, 4, 16, 16, True),
                                                 (1, 4, 6, 2, 32, 16, False), (2, 2, 4, 2, 48, 24, True)])
def test_rope_kv_write_qk_norm_and_partial_rotary(B, T, H, HKV, D, rot, norm):
    dtype = torch.float16
    qkv = (torch.randn(B, T, (H + 2 * HKV) * D) * 3).to(dtype)
    q, k, v = qkv.split([H * D, HKV * D, HKV * D], -1)
    cos, sin = _cos_sin(B, T, rot, dtype)
    qn, kn = (torch.rand(D) + 0.5).to(dtype), (torch.rand(D) + 0.5).to(dtype)
    S = 7
    kc, vc = torch.zeros(B, HKV, S, D, dtype=dtype), torch.zeros(B, HKV, S, D, dtype=dtype)
    slots = torch.arange(T) + 1
    out = rope_kv_write(q, k, v, cos, sin, kc, vc, slots, H, HKV, D, qk_norm=(qn, kn, 1e-6) if norm else None)
    qt, kt = q.view(B, T, H, D).float(), k.view(B, T, HKV, D).float()
    if norm:
        qt, kt = rms_norm(qt, qn.float(), 1e-6), rms_norm(kt, kn.float(), 1e-6)
    rq = rotate(qt.transpose(1, 2), cos.float(), sin.float())
    rk = rotate(kt.transpose(1, 2), cos.float(), sin.float())
    assert _rel(out, rq) < 2e-3 and _rel(kc[:, :, slots], rk) < 2e-3
    assert torch.equal(vc[:, :, slots], v.view(B, T, HKV, D).transpose(1, 2))
    if rot < D:  # the pass-through dims: the (normed) head's, unrotated
        assert _rel(out[..., rot:], qt.transpose(1, 2)[..., rot:]) < 1e-3


@pytest.mark.parametrize("dt", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("H,HKV,D,K,g,bias", [(2, 2, 64, 128, 64, False), (4, 2, 32, 64, 32, True)])
def test_qkv_rope_with_qk_norm_matches_gemv_then_rope_kv(make_packed, H, HKV, D, K, g, bias, dt):
    N = (H + 2 * HKV) * D
    kw = KernelWeight.from_packed(make_packed(N, K, g, dtype=dt, bias=bias, seed=N + K))
    x = torch.randn(1, K).to(dt)
    S = 12
    slot = torch.tensor([S - 4])
    kc, vc = torch.randn(1, HKV, S, D).to(dt), torch.randn(1, HKV, S, D).to(dt)
    kc2, vc2 = kc.clone(), vc.clone()
    cos, sin = _cos_sin(1, 1, D, dt)
    norm = ((torch.rand(D) + 0.5).to(dt), (torch.rand(D) + 0.5).to(dt), 1e-6)
    y = w4_matmul(x, kw)[:, None]
    q_ref = rope_kv_write(*y.split([H * D, HKV * D, HKV * D], -1), cos, sin, kc2, vc2, slot, H, HKV, D, qk_norm=norm)
    q = qkv_rope(x, kw, cos[0, 0, 0], sin[0, 0, 0], kc, vc, slot, H, HKV, D, qk_norm=norm)
    assert torch.equal(q, q_ref) and torch.equal(kc, kc2) and torch.equal(vc, vc2)


@pytest.mark.parametrize("act", ["gelu_pytorch_tanh", "gelu", "silu"])
@pytest.mark.parametrize("dt", [torch.float16, torch.bfloat16])
def test_gate_up_gelu_merge_matches_gemv_then_act_mul(make_packed, act, dt):
    inter, K = 96, 128
    kw = KernelWeight.from_packed(make_packed(2 * inter, K, 64, dtype=dt, seed=7))
    x = (torch.randn(1, K) * 4).to(dt)
    gate, up = w4_matmul(x, kw).split(inter, -1)
    want = silu_mul(gate, up, act=act)
    assert torch.equal(gate_up_silu(x, kw, act=act), want)
    assert _rel(want, act_mul(gate.float(), up.float(), act)) < (1e-3 if dt == torch.float16 else 8e-3)


@pytest.mark.parametrize("act", ["gelu_pytorch_tanh", "gelu"])
def test_act_mul_kernel_matches_torch_in_fp32(act):
    g = torch.linspace(-12, 12, 3001)[None]  # both tails: the tanh form must neither overflow nor cancel
    u = torch.randn(1, 3001)
    got, want = silu_mul(g, u, act=act), act_mul(g, u, act)
    assert (got - want).abs().max().item() < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_prologue_scales_embeddings_like_torch(dtype):
    B, hidden, kv_len, slot = 2, 96, 40, 17
    embed = torch.randn(50, hidden).to(dtype)
    table = (torch.randn(64, 16).to(dtype), torch.randn(64, 16).to(dtype))
    tokens, positions = torch.tensor([[3], [41]]), torch.tensor([[17], [12]])
    scale = torch.tensor(hidden ** 0.5, dtype=dtype)  # transformers rounds sqrt(hidden) to the dtype
    kv = torch.zeros(B, 64, dtype=torch.bool)
    x, *_ = decode_prologue(tokens, positions, torch.tensor(slot), embed, table, kv, kv_len, None, scale.item())
    assert torch.equal(x[:, 0], embed[tokens[:, 0]] * scale)
