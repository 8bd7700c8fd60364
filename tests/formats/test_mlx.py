"""Our mlx exports judged by MLX itself (``mlx`` + ``mlx-lm``, CPU backend on Linux).

1. Packing: ``mx.dequantize`` of what ``to_mlx`` writes gives the canonical weights up to the one
   rounding of the bias -z*s, for every bit width MLX packs.
2. ``mlx_lm.load`` loads the export of every family the writer supports (tiny fixtures, a Gemma 3
   with global layers and a 4-token window, a Llama 3 RoPE) with strict key checking. Computing in
   fp32 (``set_dtype``) its logits are within 2% of max |logit| of the fake-quant reference (measured
   0.1-0.4%, Phi-3 1.3%: the fp16 rounding of the biases -z*s, amplified by the fixtures' activation
   outliers; a wrong layout or RoPE gives tens of percent), and its greedy tokens
   (mlx-lm's own cached decode) equal the reference's or part at a reference near-tie. As stored
   (fp16) the tiny fixtures' outliers cost up to 10% of max |logit| (measured), checked under 15%.
3. read() gives back the canonical model bit for bit; an mlx-lm ``convert`` output (float biases)
   is refused by name. 4. ``awqconv export ... --to mlx`` through the CLI.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

mx = pytest.importorskip("mlx.core")
mlx_lm = pytest.importorskip("mlx_lm")

from mlx_lm.generate import generate_step  # noqa: E402
from mlx_lm.utils import load_model  # noqa: E402

from awqconv.cli import main  # noqa: E402
from awqconv.errors import FormatConstraintError  # noqa: E402
from awqconv.formats import ExportRequest, Target, mlx  # noqa: E402
from awqconv.reference import reference_model  # noqa: E402
from tests.fixtures_helpers import assert_same_model, qm_from_dir  # noqa: E402
from tests.runtime.family_models import family_qm  # noqa: E402
from tests.tiny_models import tiny_model_dir  # noqa: E402

IDS = [1, 5, 9, 33, 2, 7, 100, 3, 4, 5, 6, 7, 8, 9, 10, 11]
NEW = 6
FP32_TOL, FP16_TOL = 2e-2, 0.15
# Mistral runs through the same mlx-lm module as Llama (tested by hand: 9.1% fp16, top-1 1.0)
FAMILIES = ["LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "GemmaForCausalLM",
            "Gemma2ForCausalLM", "Phi3ForCausalLM", "MixtralForCausalLM", "Qwen3MoeForCausalLM"]
FULL, SLIDING = "full_attention", "sliding_attention"


def _export(qm, tmp_path: Path) -> Path:
    out = tmp_path / "mlx"
    out.mkdir()
    mlx.write(qm, out)
    return out


def _logits(model, ids: list[int]) -> np.ndarray:
    return np.array(model(mx.array([ids])).astype(mx.float32))[0]


def _check_against_reference(qm, out: Path, fp16_tol: float | None = FP16_TOL) -> float:
    """Logits (as stored, then fp32) and greedy tokens of mlx-lm against the reference; returns the fp32 error."""
    model, _ = load_model(out)  # strict: every parameter of mlx-lm's model present, nothing extra
    ref = reference_model(qm)
    ids = [i % qm.hf_config["vocab_size"] for i in IDS]
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0].numpy()
    scale = np.abs(want).max()
    if fp16_tol is not None:
        got = _logits(model, ids)
        assert np.abs(got - want).max() / scale < fp16_tol
        assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.8  # fp16 flips near-ties: measured 0.94-1.0
    model.set_dtype(mx.float32)
    err = float(np.abs(_logits(model, ids) - want).max() / scale)
    assert err < FP32_TOL
    ours = [int(t) for t, _ in zip((tok for tok, _ in generate_step(mx.array(ids), model)), range(NEW))]
    with torch.no_grad():
        ref_toks = ref.generate(torch.tensor([ids]), max_new_tokens=NEW, min_new_tokens=NEW,
                                do_sample=False)[0, len(ids):].tolist()
    i = next((j for j, (a, b) in enumerate(zip(ours, ref_toks)) if a != b), None)
    if i is not None:  # a divergence is allowed only where the reference nearly ties the two tokens
        with torch.no_grad():
            lg = ref(torch.tensor([ids + ref_toks[:i]])).logits[0, -1]
        assert (lg[ref_toks[i]] - lg[ours[i]]) / lg.abs().max() <= FP32_TOL, (i, ours, ref_toks)
    return err


@pytest.mark.parametrize("bits", mlx.BITS)
def test_mx_dequantize_reads_our_packing(make_packed, bits):
    p = make_packed(8, 256, 64, bits=bits, seed=bits)
    parts = mlx.to_mlx(p, torch.float16)
    w = mx.array(parts["weight"].numpy())
    s, b = (mx.array(parts[k].float().numpy()) for k in ("scales", "biases"))
    got = np.array(mx.dequantize(w, s, b, group_size=64, bits=bits))
    stored_bias = np.repeat(parts["biases"].float().numpy(), 64, axis=1)
    exact_bias = np.repeat(-(p.zeros.double() * p.scales.double()).numpy(), 64, axis=1)
    want = p.dequantize(torch.float64).numpy() + (stored_bias - exact_bias)  # only the bias was rounded
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * np.abs(want).max())
    assert np.abs(stored_bias - exact_bias).max() <= np.abs(exact_bias).max() * 2.0**-11


@pytest.mark.parametrize("arch", FAMILIES)
def test_mlx_lm_runs_each_family_like_the_reference(arch, tmp_path):
    qm = qm_from_dir(tiny_model_dir(arch), group_size=64)
    out = _export(qm, tmp_path)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization"] == {"group_size": 64, "bits": 4, "mode": "affine"} == cfg["quantization_config"]
    assert cfg["rope_theta"] == qm.hf_config["rope_parameters"]["rope_theta"]  # mlx-lm's defaults differ
    _check_against_reference(qm, out)


def test_mlx_lm_load_with_tokenizer_generates(tmp_path):
    """The user's path: mlx_lm.load (model + tokenizer from our files) and mlx_lm.generate."""
    qm = qm_from_dir(tiny_model_dir("Qwen3ForCausalLM"), group_size=128)
    out = _export(qm, tmp_path)
    model, tokenizer = mlx_lm.load(str(out))
    assert isinstance(model.model.layers[0].self_attn.q_proj, mx_nn().QuantizedLinear)
    assert model.model.layers[0].self_attn.q_proj.group_size == 128
    assert not isinstance(model.model.embed_tokens, mx_nn().QuantizedEmbedding)  # kept float
    text = mlx_lm.generate(model, tokenizer, prompt="The capital of France is", max_tokens=4)
    assert isinstance(text, str) and text


