"""The architecture registry: every row resolves on its model, a broken row is named, a new row is one row."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from awqconv import archs
from awqconv.errors import UnsupportedArchitecture
from awqconv.formats.gguf_arch import arch_problems, check_arch
from awqconv.formats.gguf_tensors import gguf_name, hf_key, rope_heads
from awqconv.quant.mappings import ARCHITECTURES, arch_spec, quantizable_slots, resolve_layer
from tests.tiny_models import SHAPE, TINY_ARCHS


def _config(arch: str, **overrides) -> dict:
    model_type, extra = TINY_ARCHS[arch]
    cfg = AutoConfig.for_model(model_type, **{**SHAPE, **extra, **overrides}, vocab_size=256, bos_token_id=1,
                              eos_token_id=2, pad_token_id=None, architectures=[arch])
    return cfg.to_dict()


def _meta_layers(hf: dict, spec) -> torch.nn.ModuleList:
    """The decoder layers of a model built from ``hf`` on the meta device (no weights, instant)."""
    cfg = AutoConfig.for_model(hf["model_type"], **{k: v for k, v in hf.items() if k != "model_type"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return model.get_submodule(spec.layers_path)


def test_every_row_has_a_tiny_model() -> None:
    assert sorted(TINY_ARCHS) == archs.names()


@pytest.mark.parametrize("arch", archs.names())
def test_every_row_resolves_on_its_architecture(arch: str) -> None:
    hf = _config(arch)
    spec = arch_spec(hf)
    assert spec.arch == arch and spec is archs.lookup(arch).awq
    for layer in _meta_layers(hf, spec):
        mappings = resolve_layer(layer, spec, hf)
        bound = {m.spec for m in mappings}
        # every row binds, except rows that declare which layers lack them
        assert {m for m in spec.mappings if m.absent_in is None} <= bound
        assert {m.prev.name for m in mappings} >= {"input_layernorm"}
        names = {s.name for s in quantizable_slots(layer, spec)}
        assert names and not names & set(spec.not_convert)


def test_qwen3_moe_dense_and_sparse_layers_each_bind_their_own_rows() -> None:
    hf = _config("Qwen3MoeForCausalLM", mlp_only_layers=[1])
    spec = arch_spec(hf)
    optional = [m for m in spec.mappings if m.absent_in is not None]
    assert len(optional) == 4 and all(m.absent_in for m in optional)
    sparse, dense = _meta_layers(hf, spec)
    got = [{m.spec.prev for m in resolve_layer(layer, spec, hf)} for layer in (sparse, dense)]
    assert "mlp.experts.*.up_proj" in got[0] and "mlp.up_proj" not in got[0]
    assert "mlp.up_proj" in got[1] and "mlp.experts.*.up_proj" not in got[1]


def test_a_row_that_resolves_to_no_module_names_the_row_and_architecture() -> None:
    hf = _config("LlamaForCausalLM")
    spec = arch_spec(hf)
    layer = _meta_layers(hf, spec)[0]
    del layer.mlp.gate_proj
    with pytest.raises(UnsupportedArchitecture) as e:
        resolve_layer(layer, spec, hf)
    msg = str(e.value)
    assert "LlamaForCausalLM" in msg and "'post_attention_layernorm'" in msg and "mlp.gate_proj" in msg
    assert "no module at mlp.gate_proj" in msg


def test_a_router_that_is_not_a_linear_is_an_error_too() -> None:
    hf = _config("MixtralForCausalLM")
    spec = arch_spec(hf)
    layer = _meta_layers(hf, spec)[0]
    layer.mlp.gate = torch.nn.Identity()
    with pytest.raises(UnsupportedArchitecture, match=r"MixtralForCausalLM.*mlp.gate is not a linear"):
        resolve_layer(layer, spec, hf)


def test_optional_rows_are_only_optional_together() -> None:
    """A Qwen3-MoE layer with neither the experts nor a dense MLP is an error, not a silent skip."""
    hf = _config("Qwen3MoeForCausalLM")
    spec = arch_spec(hf)
    layer = _meta_layers(hf, spec)[0]
    layer.mlp = torch.nn.Identity()
    with pytest.raises(UnsupportedArchitecture, match=r"Qwen3MoeForCausalLM.*none of the rows"):
        resolve_layer(layer, spec, hf)


def test_a_llama_like_model_is_one_registry_row() -> None:
    name = "AliasLlamaForCausalLM"
    assert archs.lookup(name) is None
    with archs.registered(replace(archs.lookup("LlamaForCausalLM"), name=name)) as row:
        hf = {**_config("LlamaForCausalLM"), "architectures": [name]}
        # quantizer
        spec = arch_spec(hf)
        assert spec is row.awq and spec.arch == name and ARCHITECTURES[name] is spec
        assert len(resolve_layer(_meta_layers({**hf, "architectures": ["LlamaForCausalLM"]}, spec)[0], spec, hf)) == 4
        # GGUF writer and reader
        assert arch_problems(hf) == [] and check_arch(hf) == ("llama", True)
        key = "model.layers.3.self_attn.q_proj.weight"
        assert gguf_name(key, name) == "blk.3.attn_q.weight" and hf_key("blk.3.attn_q.weight", name) == key
        assert rope_heads(key, 4, 2, name) == 4
        # the runtime runs it too (its column came with the row)
        assert name in archs.runtime_supported() and archs.runtime_row(hf) is row
    assert archs.lookup(name) is None and name not in ARCHITECTURES
    with pytest.raises(UnsupportedArchitecture):
        arch_spec(hf)
    with pytest.raises(UnsupportedArchitecture):
        gguf_name("model.norm.weight", name)


def test_registering_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="already registered"):
        archs.register(archs.lookup("LlamaForCausalLM"))


def test_columns_match_what_the_code_supports_today() -> None:
    assert sorted(archs.gguf_supported()) == archs.names()  # every row writes GGUF
    assert sorted(archs.runtime_supported()) == archs.names()  # the built-in runtime runs every row
    assert check_arch(_config("Qwen2ForCausalLM")) == ("qwen2", False)  # NEOX rope: no q/k permutation
    assert rope_heads("model.layers.0.self_attn.q_proj", 4, 2, "Qwen2ForCausalLM") is None
    assert check_arch(_config("MixtralForCausalLM")) == ("llama", True)
    assert {check_arch(_config(n))[0] for n in ("Qwen3MoeForCausalLM", "Gemma3ForCausalLM", "Phi3ForCausalLM")} == {
        "qwen3moe", "gemma3", "phi3"}
    assert "no GGUF writer" in arch_problems({**_config("LlamaForCausalLM"), "architectures": ["FalconForCausalLM"]})[0]
    # every row owns its AWQ columns, so a spec names its architecture
    assert len({id(archs.lookup(n).awq) for n in archs.names()}) == len(archs.names())
    offset = ["Gemma2ForCausalLM", "Gemma3ForCausalLM", "GemmaForCausalLM"]
    assert [n for n in archs.names() if archs.lookup(n).awq.offset_norm] == offset
    # llama.cpp gets w + 1 exactly where the quantizer folds into (1 + w) norms
    assert [n for n in archs.names() if archs.lookup(n).gguf.norm_plus_one] == offset


def test_runtime_window_reads_the_sliding_window_column() -> None:
    mistral, qwen2, llama = (archs.lookup(n).runtime for n in ("MistralForCausalLM", "Qwen2ForCausalLM",
                                                                "LlamaForCausalLM"))
    assert mistral.window({"sliding_window": 4096}) == 4096
    assert mistral.window({"sliding_window": 4096, "use_sliding_window": False}) is None
    assert qwen2.window({"sliding_window": 4096}) is None
    assert qwen2.window({"sliding_window": 4096, "use_sliding_window": True}) == 4096
    assert llama.window({"sliding_window": 4096}) is None
    with pytest.raises(UnsupportedArchitecture, match="does not run FalconForCausalLM.*Qwen2ForCausalLM"):
        archs.runtime_row({"architectures": ["FalconForCausalLM"]})

