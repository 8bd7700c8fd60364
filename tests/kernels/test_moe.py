"""The MoE decode kernels (kernels/moe.py) in the interpreter against plain PyTorch.

Routing: the expert ids equal torch's softmax + topk, the weights (renormalised or not) within
1e-6. Experts: the grouped INT4 GEMVs (every (token, expert) pair in one launch per projection)
against a float64 reference over the same dequantised weights that rounds where the kernels do
(each linear's output and act(gate) to the activations' dtype); relative error within 4 units of
the dtype's rounding (kernel_checks.TOL), over several shapes, expert counts, top-k, group sizes,
token counts and split counts, and the dense float-baseline stacks through the same launches.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from awqconv.kernels import moe
from awqconv.kernels.experts import ExpertLinear
from awqconv.kernels.moe import moe_experts, moe_route
from tests.kernels.kernel_checks import TOL

ACTS = {"silu": F.silu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


@pytest.mark.parametrize("T,E,top_k,renorm", [(1, 4, 2, True), (3, 8, 2, False), (2, 60, 4, True), (1, 5, 1, False)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_route_matches_torch(T, E, top_k, renorm, dtype):
    logits = (torch.randn(T, E) * 3).to(dtype)
    ids, w = moe_route(logits, top_k, renorm)
    probs = logits.float().softmax(-1)
    want_w, want_ids = torch.topk(probs, top_k, dim=-1)
    if renorm:
        want_w = want_w / want_w.sum(-1, keepdim=True)
    assert ids.dtype == torch.int32 and torch.equal(ids.long(), want_ids)
    assert (w - want_w).abs().max().item() < 1e-6


def _experts(make_packed, E, H, inter, g, dtype, mode, build_dtype=None):
    gu = [[make_packed(inter, H, g, dtype=dtype, seed=10 * e + 1),
           make_packed(inter, H, g, dtype=dtype, seed=10 * e + 2)] for e in range(E)]
    dn = [[make_packed(H, inter, g, dtype=dtype, seed=10 * e + 3)] for e in range(E)]
    mk = lambda parts: ExpertLinear.from_packed(parts, dtype=build_dtype or dtype, mode=mode)
    return gu, dn, mk(gu), mk(dn)


def _reference(h, ids, w, gu, dn, act, dtype):
    """float64 per pair, rounded to ``dtype`` where the kernels round; weighted sum in fp32."""
    T, top_k = ids.shape
    y = torch.zeros(T, h.shape[1], dtype=torch.float64)
    for t in range(T):
        for k in range(top_k):
            e = int(ids[t, k])
            x = h[t].double()
            g = (x @ gu[e][0].dequantize(torch.float64).t()).to(dtype).double()
            u = (x @ gu[e][1].dequantize(torch.float64).t()).to(dtype).double()
            a = (ACTS[act](g.float()).to(dtype).double() * u).to(dtype).double()
            d = (a @ dn[e][0].dequantize(torch.float64).t()).to(dtype).double()
            y[t] += d * float(w[t, k])
    return y


@pytest.mark.parametrize("E,H,inter,g,top_k,T,act", [(4, 64, 32, 32, 2, 1, "silu"), (8, 128, 96, 32, 2, 3, "silu"),
                                                     (6, 64, 64, 32, 3, 2, "gelu_pytorch_tanh"),
                                                     (4, 192, 64, 64, 1, 1, "silu")])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_grouped_int4_experts_match_reference(make_packed, E, H, inter, g, top_k, T, act, dtype):
    gu, dn, gate_up, down = _experts(make_packed, E, H, inter, g, dtype, "triton")
    assert gate_up.kw is not None and gate_up.kw.qw.shape == (E, H // 8, 2 * inter)
    h = torch.randn(T, H).to(dtype)
    ids, w = moe_route(torch.randn(T, E).to(dtype), top_k, True)
    y = moe_experts(h, ids, w, gate_up, down, act)
    assert y.shape == (T, H) and y.dtype == dtype
    ref = _reference(h, ids, w, gu, dn, act, dtype)
    err = ((y.double() - ref).norm() / ref.norm()).item()
    assert err < TOL[dtype], err


@pytest.mark.parametrize("splits", [1, 2, 5])
def test_grouped_gemv_split_counts(make_packed, monkeypatch, splits):
    """Whatever the split count (the one-wave rule picks it from the device), the parked partials
    sum to the same output."""
    dtype = torch.float16
    gu, dn, gate_up, down = _experts(make_packed, 4, 320, 64, 32, dtype, "triton")
    monkeypatch.setattr(moe, "one_wave_split", lambda *a: splits)
    h = torch.randn(2, 320).to(dtype)
    ids, w = moe_route(torch.randn(2, 4).to(dtype), 2, False)
    ref = _reference(h, ids, w, gu, dn, "silu", dtype)
    y = moe_experts(h, ids, w, gate_up, down)
    assert ((y.double() - ref).norm() / ref.norm()).item() < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_grouped_dense_experts_match_reference(make_packed, dtype):
    """The float baseline's dense stacks [E, N, K] through the same four launches."""
    gu, dn, gate_up, down = _experts(make_packed, 5, 64, 96, 32, torch.float16, "dense", dtype)
    assert gate_up.kw is None and gate_up.dense.shape == (5, 192, 64)
    h = torch.randn(3, 64).to(dtype)
    ids, w = moe_route(torch.randn(3, 5), 2, True)
    y = moe_experts(h, ids, w, gate_up, down)
    ref = _reference(h, ids, w, gu, dn, "silu", dtype)
    assert ((y.double() - ref).norm() / ref.norm()).item() < (TOL[dtype] if dtype in TOL else 1e-5)


def test_mismatched_experts_are_refused(make_packed):
    _, _, gate_up, _ = _experts(make_packed, 2, 64, 32, 32, torch.float16, "triton")
    with pytest.raises(ValueError, match="do not chain"):
        moe_experts(torch.randn(1, 64).half(), torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, 1), gate_up,
                    gate_up)
