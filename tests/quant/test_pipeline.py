"""The layer loop end to end on tiny models of every supported architecture."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from awqconv.config import QuantConfig
from awqconv.model import QuantizedModel
from awqconv.quant.calib import build_blocks, load_calibration_texts
from awqconv.quant.grid import IntGrid
from awqconv.quant.mappings import ARCHITECTURES
from awqconv.quant.pipeline import quantize_model
from awqconv.sources import load_hf_config
from tests.tiny_models import tiny_model_dir

CALIB = dict(calib_samples=8, calib_seq_len=128, search_tokens=512, clip_n_tokens=128, group_size=32)


def _load(arch: str, dtype=torch.float32):
    path = tiny_model_dir(arch)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    return model, load_hf_config(path), path


def _blocks(path, n: int, seq: int) -> torch.Tensor:
    tok = AutoTokenizer.from_pretrained(path)
    return build_blocks(load_calibration_texts("builtin"), tok, n, seq).ids


def _heldout_ids(path, n: int = 4, seq: int = 128) -> torch.Tensor:
    tok = AutoTokenizer.from_pretrained(path)
    text = open("awqconv/data/eval_heldout.txt", encoding="utf-8").read()[:60000]
    return build_blocks([text], tok, n, seq).ids


def _output_error(arch: str, qm: QuantizedModel, ids: torch.Tensor, ref: torch.Tensor) -> float:
    model, _, _ = _load(arch)
    missing, unexpected = model.load_state_dict(qm.dequantized_state_dict(), strict=False)
    assert not unexpected, unexpected
    assert all(k == "lm_head.weight" for k in missing), missing  # tied heads are re-tied by the model
    with torch.no_grad():
        out = model(ids).logits
    return float((out - ref).pow(2).mean())


def _run(arch: str, cfg: QuantConfig, blocks):
    model, hf, _ = _load(arch)
    out = quantize_model(model, hf, cfg, blocks, progress=False)
    return QuantizedModel(hf, cfg, out.linears, out.dense, out.search), out


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_awq_is_never_worse_than_rtn(arch: str) -> None:
    model, hf, path = _load(arch)
    ids = _heldout_ids(path)
    with torch.no_grad():
        ref = model(ids).logits
    blocks = _blocks(path, CALIB["calib_samples"], CALIB["calib_seq_len"])
    rtn, _ = _run(arch, QuantConfig(method="rtn", group_size=32), None)
    awq, out = _run(arch, QuantConfig(**CALIB), blocks)
    assert len(awq.search.scales) >= 4 * hf["num_hidden_layers"]
    assert awq.search.clips, "clip search ran"
    assert all(r.loss_after <= r.loss_before for r in awq.search.scales)
    e_rtn, e_awq = _output_error(arch, rtn, ids, ref), _output_error(arch, awq, ids, ref)
    assert e_awq <= e_rtn, f"{arch}: AWQ logit MSE {e_awq:.4g} > RTN {e_rtn:.4g}"


def test_rtn_is_the_integer_grid_applied_to_the_source_weights() -> None:
    model, hf, _ = _load("Qwen2ForCausalLM")
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    qm, out = _run("Qwen2ForCausalLM", QuantConfig(method="rtn", group_size=64), None)
    grid = IntGrid(4, 64, True, torch.float16)
    name = "model.layers.1.self_attn.k_proj"
    expected = grid.pack(weights[f"{name}.weight"], weights[f"{name}.bias"])
    assert qm.linears[name].equal(expected)
    assert torch.equal(qm.dense["model.layers.1.input_layernorm.weight"], weights["model.layers.1.input_layernorm.weight"])
    assert not out.search.scales


def test_bf16_model_keeps_bf16_scales_and_searches_in_fp32() -> None:
    model, hf, path = _load("LlamaForCausalLM", dtype=torch.bfloat16)
    out = quantize_model(model, hf, QuantConfig(**CALIB), _blocks(path, 4, 128), progress=False)
    p = next(iter(out.linears.values()))
    assert p.scales.dtype == torch.bfloat16
    assert all(torch.isfinite(r.scales).all() for r in out.search.scales)
    assert out.dense["model.norm.weight"].dtype == torch.bfloat16


@pytest.mark.parametrize(
    "overrides",
    [dict(w_bit=3), dict(w_bit=8, group_size=64), dict(zero_point=False), dict(group_size=-1), dict(apply_clip=False, duo_scaling=False)],
)
def test_grid_variants_round_trip_through_the_pipeline(overrides) -> None:
    cfg = QuantConfig(**{**CALIB, "calib_samples": 2, **overrides})
    model, hf, path = _load("MistralForCausalLM")
    out = quantize_model(model, hf, cfg, _blocks(path, 2, 128), progress=False)
    for name, p in out.linears.items():
        assert p.bits == cfg.w_bit
        assert p.group_size == (p.in_features if cfg.group_size == -1 else cfg.group_size)
        if not cfg.zero_point:
            assert bool((p.zeros == 1 << (cfg.w_bit - 1)).all())
        # the canonical integers reproduce the prescaled weights up to the grid step
        w = out.prescaled[name].float()
        step = p.scales.float().repeat_interleave(p.group_size, 1)
        assert bool(((p.dequantize() - w).abs() <= step * 0.5 + 1e-3 + w.abs() * 1e-3).all())
