"""GGUF block math without llama.cpp: grids vs gguf.quants, Q/K permutation, the Q4_1 transplant."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants

from awqconv import archs
from awqconv.errors import FormatConstraintError, InputError, ShapeError, UnsupportedArchitecture
from awqconv.formats.gguf_tensors import (
    fitting_type,
    from_q4_1,
    gguf_name,
    hf_key,
    permute_rows,
    rope_heads,
    to_q4_1,
    unpermute_rows,
)
from awqconv.packed import PackedLinear
from awqconv.quant.gguf_grid import GGUFGrid
from awqconv.quant.grid import IntGrid


def _weights(seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(48, 512, generator=gen) * torch.rand(48, 1, generator=gen) * 0.1
    w[0, :32] = 0.0  # an all-zero block (d = 0)
    w[1, :32] = 0.25  # a constant block (max == min)
    w[2, 7] = -w[2].abs().max() * 3  # a dominant negative outlier
    w[3, 40], w[3, 41] = 0.5, -0.5  # |max| tie inside one block: the first one wins
    return w


@pytest.mark.parametrize("name,qtype", [("q4_0", T.Q4_0), ("q4_1", T.Q4_1), ("q5_0", T.Q5_0),
                                        ("q5_1", T.Q5_1), ("q8_0", T.Q8_0)])
def test_grid_is_bit_exact_with_gguf_quants(name, qtype):
    w = _weights()
    ref = quants.dequantize(quants.quantize(w.numpy(), qtype), qtype)
    got = GGUFGrid(name).fake_quantize(w).numpy()
    assert got.dtype == np.float32 and np.array_equal(got, ref)


def test_kquant_grids_are_plausible_approximations():
    w = _weights(1)
    err = {n: float((GGUFGrid(n).fake_quantize(w) - w).pow(2).mean()) for n in
           ("q4_0", "q4_1", "q5_0", "q8_0", "q4_k", "q6_k")}
    assert err["q4_k"] < 1.5 * err["q4_1"]
    assert err["q8_0"] < err["q6_k"] < err["q5_0"] < err["q4_1"]
    assert GGUFGrid("q4_k").block_size == 32 and GGUFGrid("q6_k").block_size == 16
    with pytest.raises(ShapeError, match="256"):
        GGUFGrid("q4_k").fake_quantize(torch.zeros(4, 576))
    with pytest.raises(InputError):
        GGUFGrid("q3_x")


def test_permutation_interleaves_rotary_halves():
    n_head, d = 3, 8
    rows = torch.arange(n_head * d)
    got = permute_rows(rows, n_head).tolist()
    want = []
    for h in range(n_head):  # llama.cpp pairs (i, i + d/2) of each head next to each other
        for i in range(d // 2):
            want += [h * d + i, h * d + d // 2 + i]
    assert got == want
    x = torch.randn(n_head * d, 5)
    assert torch.equal(unpermute_rows(permute_rows(x, n_head), n_head), x)
    with pytest.raises(ShapeError):
        permute_rows(torch.zeros(10, 2), 3)


def test_names_round_trip():
    for key, name in [("model.layers.11.self_attn.q_proj.weight", "blk.11.attn_q.weight"),
                      ("model.layers.0.self_attn.k_proj.bias", "blk.0.attn_k.bias"),
                      ("model.layers.2.mlp.down_proj.weight", "blk.2.ffn_down.weight"),
                      ("model.layers.2.post_attention_layernorm.weight", "blk.2.ffn_norm.weight"),
                      ("model.embed_tokens.weight", "token_embd.weight"),
                      ("lm_head.weight", "output.weight"), ("model.norm.weight", "output_norm.weight")]:
        assert gguf_name(key) == name and hf_key(name) == key
    assert gguf_name("model.layers.0.mlp.experts.0.w1.weight") is None
    assert gguf_name("model.layers.x.mlp.up_proj.weight") is None and gguf_name("model.norm.scale") is None


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"])
def test_names_come_from_the_registry_row(arch):
    key = "model.layers.5.mlp.gate_proj.bias"
    assert gguf_name(key, arch) == gguf_name(key) == "blk.5.ffn_gate.bias"
    assert hf_key("blk.5.ffn_gate.bias", arch) == key
    permuted = rope_heads("model.layers.0.self_attn.k_proj.weight", 8, 2, arch)
    assert permuted == (None if arch == "Qwen2ForCausalLM" else 2)  # llama.cpp ropes qwen2 half-split itself
    assert rope_heads("model.layers.0.self_attn.k_proj", 8, 2) == 2 and rope_heads("model.norm.weight", 8, 2) is None


def test_architectures_without_gguf_are_refused_by_name():
    with pytest.raises(UnsupportedArchitecture, match="FalconForCausalLM has no GGUF writer.*Qwen2ForCausalLM"):
        gguf_name("model.norm.weight", "FalconForCausalLM")
    row = replace(archs.lookup("LlamaForCausalLM"), name="NoGgufForCausalLM", gguf=None)
    with archs.registered(row), pytest.raises(UnsupportedArchitecture, match="NoGgufForCausalLM has no GGUF"):
        gguf_name("model.norm.weight", "NoGgufForCausalLM")


def test_fitting_type_follows_llama_cpp_fallbacks():
    assert fitting_type(T.Q4_0, 576) == T.Q4_0
    assert fitting_type(T.Q4_K, 576) == T.Q5_0 and fitting_type(T.Q6_K, 576) == T.Q8_0
    assert fitting_type(T.Q4_K, 1536) == T.Q4_K
    assert fitting_type(T.Q4_0, 240) == T.F16


@pytest.mark.parametrize("group,zero_point", [(32, True), (64, True), (128, False)])
def test_q4_1_transplant_carries_codes_and_reads_back(group, zero_point):
    gen = torch.Generator().manual_seed(group)
    w = torch.randn(24, 256, generator=gen) * 0.05
    p = IntGrid(4, group, zero_point).pack(w)
    blocks = to_q4_1(p)
    assert blocks.shape == (24, 256 // 32 * 20)
    got = quants.dequantize(blocks, T.Q4_1)
    s = p.scales.float().repeat_interleave(group, 1)
    m = (-p.zeros.float() * p.scales.float()).half().float().repeat_interleave(group, 1)
    assert np.array_equal(got, (p.unpack().float() * s + m).numpy())
    if not zero_point:  # z = 8: m = -8 s is exact in fp16, so llama.cpp sees (q - z) * s exactly
        assert np.array_equal(got, p.dequantize().numpy())
    q, z, sc = from_q4_1(blocks, group)
    assert PackedLinear.from_ints(q, z, sc, group).equal(p)


def test_q4_1_transplant_refusals():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(8, 64, generator=gen)
    with pytest.raises(FormatConstraintError, match="multiple of 32"):
        to_q4_1(IntGrid(4, 16).pack(w))
    with pytest.raises(FormatConstraintError, match="4-bit"):
        to_q4_1(IntGrid(3, 32).pack(w))
    # gguf-py's own Q4_1 (per-32 min/max) is not a transplant of 64-groups
    foreign = quants.quantize(w.numpy(), T.Q4_1)
    with pytest.raises(FormatConstraintError, match="not an awqconv"):
        from_q4_1(foreign, 64)


def test_q4_1_transplant_of_bf16_scales():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(16, 128, generator=gen) * 0.02
    p = IntGrid(4, 64, True, torch.bfloat16).pack(w)
    q, z, sc = from_q4_1(to_q4_1(p), 64)
    assert PackedLinear.from_ints(q, z, sc.to(torch.bfloat16), 64).equal(p)
    tiny = PackedLinear(p.qweight, torch.full_like(p.scales, 1e-30), p.zeros, 128, 64)
    with pytest.raises(FormatConstraintError, match="fp16"):
        to_q4_1(tiny)