def mx_nn():
    import mlx.nn

    return mlx.nn


def test_gemma3_global_layers_window_and_scaled_rope(tmp_path):
    """layer_types -> sliding_window_pattern, nested rope_parameters -> rope_theta / rope_scaling /
    rope_local_base_freq; a 4-token window acts on the 16-token prompt."""
    qm = family_qm("Gemma3ForCausalLM", layer_types=[SLIDING, FULL], sliding_window=4, query_pre_attn_scalar=24,
                   rope_parameters={SLIDING: {"rope_type": "default", "rope_theta": 10000.0},
                                    FULL: {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}})
    out = _export(qm, tmp_path)
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["sliding_window_pattern"], cfg["rope_local_base_freq"], cfg["rope_scaling"]["factor"]) == (2, 1e4, 8.0)
    _check_against_reference(qm, out, fp16_tol=None)


def test_llama3_rope_scaling(tmp_path):
    qm = family_qm("LlamaForCausalLM", rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8})
    _check_against_reference(qm, _export(qm, tmp_path), fp16_tol=None)


def _request(qm, **kw) -> ExportRequest:
    fields = dict(target=Target("mlx"), hf_config=qm.hf_config, bits=4, group_size=qm.quant_config.group_size,
                  zero_point=True, scale_dtype=torch.float16,
                  linear_shapes={n: (p.out_features, p.in_features) for n, p in qm.linears.items()})
    return ExportRequest(**{**fields, **kw})


