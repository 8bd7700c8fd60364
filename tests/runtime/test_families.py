"""The built-in runtime on every registry family against the transformers fake-quant reference
(the QuantizedModel's dequantised state dict in the HF model), fp32 on the CPU.

With exact weights and fp32 activations the runtime computes the reference's function: prefill
logits within 1e-4 of max |logit| (measured: 0 for every family) and batched greedy tokens (a
left-padded batch of three prompts) equal token for token to the reference's per-prompt greedy
decode. First on the tiny fixture models (tests/tiny_models.py, checkpoint names: Mixtral's
``block_sparse_moe.experts.{e}.w1``), then on small models whose configs switch on what the fixtures
leave idle (windows shorter than the prompts, strong soft-caps, a query scalar other than head_dim,
Gemma 3's local/global RoPE with linear scaling, partial rotary, dense Qwen3-MoE layers, top-k
weights not renormalised; the quantizer's ``mlp.experts.{e}.gate_proj`` names).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from awqconv import archs
from awqconv.kernels.experts import ExpertLinear
from awqconv.reference import reference_model
from awqconv.runtime.generate import Generator, SamplingParams
from awqconv.runtime.model import build_decoder
from tests.fixtures_helpers import qm_from_dir
from tests.runtime.family_models import family_qm
from tests.tiny_models import TINY_ARCHS, tiny_model_dir

PROMPTS = [[1, 5, 9, 33, 2, 7], [7, 8], [100, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]]
NEW = 10

# config overrides that make each family's features act on 12-token prompts
VARIANTS = {
    "Gemma2ForCausalLM": dict(sliding_window=4, attn_logit_softcapping=3.0, final_logit_softcapping=5.0,
                              query_pre_attn_scalar=24),
    # transformers' Gemma 3 soft-caps the logits only, whatever attn_logit_softcapping says
    "Gemma3ForCausalLM": dict(layer_types=["sliding_attention", "full_attention"], sliding_window=4,
                              query_pre_attn_scalar=24, attn_logit_softcapping=2.0, final_logit_softcapping=4.0,
                              rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                               "full_attention": {"rope_type": "linear", "factor": 8.0,
                                                                  "rope_theta": 1000000.0}}),
    "GemmaForCausalLM": {},  # config.json says hidden_act "gelu" below: transformers runs the tanh approximation
    "Qwen2ForCausalLM": dict(use_sliding_window=True, sliding_window=4, max_window_layers=1),
    "Qwen3ForCausalLM": dict(use_sliding_window=True, sliding_window=4, max_window_layers=1),
    "Qwen3MoeForCausalLM": dict(mlp_only_layers=[1], norm_topk_prob=False),
    "Phi3ForCausalLM": dict(partial_rotary_factor=0.5, sliding_window=5),
    "MixtralForCausalLM": dict(sliding_window=4),
    "MistralForCausalLM": dict(sliding_window=3),
    "LlamaForCausalLM": dict(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                              "original_max_position_embeddings": 8}),
}


def _check(qm) -> float:
    """Prefill logits and batched greedy decoding against the reference; returns max |dlogit|."""
    ref = reference_model(qm)
    dec = build_decoder(qm, "cpu")
    dec.allocate_cache(1, 32)
    ids = torch.tensor([PROMPTS[2]])
    with torch.no_grad():
        got = dec(ids, torch.arange(ids.shape[1])[None], torch.tensor(0), ids.shape[1], last_only=False)
        want = ref(ids).logits
    dlogit = (got - want).abs().max().item()
    assert dlogit / want.abs().max().item() < 1e-4
    res = Generator(dec, max_batch=3, max_len=32).generate(PROMPTS, SamplingParams(max_new_tokens=NEW))
    with torch.no_grad():
        for p, toks in zip(PROMPTS, res.tokens):
            out = ref.generate(torch.tensor([p]), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
            assert toks == out[0, len(p):].tolist()
    return dlogit


def test_every_registry_row_runs():
    assert sorted(archs.runtime_supported()) == archs.names() == sorted(TINY_ARCHS)


@pytest.mark.parametrize("arch", sorted(TINY_ARCHS))
def test_tiny_fixture_matches_reference(arch):
    _check(qm_from_dir(tiny_model_dir(arch), group_size=32))


@pytest.mark.parametrize("arch", sorted(VARIANTS))
def test_family_features_match_reference(arch):
    qm = family_qm(arch, **VARIANTS[arch])
    if arch == "GemmaForCausalLM":  # the legacy activation name of Gemma's released configs
        qm = dataclasses.replace(qm, hf_config={**qm.hf_config, "hidden_act": "gelu"})
    dec = build_decoder(qm, "cpu")
    s = dec.spec
    want_windows = {"Gemma2ForCausalLM": (4, None), "Gemma3ForCausalLM": (4, None), "Qwen2ForCausalLM": (None, 4),
                    "Qwen3ForCausalLM": (None, 4), "Phi3ForCausalLM": (5, 5), "MixtralForCausalLM": (4, 4),
                    "MistralForCausalLM": (3, 3)}.get(arch, (None, None))
    assert s.windows == want_windows  # transformers' layer_types, or every layer
    if arch == "Gemma3ForCausalLM":
        assert s.rope_kinds == ("sliding_attention", "full_attention") and len(dec.rope) == 2
        assert (s.attn_softcap, s.final_softcap) == (None, 4.0)
    if arch.startswith("Gemma"):
        assert s.act == "gelu_pytorch_tanh" and s.embed_scale == 8.0
    if arch == "Qwen3MoeForCausalLM":
        assert s.moe.sparse == (True, False) and not s.moe.renormalize
    _check(qm)


def test_moe_decode_runs_all_pairs_at_once(monkeypatch):
    """A MoE decode step (one token per row, a batch of two) runs every (token, expert) pair in one
    batched product per projection, never the per-expert loop; a prefill of several tokens loops
    over the experts that received tokens, as transformers does."""
    qm = family_qm("MixtralForCausalLM")
    dec = build_decoder(qm, "cpu")
    calls = {"expert": 0, "pairs": 0}
    for name, key in (("expert", "expert"), ("pairs_torch", "pairs")):
        real = getattr(ExpertLinear, name)
        monkeypatch.setattr(ExpertLinear, name,
                            lambda self, *a, real=real, key=key, **k: calls.__setitem__(key, calls[key] + 1) or real(
                                self, *a, **k))
    gen = Generator(dec, max_batch=2, max_len=32)
    _, pos, slot = gen.prefill(PROMPTS[:2])
    assert calls["expert"] > 0 and calls["pairs"] == 0
    calls.update(expert=0)
    gen.step(torch.tensor([5, 6]), pos, slot)
    assert calls == {"expert": 0, "pairs": 2 * 2}  # gate/up and down of 2 layers
