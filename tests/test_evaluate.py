"""Perplexity protocol and the fake-quant reference model."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from awqconv._io import load_checkpoint
from awqconv.errors import InputError
from awqconv.evaluate import perplexity, perplexity_of_ids
from awqconv.reference import load_tokenizer_from_assets, reference_model
from awqconv.sources import load_causal_lm
from tests.tiny_models import tiny_model_dir
from tests.fixtures_helpers import qm_from_dir, smollm2

HELDOUT = Path(__file__).resolve().parent.parent / "awqconv" / "data" / "eval_heldout.txt"


def test_smollm2_finds_repeated_text_easier_than_random_tokens() -> None:
    model, tok = smollm2()
    repeated = "The quick brown fox jumps over the lazy dog. " * 40
    ppl_repeated = perplexity(model, tok, repeated, seq_len=64, max_windows=2, progress=False)
    g = torch.Generator().manual_seed(0)
    random_ids = torch.randint(0, len(tok), (128,), generator=g)
    ppl_random = perplexity_of_ids(model, random_ids, seq_len=64, progress=False)
    assert ppl_repeated < 10 and ppl_random > 1000


def test_smollm2_perplexity_on_heldout_prose_is_plausible() -> None:
    model, tok = smollm2()
    ppl = perplexity(model, tok, HELDOUT.read_text(), seq_len=128, max_windows=4, progress=False)
    assert 5 < ppl < 60  # a working 135M LM on English docstrings; a broken load gives thousands


def test_windows_are_non_overlapping_and_scored_like_the_hf_loss() -> None:
    model, tok = load_causal_lm(tiny_model_dir("Qwen3ForCausalLM"))
    text = HELDOUT.read_text()[:4000]
    ids = tok(text, return_tensors="pt")["input_ids"][0]
    seq_len, n = 32, 5
    with torch.no_grad():
        losses = [
            model(
                input_ids=ids[i * seq_len : (i + 1) * seq_len][None], labels=ids[i * seq_len : (i + 1) * seq_len][None]
            ).loss
            for i in range(n)
        ]
    expect = math.exp(torch.stack(losses).double().mean().item())
    for batch_size in (1, 2, 8):
        got = perplexity(model, tok, text, seq_len=seq_len, max_windows=n, batch_size=batch_size, progress=False)
        assert got == pytest.approx(expect, rel=1e-5)


def test_text_shorter_than_one_window_is_an_input_error() -> None:
    model, tok = load_causal_lm(tiny_model_dir("LlamaForCausalLM"))
    with pytest.raises(InputError, match="fewer than one window of 512"):
        perplexity(model, tok, "Too short.", seq_len=512, progress=False)


@pytest.mark.parametrize(
    "arch", ["LlamaForCausalLM", "Qwen2ForCausalLM", "GemmaForCausalLM", "MixtralForCausalLM", "Phi3ForCausalLM"]
)
def test_reference_model_holds_the_dequantized_weights(arch: str, tmp_path: Path) -> None:
    qm = qm_from_dir(tiny_model_dir(arch))
    ref = reference_model(qm, dtype=torch.float32)
    assert type(ref).__name__ == arch and not ref.training
    ref.save_pretrained(tmp_path)  # back to checkpoint names (per-expert MoE keys, tied head dropped)
    saved = load_checkpoint(tmp_path)
    expect = qm.dequantized_state_dict(torch.float32)
    if ref.config.tie_word_embeddings:
        expect.pop("lm_head.weight", None)
        assert ref.get_output_embeddings().weight.data_ptr() == ref.get_input_embeddings().weight.data_ptr()
    assert saved.keys() == expect.keys()
    for key, value in expect.items():
        assert torch.equal(saved[key], value), key
    some_linear = next(iter(qm.linears))
    original = load_checkpoint(tiny_model_dir(arch))[f"{some_linear}.weight"]
    assert not torch.equal(saved[f"{some_linear}.weight"], original)  # really the quantized values


def test_reference_model_runs_in_bf16() -> None:
    qm = qm_from_dir(tiny_model_dir("LlamaForCausalLM"))
    ref = reference_model(qm, dtype=torch.bfloat16)
    assert ref.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.isfinite(ref(torch.tensor([[1, 2, 3]])).logits).all()


def test_tokenizer_is_rebuilt_from_assets() -> None:
    path = tiny_model_dir("LlamaForCausalLM")
    qm = qm_from_dir(path)
    _, original = load_causal_lm(path)
    rebuilt = load_tokenizer_from_assets(qm)
    text = "def f(x):\n    return x ** 2  # squares ünïcode"
    assert rebuilt(text)["input_ids"] == original(text)["input_ids"]
    assert rebuilt.chat_template == original.chat_template
    qm.assets = {k: v for k, v in qm.assets.items() if k == "generation_config.json"}
    with pytest.raises(InputError, match="no tokenizer files"):
        load_tokenizer_from_assets(qm)