@pytest.mark.parametrize("change, words", [
    (dict(group_size=256), "group sizes 32, 64, 128"),
    (dict(group_size=-1), "group sizes 32, 64, 128"),
    (dict(bits=7), "not 7-bit"),
    (dict(bits=8, scale_dtype=torch.bfloat16), "bf16 scales"),
    (dict(target=Target("mlx", "q4")), "no variant"),
    (dict(hf_config={"architectures": ["GPT2LMHeadModel"]}), "GPT2LMHeadModel has no mlx writer"),
])
def test_plan_refuses_what_mlx_cannot_hold(tiny_qm, change, words):
    problems = mlx.plan(_request(tiny_qm, **change))
    assert any(words in p for p in problems), problems
    assert mlx.plan(_request(tiny_qm)) == []


@pytest.mark.parametrize("arch, overrides, words", [
    ("Qwen2ForCausalLM", {}, "hidden_size / num_attention_heads = 16"),  # head_dim 32 != 64 / 4
    ("Gemma3ForCausalLM", dict(final_logit_softcapping=4.0), "does not soft-cap"),
    ("Gemma3ForCausalLM", dict(layer_types=[SLIDING, SLIDING]), "full-attention layer"),
    ("Qwen3ForCausalLM", dict(attention_bias=True), "no attention biases"),
])
def test_plan_refuses_configs_mlx_lm_computes_differently(arch, overrides, words):
    qm = family_qm(arch, **overrides)
    problems = mlx.plan(_request(qm, group_size=32))
    assert any(words in p for p in problems), problems
    with pytest.raises(FormatConstraintError, match=words.split(" = ")[0]):
        mlx.write(qm, Path("/nonexistent-never-written"))


def test_read_gives_back_the_canonical_model(tiny_qm, tmp_path):
    out = _export(tiny_qm, tmp_path)
    assert mlx.detect(out)
    assert_same_model(tiny_qm, mlx.read(out))


def test_read_restores_moe_expert_names(tmp_path):
    qm = qm_from_dir(tiny_model_dir("MixtralForCausalLM"), group_size=64)  # block_sparse_moe.experts.{e}.w1
    back = mlx.read(_export(qm, tmp_path))
    assert set(back.linears) == set(qm.linears) and set(back.dense) == set(qm.dense)
    assert all(back.linears[n].equal(p) for n, p in qm.linears.items())


def test_read_refuses_mlx_lm_own_quantization(tmp_path):
    """mlx-lm's convert picks float offsets per group: no integer zero points to recover."""
    from mlx_lm.utils import quantize_model, save_config, save_model

    model, config = load_model(tiny_model_dir("LlamaForCausalLM"))
    model, config = quantize_model(model, config, group_size=64, bits=4)
    save_model(tmp_path, model)
    save_config(config, tmp_path / "config.json")
    assert mlx.detect(tmp_path)
    with pytest.raises(FormatConstraintError, match="mlx-lm's own quantizer stores float offsets"):
        mlx.read(tmp_path)


def test_cli_export_from_canonical(tmp_path):
    from awqconv.api import write_artifacts
    from awqconv.formats import parse_targets

    qm = qm_from_dir(tiny_model_dir("Qwen3ForCausalLM"), group_size=32)
    write_artifacts(qm, parse_targets("canonical"), tmp_path / "q")
    res = CliRunner().invoke(main, ["export", str(tmp_path / "q" / "canonical"), "--to", "mlx",
                                    "-o", str(tmp_path / "e")], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    out = tmp_path / "e" / "mlx"
    assert json.loads((out / "config.json").read_text())["quantization"]["group_size"] == 32
    _check_against_reference(qm, out, fp16_tol=None)
