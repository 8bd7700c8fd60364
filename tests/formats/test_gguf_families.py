"""GGUF of every registered family, judged by llama.cpp (llama-cpp-python) against transformers.

Each family's tiny random model (tests/tiny_models.py) is quantized by awqconv's AWQ pipeline on a
short calibration and written to GGUF. The exact ``q4_1-awq`` transplant must compute in llama.cpp
what transformers computes on the same fake-quant integers (the dequantized state dict); they differ
only by llama.cpp's 8-bit activations. Re-quantized types must track the AWQ-prescaled float model
(an f32 file of it exactly). Config variants llama.cpp's graphs cannot express are refused by name.
"""

from __future__ import annotations

import copy
import functools
import re
from pathlib import Path

import llama_cpp
import numpy as np
import pytest
import torch

from awqconv import archs
from awqconv.config import QuantConfig
from awqconv.errors import FormatConstraintError, UnsupportedArchitecture
from awqconv.formats import gguf as G
from awqconv.formats.gguf_read import GGUFFile
from awqconv.model import QuantizedModel
from awqconv.packed import bitwise_equal
from tests.formats.test_gguf import _canonical_hf, _hf_logits, _kl, _llama_logits, _prescaled_hf, _request
from tests.tiny_models import MOE_EXPERTS, MOE_TOP_K, MOE_WIDTH, tiny_model_dir

# every row with a GGUF column; the tiny Mistral is the tiny Llama under another name (no window), so once
FAMILIES = [a for a in archs.gguf_supported() if a != "MistralForCausalLM"]
MOE = ("MixtralForCausalLM", "Qwen3MoeForCausalLM")
# a short AWQ run: every step of the search, few tokens
CALIB = dict(calib_samples=4, calib_seq_len=128, search_tokens=256, clip_n_tokens=128, group_size=32,
             n_grid=10, clip_n_grid=10)
NAME = "tiny-family"  # llama.cpp keys Phi-3 vocabulary fix-ups on a name holding "phi3"

# transplant vs transformers on the same integers: (min top-1 agreement, max relative |dlogit|).
# Measured on the 48 probe tokens: top-1 0.94-1.0 (near-ties of tiny random models flip), max relative
# 0.4-13 % (Phi-3 the most); MoE 0.94-0.96 and 6-11 %, up to 20 % on other tokens, where llama.cpp's
# 8-bit activations flip a router's choice of expert.
DENSE_LIMITS, MOE_LIMITS = (0.85, 0.2), (0.8, 0.3)


@functools.cache
def _quantized(arch: str) -> QuantizedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from awqconv.quant.calib import build_blocks, load_calibration_texts
    from awqconv.quant.pipeline import quantize_model
    from awqconv.sources import collect_assets, load_hf_config

    path = tiny_model_dir(arch)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    hf = load_hf_config(path)
    blocks = build_blocks(load_calibration_texts("builtin"), AutoTokenizer.from_pretrained(path),
                          CALIB["calib_samples"], CALIB["calib_seq_len"]).ids
    cfg = QuantConfig(**CALIB)
    out = quantize_model(model, hf, cfg, blocks, progress=False)
    return QuantizedModel(hf, cfg, out.linears, out.dense, out.search, provenance={"model_name": NAME},
                          assets=collect_assets(path), prescaled=out.prescaled)


@functools.cache
def _probe() -> list[int]:
    """48 tokens of held-out English text (n_ctx of the llama.cpp helper is 64)."""
    from transformers import AutoTokenizer

    text = (Path(__file__).resolve().parents[2] / "awqconv" / "data" / "eval_heldout.txt").read_text()[:2000]
    return AutoTokenizer.from_pretrained(tiny_model_dir("LlamaForCausalLM")).encode(text)[:48]


@functools.cache
def _reference(arch: str, kind: str) -> np.ndarray:
    qm = _quantized(arch)
    return _hf_logits(_canonical_hf(qm) if kind == "canonical" else _prescaled_hf(qm), _probe())


