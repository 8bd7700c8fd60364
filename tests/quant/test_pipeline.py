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


def test_gram_loss_equals_the_output_error_over_every_token() -> None:
    from awqconv.quant.pipeline import _gram_loss, _linear_loss

    class Slot:
        def __init__(self, w: torch.Tensor) -> None:
            self.weight = w

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 48, generator=g) * torch.rand(48, generator=g) * 4  # outlier-ish channels
    slots = [Slot(torch.randn(16, 48, generator=g)), Slot(torch.randn(8, 48, generator=g))]
    by_gram, by_tokens = _gram_loss(slots, x.T @ x, x.shape[0]), _linear_loss(slots, x)
    assert by_gram() == pytest.approx(0.0, abs=1e-9)
    for s in slots:
        s.weight = s.weight + 0.05 * torch.randn(s.weight.shape, generator=g)
    assert by_gram() > 0
    assert by_gram() == pytest.approx(by_tokens(), rel=1e-4)


@pytest.mark.parametrize("n,k", [(128, 16), (10, 3), (5, 5), (7, 1), (3, 9)])
def test_search_subset_is_spread_over_the_calibration_blocks(n: int, k: int) -> None:
    from awqconv.quant.pipeline import search_first_order

    order = search_first_order(n, k).tolist()
    assert sorted(order) == list(range(n))  # a permutation: every block still feeds the statistics
    head = order[: min(k, n)]
    assert head == sorted(head) and head[0] == 0
    if 1 < k < n:  # the search subset reaches the end of the calibration text, evenly spaced
        assert head[-1] == n - 1
        gaps = [b - a for a, b in zip(head, head[1:])]
        assert max(gaps) - min(gaps) <= 1
