"""GGUF export judged by llama.cpp (llama-cpp-python): loading, logits, tokenizer, exact read-back.

Models are small but real-shaped: the first two decoder layers of SmolLM2-135M (hidden 576, GQA
9/3 heads, tied embeddings, the real 49k BPE tokenizer), plus random tiny Mistral/Qwen2 models.
AWQ prescaling is imitated by folding a random per-channel scale into the norms and the q/k/v and
gate/up columns, which keeps the float model's function: llama.cpp must compute exactly that.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import llama_cpp  # CI installs llama-cpp-python: these tests are the llama.cpp judgement
import numpy as np
import pytest
import torch

from awqconv.config import QuantConfig
from awqconv.errors import FormatConstraintError, InputError, UnsupportedArchitecture
from awqconv.formats import ExportRequest, Target
from awqconv.formats import gguf as G
from awqconv.formats.gguf_read import GGUFFile
from awqconv.model import QuantizedModel, fuse_expert_weights
from awqconv.packed import bitwise_equal
from awqconv.quant.grid import IntGrid

PROBE = [504, 3575, 282, 4649, 314, 28, 1345, 253, 33, 34, 35, 2, 1, 9690, 198, 19556]
TRICKY = [
    "Hello world", " leading space", "  two  spaces\n\nnewlines\t\ttabs", "12345 678.9 1,000,000",
    "naïve café — “quotes” 日本語のテキスト 🤖🚀", "<|im_start|>user\nHi<|im_end|>\n", "don't I'll we've",
    "x = f(y) + 3**2; // comment", "   ", "ÀÉÎÕÜ ßøå", "a\u00a0b\u200bc", "Привет, мир!", "\n", "",
]


# ---------------------------------------------------------------------------------------------
# model builders

def _smollm2_dir() -> Path:
    from awqconv.sources import resolve_model

    return resolve_model("builtin:smollm2-135m")


def _hf_model(cfg: dict, state: dict[str, torch.Tensor]):
    from transformers import AutoConfig, AutoModelForCausalLM

    c = AutoConfig.for_model(**{k: v for k, v in cfg.items() if k not in ("architectures",)})
    m = AutoModelForCausalLM.from_config(c, dtype=torch.float32).eval()
    missing, unexpected = m.load_state_dict(state, strict=False)
    assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
    if cfg.get("tie_word_embeddings"):
        m.tie_weights()
    return m


def _fold_random_scales(sd: dict[str, torch.Tensor], n_layers: int, seed: int) -> dict[str, torch.Tensor]:
    """Function-preserving AWQ-style smoothing: norm /= s, following linears' columns *= s."""
    gen = torch.Generator().manual_seed(seed)
    sd = dict(sd)
    for i in range(n_layers):
        p = f"model.layers.{i}."
        for norm, lins in (("input_layernorm", ("q_proj", "k_proj", "v_proj")),
                           ("post_attention_layernorm", ("gate_proj", "up_proj"))):
            s = torch.exp(torch.randn(sd[p + norm + ".weight"].shape[0], generator=gen) * 0.5)
            sd[p + norm + ".weight"] = sd[p + norm + ".weight"] / s
            for lin in lins:
                mod = "self_attn" if lin.endswith(("q_proj", "k_proj", "v_proj")) else "mlp"
                k = f"{p}{mod}.{lin}.weight"
                sd[k] = sd[k] * s
    return sd


def _quantized_model(cfg: dict, sd: dict[str, torch.Tensor], assets: dict[str, bytes], group: int,
                     name: str) -> QuantizedModel:
    grid = IntGrid(4, group, True, torch.float16)
    linears, prescaled, dense = {}, {}, {}
    for k, v in sd.items():
        mod = k.rsplit(".", 1)[0]
        if ".layers." in k and k.endswith("_proj.weight"):
            bias = sd.get(mod + ".bias")
            linears[mod] = grid.pack(v, bias)
            prescaled[mod] = v.clone()
        elif ".layers." in k and k.endswith("_proj.bias"):
            continue
        else:
            dense[k] = v.clone()
    qc = QuantConfig(method="rtn", group_size=group)
    return QuantizedModel(cfg, qc, linears, dense, provenance={"model_name": name}, assets=assets,
                          prescaled=prescaled)