def _agreement(ref: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    """(top-1 agreement, max |dlogit| relative to the reference's largest |logit|)."""
    return float((ref.argmax(-1) == got.argmax(-1)).mean()), float(np.abs(got - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """``written(arch, variant)``: the GGUF of that family, written once per module."""
    root = tmp_path_factory.mktemp("gguf-families")
    done: dict[tuple[str, str], G.GGUFWriteResult] = {}

    def get(arch: str, variant: str) -> G.GGUFWriteResult:
        if (arch, variant) not in done:
            out = root / arch
            out.mkdir(exist_ok=True)
            done[arch, variant] = G.write(_quantized(arch), out, variant)
        return done[arch, variant]

    return get


def _variant_of(arch: str, tmp: Path, variant: str, **config) -> tuple[QuantizedModel, np.ndarray]:
    """The family's model under changed config keys: (model, llama.cpp logits of its ``variant`` file)."""
    qm = copy.copy(_quantized(arch))
    qm.hf_config = {**qm.hf_config, **config}
    return qm, _llama_logits(G.write(qm, tmp, variant).path, _probe())


# ---------------------------------------------------------------------------------------------
# numerics per family

@pytest.mark.slow
@pytest.mark.parametrize("arch", FAMILIES)
def test_transplant_computes_what_transformers_computes_on_the_same_integers(arch, written):
    ref = _reference(arch, "canonical")
    got = _llama_logits(written(arch, "q4_1-awq").path, _probe())
    top1, rel = _agreement(ref, got)
    min_top1, max_rel = MOE_LIMITS if arch in MOE else DENSE_LIMITS
    print(f"{arch}: top-1 {top1:.3f}, max relative |dlogit| {rel:.4f}, KL {_kl(ref, got):.5f}")
    assert np.abs(ref).max() > 1.0  # logits large enough for a layout bug to show
    assert top1 >= min_top1 and rel <= max_rel, (top1, rel)
    # the prescaled float model is far further away, so a wrong or mis-laid-out file would not pass
    assert _kl(ref, got) * 5 < _kl(ref, _reference(arch, "prescaled"))


@pytest.mark.slow
@pytest.mark.parametrize("arch", FAMILIES)
def test_requantized_types_track_the_prescaled_model(arch, written):
    ref = _reference(arch, "prescaled")
    f32 = _agreement(ref, _llama_logits(written(arch, "f32").path, _probe()))[1]
    assert f32 < 0.02  # the same floats: only the float summation order differs
    assert written(arch, "f32").weights_source == "prescaled"
    kls = {v: _kl(ref, _llama_logits(written(arch, v).path, _probe())) for v in ("q8_0", "q4_0", "q4_k_m")}
    print(f"{arch}: f32 max relative |dlogit| {f32:.4f}; KL to the prescaled model {kls}")
    assert kls["q8_0"] < 0.005 and kls["q8_0"] < kls["q4_0"], kls
    assert kls["q4_0"] < 0.2 and kls["q4_k_m"] < 0.2, kls


@pytest.mark.slow
@pytest.mark.parametrize("arch", FAMILIES)
def test_transplant_reads_back_bit_exact(arch, written):
    qm, back = _quantized(arch), G.read(written(arch, "q4_1-awq").path)
    assert set(back.linears) == set(qm.linears)
    assert all(back.linears[n].equal(p) for n, p in qm.linears.items())
    assert set(back.dense) == set(qm.dense)
    # Gemma's (1 + w) gains come back exactly although llama.cpp reads w + 1
    assert all(bitwise_equal(back.dense[k], v) for k, v in qm.dense.items())
    assert back.hf_config == qm.hf_config


# ---------------------------------------------------------------------------------------------
# layout and metadata llama.cpp reads

H, FF, KV = 128, 256, 2 * 32
LAYOUT = {
    "MixtralForCausalLM": ("llama", {"blk.1.ffn_gate_exps.weight": (MOE_EXPERTS, MOE_WIDTH, H),
                                     "blk.1.ffn_down_exps.weight": (MOE_EXPERTS, H, MOE_WIDTH),
                                     "blk.1.ffn_gate_inp.weight": (MOE_EXPERTS, H)},
                           {"expert_count": MOE_EXPERTS, "expert_used_count": MOE_TOP_K}),
    "Qwen3MoeForCausalLM": ("qwen3moe", {"blk.0.ffn_up_exps.weight": (MOE_EXPERTS, MOE_WIDTH, H),
                                         "blk.0.attn_k_norm.weight": (32,)},
                            {"expert_count": MOE_EXPERTS, "expert_used_count": MOE_TOP_K,
                             "expert_feed_forward_length": MOE_WIDTH}),
    "Phi3ForCausalLM": ("phi3", {"blk.0.attn_qkv.weight": (H + 2 * KV, H), "blk.0.ffn_up.weight": (2 * FF, H)}, {}),
    "Gemma2ForCausalLM": ("gemma2", {"blk.0.post_ffw_norm.weight": (H,)},
                          {"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
                           "attention.sliding_window": 4096}),
    "Gemma3ForCausalLM": ("gemma3", {"blk.1.attn_q_norm.weight": (32,), "blk.1.post_attention_norm.weight": (H,)},
                          {"attention.sliding_window": 4096, "rope.freq_base": 1e6, "rope.freq_base_swa": 1e4}),
    "Qwen3ForCausalLM": ("qwen3", {"blk.1.attn_q_norm.weight": (32,)}, {}),
    "GemmaForCausalLM": ("gemma", {"blk.0.ffn_gate.weight": (FF, H)}, {}),
}


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(LAYOUT))
def test_tensors_and_metadata_follow_llama_cpp(arch, written):
    name, shapes, keys = LAYOUT[arch]
    f = GGUFFile(written(arch, "q4_0").path)
    assert f.fields["general.architecture"] == name
    for tensor, shape in shapes.items():
        assert f.tensors[tensor].shape == shape, tensor
    for key, value in keys.items():
        assert f.fields[f"{name}.{key}"] == pytest.approx(value), key
    assert ("output.weight" in f.tensors) == (not _quantized(arch).hf_config.get("tie_word_embeddings", False))
    if arch in MOE:  # routers stay exact; llama.cpp's own quantizer leaves them alone too
        assert f.tensors["blk.0.ffn_gate_inp.weight"].ggml_type.name == "F32"
    if archs.lookup(arch).gguf.norm_plus_one:
        w = torch.from_numpy(np.array(f.array("blk.0.attn_norm.weight")))
        assert torch.equal(w, _quantized(arch).dense["model.layers.0.input_layernorm.weight"].float() + 1)


# ---------------------------------------------------------------------------------------------
# what llama.cpp reads per layer: sliding windows, local rope, soft-capping

WINDOWED = [
    ("Gemma2ForCausalLM", dict(sliding_window=4)),
    ("Gemma3ForCausalLM", dict(sliding_window=4)),
    # a period of 2 (written as sliding_window_pattern), a local rope base of its own, logit soft-capping
    ("Gemma3ForCausalLM", dict(sliding_window=4, layer_types=["sliding_attention", "full_attention"],
                               final_logit_softcapping=3.0,
                               rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0,
                                                                   "rope_theta": 1e6},
                                                "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}})),
]


@pytest.mark.slow
@pytest.mark.parametrize("arch,config", WINDOWED)
def test_per_layer_windows_rope_and_softcaps_match(arch, config, tmp_path):
    qm, got = _variant_of(arch, tmp_path, "f32", **config)
    ref = _hf_logits(_prescaled_hf(qm), _probe())
    assert np.abs(ref - _reference(arch, "prescaled")).max() > 1.0  # the change matters to transformers
    assert _agreement(ref, got)[1] < 0.02


# ---------------------------------------------------------------------------------------------
# refusals: configs llama.cpp's graph for the family cannot run

REFUSED = [
    ("Qwen3MoeForCausalLM", dict(norm_topk_prob=False), "renormalizes the top-k expert weights"),
    ("Qwen3MoeForCausalLM", dict(mlp_only_layers=[1]), "routes experts in every layer"),
    ("Gemma2ForCausalLM", dict(query_pre_attn_scalar=64), r"query_pre_attn_scalar=64.*1/sqrt\(32\)"),
    ("Gemma2ForCausalLM", dict(attn_logit_softcapping=None), "always soft-caps with attn_logit_softcapping"),
    ("Gemma2ForCausalLM", dict(tie_word_embeddings=False), "reuses the embedding as the output matrix"),
    ("Gemma3ForCausalLM", dict(attn_logit_softcapping=50.0), "does not apply attn_logit_softcapping"),
    ("Gemma3ForCausalLM", dict(sliding_window=4, layer_types=["full_attention", "sliding_attention"]),
     "no period"),
    ("Phi3ForCausalLM", dict(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4}), "'longrope'"),
    ("MixtralForCausalLM", dict(partial_rotary_factor=0.5), "partial rotary"),
    ("Qwen3ForCausalLM", dict(layer_types=["sliding_attention", "full_attention"]), "runs every layer alike"),
]


@pytest.mark.parametrize("arch,config,match", REFUSED)
def test_configs_llama_cpp_cannot_run_are_refused_before_writing(arch, config, match, tmp_path):
    from awqconv.sources import load_hf_config

    cfg = {**load_hf_config(tiny_model_dir(arch)), **config}
    problems = G.plan(_request("q4_0", cfg))
    assert any(re.search(match, p) for p in problems), problems
    qm = QuantizedModel(cfg, QuantConfig(group_size=32, method="rtn"), {}, {})
    with pytest.raises(UnsupportedArchitecture, match=match):
        G.write(qm, tmp_path, "q4_0")
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_a_gemma_config_without_tie_word_embeddings_is_tied(tmp_path):
    """Gemma's own config.json files leave the key out (transformers' default: tied), so the quantizer keeps
    lm_head as a tensor of its own; llama.cpp's gemma2 graph has no place for it but needs none."""
    qm = copy.copy(_quantized("Gemma2ForCausalLM"))
    qm.hf_config = {k: v for k, v in qm.hf_config.items() if k != "tie_word_embeddings"}
    qm.dense = {**qm.dense, "lm_head.weight": qm.dense["model.embed_tokens.weight"].clone()}
    r = G.write(qm, tmp_path, "q4_1-awq")
    assert "output.weight" not in GGUFFile(r.path).tensors
    assert _kl(_reference("Gemma2ForCausalLM", "canonical"), _llama_logits(r.path, _probe())) < 0.01
    back = G.read(r.path)
    assert all(bitwise_equal(back.dense[k], v) for k, v in qm.dense.items()) and set(back.dense) == set(qm.dense)


@pytest.mark.slow
def test_a_model_named_phi3_needs_the_phi3_vocabulary(tmp_path):
    qm = copy.copy(_quantized("Phi3ForCausalLM"))
    qm.provenance = {"model_name": "my-phi3-mini"}
    with pytest.raises(FormatConstraintError, match=r"as Phi-3.*lacks </s>, <unk>, <s>"):
        G.write(qm, tmp_path, "q4_0")


# ---------------------------------------------------------------------------------------------
# the user's path: quantize --to gguf

@pytest.mark.slow
@pytest.mark.parametrize("arch", ["Gemma3ForCausalLM", "Qwen3MoeForCausalLM"])
def test_convert_writes_a_gguf_llama_cpp_runs(arch, tmp_path):
    import awqconv

    res = awqconv.convert(str(tiny_model_dir(arch)), to=["gguf"], out_dir=tmp_path / "out", method="rtn",
                          group_size=32, progress=False)
    path = next(res.artifacts["gguf"].glob("*.gguf"))
    logits = _llama_logits(path, _probe()[:16])
    assert np.isfinite(logits).all() and np.abs(logits).max() > 1.0
    from transformers import AutoTokenizer

    text = "The model works, naïve café 12345."
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    assert llm.tokenize(text.encode(), add_bos=True) == AutoTokenizer.from_pretrained(tiny_model_dir(arch)).encode(text)
    llm.close()
