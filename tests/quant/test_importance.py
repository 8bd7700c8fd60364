"""The importance matrix the quantizer collects: the statistics of the activations that meet the
AWQ-prescaled weights, judged by running the prescaled model itself (transformers) over the same
calibration tokens and summing ``x ** 2`` at every linear and every expert independently."""

from __future__ import annotations

import functools

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from awqconv.config import QuantConfig
from awqconv.model import fuse_expert_weights
from awqconv.quant.calib import build_blocks, load_calibration_texts
from awqconv.quant.pipeline import quantize_model
from awqconv.sources import load_hf_config
from tests.tiny_models import tiny_model_dir

# no clipping: the prescaled float model then computes exactly the float model's function
CFG = QuantConfig(calib_samples=8, calib_seq_len=64, search_tokens=128, group_size=32, apply_clip=False, n_grid=5)


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@functools.lru_cache(maxsize=None)  # shared by the tests below; they only read it
def _quantize(arch: str):
    path = tiny_model_dir(arch)
    tok = AutoTokenizer.from_pretrained(path)
    blocks = build_blocks(load_calibration_texts("builtin"), tok, CFG.calib_samples, CFG.calib_seq_len).ids
    out = quantize_model(_load(path), load_hf_config(path), CFG, blocks, progress=False)
    return path, blocks, out


@torch.no_grad()
def _reference_sums(model, blocks) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Sum of x^2 per input channel at every decoder linear / expert of ``model`` over ``blocks``."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def add(name, x):
        x = x.reshape(-1, x.shape[-1]).double()
        sums[name] = sums.get(name, 0) + x.pow(2).sum(0)
        counts[name] = counts.get(name, 0) + x.shape[0]

    def linear_hook(name):
        return lambda _m, args: add(name, args[0])

    def experts_hook(name, mod):
        def hook(_m, args, kwargs):
            hidden, index = args[0], args[1] if len(args) > 1 else kwargs["top_k_index"]
            inter = mod.gate_up_proj.shape[1] // 2
            for e in range(mod.gate_up_proj.shape[0]):
                x = hidden[(index == e).any(-1)]
                g, u = x @ mod.gate_up_proj[e, :inter].T, x @ mod.gate_up_proj[e, inter:].T
                for leaf, inp in (("gate_proj", x), ("up_proj", x), ("down_proj", mod.act_fn(g) * u)):
                    add(f"{name}.{e}.{leaf}", inp)
        return hook

    handles = []
    for name, mod in model.named_modules():
        if ".layers." not in name:
            continue
        if isinstance(mod, torch.nn.Linear):
            handles.append(mod.register_forward_pre_hook(linear_hook(name)))
        elif isinstance(getattr(mod, "gate_up_proj", None), torch.nn.Parameter):
            handles.append(mod.register_forward_pre_hook(experts_hook(name, mod), with_kwargs=True))
    for b in blocks.split(4):
        model(input_ids=b, use_cache=False)
    for h in handles:
        h.remove()
    return sums, counts


def _prescaled_model(path, out):
    model = _load(path)
    sd = {k: v.float() for k, v in out.dense.items()}
    sd.update({f"{n}.weight": w.float() for n, w in out.prescaled.items()})
    sd.update({f"{n}.bias": p.bias.float() for n, p in out.linears.items() if p.bias is not None})
    model.load_state_dict(fuse_expert_weights(sd), strict=False)
    return model


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "MixtralForCausalLM", "Phi3ForCausalLM"])  # plain, experts, fused
def test_importance_is_that_of_the_prescaled_weights_inputs(arch):
    path, blocks, out = _quantize(arch)
    imp = out.importance
    assert imp is not None and imp.chunk_count == 8 and imp.chunk_size == 64 and imp.datasets == ["builtin"]
    assert set(imp.sums) == set(out.linears)  # every quantized linear (and expert) has statistics

    ref, ref_n = _reference_sums(_prescaled_model(path, out), blocks)
    plain, _ = _reference_sums(_load(path), blocks)  # the float model: no AWQ scales
    moved = 0
    for name in out.linears:
        # fp16-stored prescaled weights shift later activations by ~1e-3, which may flip the routing of
        # a token that sat on a near-tie between two experts
        expert = ".experts." in name
        assert abs(imp.counts[name] - ref_n[name]) <= (0.01 * ref_n[name] if expert else 0), name
        got, want = imp.sums[name].double(), ref[name]
        if expert:  # one re-routed token may hold a few % of a channel: compare the whole vector
            assert float((got - want).norm() / want.norm()) < 0.02, name
        else:
            assert torch.allclose(got, want, rtol=2e-2, atol=1e-6 * float(want.max())), (name, (got / want).max())
        moved += int(((plain[name] / want - 1).abs() > 0.5).any())
    assert moved >= len(out.linears) // 3  # the scales changed what meets the weights: the fold matters


def test_every_token_is_counted_and_experts_count_their_routed_tokens():
    path, blocks, out = _quantize("MixtralForCausalLM")
    imp, n_tokens = out.importance, blocks.numel()
    assert imp.counts["model.layers.0.self_attn.q_proj"] == n_tokens
    experts = [n for n in imp.counts if ".experts." in n and n.startswith("model.layers.0.") and n.endswith("gate_proj")]
    top_k = load_hf_config(path)["num_experts_per_tok"]
    assert sum(imp.counts[n] for n in experts) == n_tokens * top_k


def test_rtn_has_no_importance():
    path = tiny_model_dir("LlamaForCausalLM")
    out = quantize_model(_load(path), load_hf_config(path), QuantConfig(method="rtn", group_size=32), None,
                         progress=False)
    assert out.importance is None