@pytest.fixture(scope="module")
def smol():
    """Two real SmolLM2 layers, AWQ-style scales folded in, RTN g64 canonical weights."""
    from safetensors.torch import load_file

    from awqconv.sources import collect_assets, load_hf_config

    d = _smollm2_dir()
    cfg = load_hf_config(d)
    cfg["num_hidden_layers"] = 2
    full = load_file(str(d / "model.safetensors"))
    keep = ("model.embed_tokens.", "model.norm.", "model.layers.0.", "model.layers.1.")
    sd = {k: v.float() for k, v in full.items() if k.startswith(keep)}
    sd = _fold_random_scales(sd, 2, seed=1)
    return _quantized_model(cfg, sd, collect_assets(d), 64, "smol2L")


def _tiny_random(arch: str, seed: int, assets: dict[str, bytes]) -> QuantizedModel:
    gen = torch.Generator().manual_seed(seed)
    h, ff, heads, kv, hd, n_layers = 128, 256, 4, 2, 32, 2
    cfg = {
        "architectures": [f"{arch}ForCausalLM"], "model_type": arch.lower(), "hidden_size": h,
        "intermediate_size": ff, "num_attention_heads": heads, "num_key_value_heads": kv,
        "num_hidden_layers": n_layers, "vocab_size": 49152, "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5, "rope_theta": 50000.0, "tie_word_embeddings": arch == "Qwen2",
        "hidden_act": "silu", "head_dim": hd,
    }
    r = lambda *s, std=1.0: torch.randn(*s, generator=gen) * std
    sd = {"model.embed_tokens.weight": r(49152, h), "model.norm.weight": 1 + r(h, std=0.1)}
    if arch != "Qwen2":
        sd["lm_head.weight"] = r(49152, h, std=0.2)
    for i in range(n_layers):
        p = f"model.layers.{i}."
        shapes = {"self_attn.q_proj": (heads * hd, h), "self_attn.k_proj": (kv * hd, h),
                  "self_attn.v_proj": (kv * hd, h), "self_attn.o_proj": (h, heads * hd),
                  "mlp.gate_proj": (ff, h), "mlp.up_proj": (ff, h), "mlp.down_proj": (h, ff)}
        for name, shape in shapes.items():
            sd[p + name + ".weight"] = r(*shape, std=1.5 / shape[1] ** 0.5)
        if arch == "Qwen2":
            for name in ("q_proj", "k_proj", "v_proj"):
                sd[p + f"self_attn.{name}.bias"] = r(shapes[f"self_attn.{name}"][0], std=0.5)
        sd[p + "input_layernorm.weight"] = 1 + r(h, std=0.1)
        sd[p + "post_attention_layernorm.weight"] = 1 + r(h, std=0.1)
    return _quantized_model(cfg, _fold_random_scales(sd, n_layers, seed), assets, 32, f"tiny-{arch.lower()}")


def _prescaled_hf(qm: QuantizedModel):
    sd = {k: v.float() for k, v in qm.dense.items()}
    for n, p in qm.linears.items():
        sd[n + ".weight"] = qm.prescaled[n].float()
        if p.bias is not None:
            sd[n + ".bias"] = p.bias.float()
    return _hf_model(qm.hf_config, fuse_expert_weights(sd))


def _canonical_hf(qm: QuantizedModel):
    return _hf_model(qm.hf_config, qm.dequantized_state_dict(torch.float32))


@torch.no_grad()
def _hf_logits(model, ids: list[int]) -> np.ndarray:
    return model(torch.tensor([ids])).logits[0].numpy()


def _llama_logits(path: Path, ids: list[int]) -> np.ndarray:
    llm = llama_cpp.Llama(str(path), n_ctx=64, n_batch=64, logits_all=True, verbose=False, n_threads=2)
    llm.reset()
    llm.eval(ids)
    out = np.array(llm.scores[: len(ids)], dtype=np.float32)
    llm.close()
    return out


