"""Scale folding is exact: every mapping of every architecture leaves the fp32 model unchanged."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from awqconv import archs
from awqconv.errors import UnsupportedArchitecture
from awqconv.quant.mappings import ARCHITECTURES, arch_spec, quantizable_slots, resolve_layer
from awqconv.quant.search import apply_scale
from awqconv.sources import load_hf_config
from tests.tiny_models import tiny_model_dir

ARCHS = archs.names()


def _load(arch: str):
    path = tiny_model_dir(arch)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, load_hf_config(path)


def _prev_channels(m) -> int:
    from awqconv.quant.mappings import _rows_len

    return m.prev.weight.shape[0] if m.prev.rows is None else _rows_len(m.prev)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_mapping_folds_exactly(arch: str) -> None:
    model, hf = _load(arch)
    spec = arch_spec(hf)
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
        n_mappings = 0
        for layer in model.get_submodule(spec.layers_path):
            mappings = resolve_layer(layer, spec, hf)
            # every row resolved (rows absent from a layer raise unless they declare absent_in)
            assert len(mappings) >= 4, [m.spec.prev for m in mappings]
            for m in mappings:
                g = torch.Generator().manual_seed(n_mappings)
                s = torch.rand(_prev_channels(m), generator=g) * 3 + 0.25  # far from 1
                apply_scale(m, s)
                n_mappings += 1
        out = model(ids).logits
    # weights did change, the function did not
    assert n_mappings >= 8
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-4)


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Phi3ForCausalLM"])
def test_gqa_vo_mapping_has_one_scale_per_kv_channel(arch: str) -> None:
    model, hf = _load(arch)
    spec = arch_spec(hf)
    layer = model.get_submodule(spec.layers_path)[0]
    vo = [m for m in resolve_layer(layer, spec, hf) if m.spec.vo]
    assert len(vo) == 1
    n_h, n_kv = hf["num_attention_heads"], hf["num_key_value_heads"]
    hd = hf.get("head_dim") or hf["hidden_size"] // n_h
    assert n_kv < n_h, "the fixture must use grouped-query attention"
    kv_index = vo[0].kv_index
    assert kv_index.shape == (n_h * hd,)
    assert int(kv_index.max()) + 1 == n_kv * hd
    # query head h reads kv head h // (n_h / n_kv)
    rep = n_h // n_kv
    for h in range(n_h):
        assert torch.equal(kv_index[h * hd : (h + 1) * hd], torch.arange(hd) + (h // rep) * hd)


def test_gqa_vo_scaling_is_exact_on_attention_output() -> None:
    model, hf = _load("LlamaForCausalLM")
    spec = arch_spec(hf)
    layer = model.get_submodule(spec.layers_path)[0]
    vo = [m for m in resolve_layer(layer, spec, hf) if m.spec.vo][0]
    x = torch.randn(2, 16, hf["hidden_size"])
    pos = torch.arange(16)[None].expand(2, -1)
    pe = model.model.rotary_emb(x, pos)
    with torch.no_grad():
        ref = layer.self_attn(hidden_states=x, position_embeddings=pe, attention_mask=None)[0]
        apply_scale(vo, torch.linspace(0.1, 10.0, _prev_channels(vo)))
        out = layer.self_attn(hidden_states=x, position_embeddings=pe, attention_mask=None)[0]
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_moe_router_is_compensated_and_not_quantized() -> None:
    model, hf = _load("MixtralForCausalLM")
    spec = arch_spec(hf)
    layer = model.get_submodule(spec.layers_path)[0]
    names = {s.name for s in quantizable_slots(layer, spec)}
    assert "mlp.gate" not in names
    assert {"mlp.experts.0.gate_proj", "mlp.experts.0.up_proj", "mlp.experts.0.down_proj"} <= names
    moe = [m for m in resolve_layer(layer, spec, hf) if m.spec.inspect == "mlp"][0]
    assert [e.name for e in moe.extra] == ["mlp.gate"]


def test_quantizer_table_is_the_registry_awq_column() -> None:
    assert sorted(ARCHITECTURES) == ARCHS
    assert all(ARCHITECTURES[n] is archs.lookup(n).awq and ARCHITECTURES[n].arch == n for n in ARCHS)


def test_empty_architectures_are_inferred_from_model_type() -> None:
    assert arch_spec({"architectures": [], "model_type": "qwen2"}) is archs.lookup("Qwen2ForCausalLM").awq
    assert arch_spec({"model_type": "mistral"}).arch == "MistralForCausalLM"
    with pytest.raises(UnsupportedArchitecture, match="model_type 'falcon'"):
        arch_spec({"architectures": [], "model_type": "falcon"})


def test_unknown_architecture_lists_supported_ones() -> None:
    with pytest.raises(UnsupportedArchitecture, match="LlamaForCausalLM.*Qwen3MoeForCausalLM"):
        arch_spec({"architectures": ["FalconForCausalLM"]})