def _kl(ref: np.ndarray, other: np.ndarray) -> float:
    p = torch.log_softmax(torch.from_numpy(ref).double(), -1)
    q = torch.log_softmax(torch.from_numpy(other).double(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gguf")


@pytest.fixture(scope="module")
def smol_files(smol, out_dir) -> dict[str, G.GGUFWriteResult]:
    return {v: G.write(smol, out_dir, v) for v in ("q4_1-awq", "f32", "q4_0", "q8_0", "q4_k_m")}


# ---------------------------------------------------------------------------------------------
# numerics in llama.cpp

def test_f32_gguf_matches_prescaled_model_in_llama_cpp(smol, smol_files):
    ref = _hf_logits(_prescaled_hf(smol), PROBE)
    got = _llama_logits(smol_files["f32"].path, PROBE)
    assert np.abs(got - ref).max() < 0.05
    assert smol_files["f32"].weights_source == "prescaled"


def test_transplant_matches_canonical_model_in_llama_cpp(smol, smol_files):
    ref = _hf_logits(_canonical_hf(smol), PROBE)
    got = _llama_logits(smol_files["q4_1-awq"].path, PROBE)
    kl = _kl(ref, got)
    agree = float((ref.argmax(-1) == got.argmax(-1)).mean())
    # llama.cpp quantizes activations to 8 bits for Q4_1 matmuls: small but nonzero noise
    assert kl < 0.02 and agree >= 0.85, (kl, agree)
    # the prescaled float model is further away than CPU noise, so the test would see a wrong file
    assert _kl(_hf_logits(_prescaled_hf(smol), PROBE), got) > kl


def test_requantized_types_load_and_track_the_float_model(smol, smol_files):
    ref = _llama_logits(smol_files["f32"].path, PROBE)
    kls = {v: _kl(ref, _llama_logits(smol_files[v].path, PROBE)) for v in ("q8_0", "q4_0", "q4_k_m")}
    assert kls["q8_0"] < 0.01 and kls["q8_0"] < kls["q4_0"], kls
    assert kls["q4_k_m"] < 0.5, kls


def test_kquant_types_and_fallbacks_are_reported(smol_files):
    r = smol_files["q4_k_m"]
    types = G.tensor_types(r.path)
    assert types["blk.0.ffn_down.weight"] in ("Q4_K", "Q6_K")  # 1536 columns: whole 256-blocks
    assert types["blk.0.attn_q.weight"] == "Q5_0"  # 576 columns: llama.cpp falls back
    assert any(f.startswith("blk.0.attn_q.weight") for f in r.fallbacks)
    assert not any("ffn_down" in f for f in r.fallbacks)
    assert types["token_embd.weight"] == "Q8_0"
    assert sum(r.tensor_types.values()) == len(types)


@pytest.mark.parametrize("arch", ["Mistral", "Qwen2"])
def test_other_llama_family_architectures_match(arch, smol, out_dir):
    qm = _tiny_random(arch, seed=3, assets=smol.assets)
    r = G.write(qm, out_dir, "f32")
    ids = PROBE[:10]
    ref = _hf_logits(_prescaled_hf(qm), ids)
    got = _llama_logits(r.path, ids)
    assert np.abs(ref).max() > 1.0  # logits large enough for a layout bug to show
    assert np.abs(got - ref).max() < 0.05
    names = set(G.tensor_types(r.path))
    assert ("output.weight" in names) == (arch != "Qwen2")
    assert ("blk.0.attn_q.bias" in names) == (arch == "Qwen2")


# ---------------------------------------------------------------------------------------------
# exact read-back of the transplant

def test_transplant_reads_back_bit_exact(smol, smol_files):
    back = G.read(smol_files["q4_1-awq"].path)
    assert set(back.linears) == set(smol.linears)
    for name, p in smol.linears.items():
        assert back.linears[name].equal(p), name
    for k, v in smol.dense.items():
        assert bitwise_equal(back.dense[k], v), k
    assert back.assets == smol.assets
    assert back.hf_config == smol.hf_config
    assert back.quant_config == smol.quant_config


def test_transplant_blocks_hold_the_canonical_codes(smol, smol_files):
    """gguf-py's own Q4_1 decoder sees (q - z) * s up to the fp16 rounding of m = -z * s."""
    from gguf import GGMLQuantizationType, quants

    got = quants.dequantize(GGUFFile(smol_files["q4_1-awq"].path).data("blk.1.ffn_down.weight"),
                            GGMLQuantizationType.Q4_1)
    p = smol.linears["model.layers.1.mlp.down_proj"]
    s = p.scales.float().repeat_interleave(p.group_size, 1)
    m = (-p.zeros.float() * p.scales.float()).half().float().repeat_interleave(p.group_size, 1)
    assert np.array_equal(got, (p.unpack().float() * s + m).numpy())


def test_read_refuses_requantized_variants(smol_files):
    with pytest.raises(FormatConstraintError, match="only gguf:q4_1-awq"):
        G.read(smol_files["q4_0"].path)


# ---------------------------------------------------------------------------------------------
# metadata and tokenizer

def test_tokenizer_matches_hf(smol_files):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(_smollm2_dir())
    llm = llama_cpp.Llama(str(smol_files["q4_0"].path), vocab_only=True, verbose=False)
    for s in TRICKY:
        hf = tok.encode(s, add_special_tokens=True)
        assert llm.tokenize(s.encode(), add_bos=True, special=True) == hf, repr(s)
    assert llm.token_bos() == tok.bos_token_id and llm.token_eos() == tok.eos_token_id
    assert llm.detokenize(tok.encode(TRICKY[4])).decode() == TRICKY[4]
    llm.close()


def test_metadata(smol, smol_files):
    reader = GGUFFile(smol_files["q4_0"].path)
    f = reader.fields.__getitem__
    assert f("general.architecture") == "llama"
    assert f("general.file_type") == 2 and f("general.quantization_version") == 2
    assert f("llama.rope.freq_base") == pytest.approx(100000.0)
    assert f("llama.attention.head_count_kv") == 3 and f("llama.rope.dimension_count") == 64
    assert f("tokenizer.ggml.model") == "gpt2" and f("tokenizer.ggml.pre") in ("gpt-2", "smollm")
    assert f("tokenizer.ggml.add_bos_token") is False
    assert len(f("tokenizer.ggml.tokens")) == 49152
    assert "<|im_start|>" in f("tokenizer.chat_template")
    assert f("awqconv.variant") == "q4_0" and "group_size=64" in f("awqconv.awq")
    assert "output.weight" not in reader.tensors  # tied embeddings: llama.cpp reuses token_embd
    assert smol_files["q4_0"].path.name == "smol2L-q4_0.gguf"
    assert G.detect(smol_files["q4_0"].path) and not G.detect(Path(__file__))


# ---------------------------------------------------------------------------------------------
# plan, fallbacks and errors

def _request(variant, cfg, bits=4, group=128, shapes=None):
    return ExportRequest(Target("gguf", variant), cfg, bits, group, True, torch.float16,
                         shapes or {"model.layers.0.mlp.down_proj": (576, 1536)})


def test_plan(smol):
    assert G.plan(_request(None, smol.hf_config)) == []
    assert G.plan(_request("q4_k_m", smol.hf_config)) == []
    bad_arch = {**smol.hf_config, "architectures": ["GPT2LMHeadModel"]}
    assert any("GPT2LMHeadModel has no GGUF writer" in p for p in G.plan(_request("q4_0", bad_arch)))
    assert any("multiple of 32" in p for p in G.plan(_request(None, smol.hf_config, group=16)))
    assert any("4-bit" in p for p in G.plan(_request("q4_1-awq", smol.hf_config, bits=3)))
    assert G.plan(_request("q4_0", smol.hf_config, bits=3, group=16)) == []
    assert any("unknown GGUF variant" in p for p in G.plan(_request("q9_9", smol.hf_config)))
    with pytest.raises(InputError):
        G.parse_variant("q9_9")


def test_unknown_architecture_fails_before_work(smol, out_dir):
    qm = copy.copy(smol)
    qm.hf_config = {**smol.hf_config, "architectures": ["FalconForCausalLM"]}
    with pytest.raises(UnsupportedArchitecture, match="FalconForCausalLM"):
        G.write(qm, out_dir / "nope", "q4_0")
    assert not (out_dir / "nope").exists()


def test_missing_prescaled_falls_back_and_reports(smol, out_dir, caplog):
    """Without prescaled weights the dequantized canonical ones are written (and that is reported):
    an f32 file of them is awqconv's own fake-quant model, which llama.cpp must reproduce."""
    qm = copy.copy(smol)
    qm.prescaled = None
    sub = out_dir / "noprescale"
    sub.mkdir()
    with caplog.at_level(logging.WARNING):
        r = G.write(qm, sub, "f32")
    assert r.weights_source == "dequantized canonical" and r.warnings
    assert "prescaled" in caplog.text
    ref = _hf_logits(_canonical_hf(smol), PROBE)
    assert np.abs(_llama_logits(r.path, PROBE) - ref).max() < 0.05


def test_width_not_divisible_by_block_falls_back_to_f16(smol, out_dir):
    qm = _tiny_random("Mistral", seed=5, assets=smol.assets)
    # give down_proj 240 input columns (not whole 32-blocks): resize ff to 240
    cfg = {**qm.hf_config, "intermediate_size": 240}
    sd = {k: v for k, v in qm.dense.items()}
    for n, w in qm.prescaled.items():
        if "gate_proj" in n or "up_proj" in n:
            w = w[:240]
        if "down_proj" in n:
            w = w[:, :240]
        sd[n + ".weight"] = w
    qm2 = _quantized_model(cfg, sd, smol.assets, 16, "tiny-odd")
    sub = out_dir / "odd"
    sub.mkdir()
    r = G.write(qm2, sub, "q4_0")
    assert any("ffn_down" in f and "F16" in f for f in r.fallbacks)
    assert G.tensor_types(r.path)["blk.0.ffn_down.weight"] == "F16"
    got = _llama_logits(r.path, PROBE[:6])
    assert np.isfinite(got).all()
    with pytest.raises(FormatConstraintError, match="multiple of 32"):
        G.write(qm2, sub, "q4_1-awq")


# ---------------------------------------------------------------------------------------------
# SentencePiece-style vocabulary (Llama-2 / Mistral layout: byte fallback, ▁ prefix, <0xXX> tokens)

def _spm_tokenizer_assets() -> dict[str, bytes]:
    """A small BPE-with-byte-fallback tokenizer trained here on the held-out text, laid out like
    the tokenizer.json of a converted SentencePiece model (ids: <unk> <s> </s>, 256 bytes, pieces)."""
    import json

    from tokenizers import Tokenizer, models, normalizers, trainers

    root = Path(__file__).resolve().parents[2]
    lines = (root / "awqconv" / "data" / "eval_heldout.txt").read_text().splitlines()[:2000]
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=1200, show_progress=False))
    j = json.loads(tok.to_str())
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for t, _ in sorted(j["model"]["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(t, len(vocab))
    j["model"]["vocab"] = vocab
    j["added_tokens"] = [{"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for i, c in enumerate(("<unk>", "<s>", "</s>"))]
    bos = {"SpecialToken": {"id": "<s>", "type_id": 0}}
    j["post_processor"] = {"type": "TemplateProcessing", "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
                           "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                           "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}}
    j["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"},
        {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
              "tokenizer_class": "PreTrainedTokenizerFast"}
    return {"tokenizer.json": json.dumps(j).encode(), "tokenizer_config.json": json.dumps(config).encode()}


def test_sentencepiece_vocabulary_matches_hf(out_dir):
    from transformers import AutoTokenizer

    assets = _spm_tokenizer_assets()
    qm = _tiny_random("Mistral", seed=7, assets=assets)
    n_vocab = len(__import__("json").loads(assets["tokenizer.json"])["model"]["vocab"])
    qm.hf_config["vocab_size"] = n_vocab
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        qm.dense[k] = qm.dense[k][:n_vocab]
    sub = out_dir / "spm"
    sub.mkdir()
    r = G.write(qm, sub, "f32")
    for name, data in assets.items():
        (sub / name).write_bytes(data)
    tok = AutoTokenizer.from_pretrained(sub)
    fields = GGUFFile(r.path).fields
    assert fields["tokenizer.ggml.model"] == "llama" and fields["tokenizer.ggml.add_bos_token"] is True
    llm = llama_cpp.Llama(str(r.path), vocab_only=True, verbose=False)
    for s in TRICKY + ["The quick brown fox", "a  b", "end "]:
        assert llm.tokenize(s.encode(), add_bos=True, special=True) == tok.encode(s), repr(s)
    llm.close()
    ids = tok.encode("The model works fine today.")
    assert np.abs(_llama_logits(r.path, ids) - _hf_logits(_prescaled_hf(qm), ids)).max() < 0.05


def test_transplant_of_bf16_qwen2_with_qkv_bias(smol, out_dir):
    qm = _tiny_random("Qwen2", seed=1, assets=smol.assets)
    qm.dense = {k: v.to(torch.bfloat16) for k, v in qm.dense.items()}
    sub = out_dir / "qwen2-bf16"
    sub.mkdir()
    r = G.write(qm, sub)
    assert r.tensor_types == {"BF16": 1, "F32": 11, "Q4_1": 14}  # tied embedding kept in bf16
    back = G.read(sub)
    assert all(bitwise_equal(back.dense[k], v) for k, v in qm.dense.items())
    assert all(back.linears[n].equal(p) for n, p in qm.linears.items())
    assert back.linears["model.layers.0.self_attn.q_proj"].bias is not None
    ref = _hf_logits(_canonical_hf(qm), PROBE[:8])
    assert _kl(ref, _llama_logits(r.path, PROBE[:8])) < 0.02
