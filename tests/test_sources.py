"""Model sources: path/Hub/builtin resolution errors, the materialized SmolLM2, tiny models, loading checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from awqconv.errors import InputError
from awqconv.sources import (
    BUILTIN_MARKER,
    check_finite,
    collect_assets,
    load_causal_lm,
    load_hf_config,
    resolve_model,
    smollm2_gguf_path,
)
from tests.tiny_models import TINY_ARCHS, build_tiny_model, outlier_channels, smollm2_dir, tiny_model_dir


def test_missing_local_path_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        resolve_model(str(tmp_path / "no-such-model"))
    with pytest.raises(InputError, match="does not exist"):
        resolve_model("./relative/missing")


def test_a_file_is_not_a_model_directory(tmp_path: Path) -> None:
    f = tmp_path / "model.gguf"
    f.write_bytes(b"GGUF")
    with pytest.raises(InputError, match="is a file"):
        resolve_model(str(f))


def test_unknown_builtin_lists_the_known_ones() -> None:
    with pytest.raises(InputError, match="builtin:smollm2-135m"):
        resolve_model("builtin:gpt-9")


def test_hub_id_offline_names_the_id_and_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = "awqconv-tests/not-downloaded-model"
    with pytest.raises(InputError) as err:
        resolve_model(repo)
    msg = str(err.value)
    assert repo in msg and "local model directory" in msg


def test_a_local_directory_resolves_to_itself(tmp_path: Path) -> None:
    assert resolve_model(str(tmp_path)) == tmp_path.resolve()


def test_encoder_model_is_rejected_as_not_causal(tmp_path: Path) -> None:
    from transformers import BertConfig

    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    cfg.architectures = ["BertModel"]
    cfg.save_pretrained(tmp_path)
    with pytest.raises(InputError, match=r"not a causal language model \(architectures=\['BertModel'\]\)"):
        load_causal_lm(tmp_path)


def test_directory_without_config_or_weights(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no config.json"):
        load_hf_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    with pytest.raises(InputError, match="no \\*.safetensors"):
        load_causal_lm(tmp_path)


def test_remote_code_is_not_run_unless_asked(tmp_path: Path) -> None:
    src = tiny_model_dir("LlamaForCausalLM")
    for f in src.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "modeling_evil.py").write_text("raise RuntimeError('remote code ran')\n")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["auto_map"] = {
        "AutoConfig": "modeling_evil.EvilConfig",
        "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM",
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    model, _ = load_causal_lm(tmp_path)  # a type transformers knows: its own class, the code never runs
    assert type(model).__name__ == "LlamaForCausalLM"
    cfg["model_type"] = "evil_model"  # a type only the repository's code knows
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="trust-remote-code"):
        load_causal_lm(tmp_path)


def test_check_finite_names_the_first_bad_tensor() -> None:
    model, _ = load_causal_lm(tiny_model_dir("Qwen2ForCausalLM"))
    check_finite(model)  # the fixture itself is clean
    with torch.no_grad():
        model.model.layers[1].self_attn.k_proj.bias[3] = float("inf")
    with pytest.raises(InputError, match=r"model\.layers\.1\.self_attn\.k_proj\.bias holds 1 NaN/inf"):
        check_finite(model)


def test_pickled_weights_load_through_weights_only(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    src = tiny_model_dir("LlamaForCausalLM")
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            (tmp_path / f.name).write_bytes(f.read_bytes())
    state = load_file(src / "model.safetensors")
    torch.save(state, tmp_path / "pytorch_model.bin")
    model, _ = load_causal_lm(tmp_path)
    got = model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in state.items())


def test_collect_assets_takes_tokenizer_files_and_never_weights() -> None:
    assets = collect_assets(tiny_model_dir("LlamaForCausalLM"))
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"} <= set(assets)
    assert not any(name.endswith((".safetensors", ".bin")) or name == "config.json" for name in assets)
    assert json.loads(assets["tokenizer_config.json"])  # bytes are the files verbatim


@pytest.mark.parametrize("arch", sorted(TINY_ARCHS))
def test_tiny_model_loads_and_runs(arch: str) -> None:
    model, tok = load_causal_lm(tiny_model_dir(arch))
    cfg = model.config
    assert type(model).__name__ == arch
    assert cfg.num_hidden_layers == 2 and cfg.hidden_size == 128 and cfg.vocab_size == len(tok)
    ids = tok("Return the number of items in a container.", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok)) and torch.isfinite(logits).all()


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Gemma2ForCausalLM", "Phi3ForCausalLM"])
def test_tiny_model_has_activation_outliers_on_fixed_channels(arch: str) -> None:
    model, tok = load_causal_lm(tiny_model_dir(arch))
    seen: dict[str, torch.Tensor] = {}
    attn = model.model.layers[0].self_attn
    first = attn.qkv_proj if hasattr(attn, "qkv_proj") else attn.q_proj

    def record(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        seen["x"] = inputs[0].abs().mean(dim=(0, 1))

    first.register_forward_hook(record)
    with torch.no_grad():
        model(tok("A short calibration sentence about files and sockets.", return_tensors="pt").input_ids)
    x = seen["x"]
    outliers = outlier_channels(model.config.hidden_size)
    others = torch.ones_like(x, dtype=torch.bool)
    others[outliers] = False
    assert x[outliers].min() > 10 * x[others].median()


def test_tiny_model_build_is_deterministic(tmp_path: Path) -> None:
    a = build_tiny_model("MixtralForCausalLM", tmp_path / "a", seed=3)
    b = build_tiny_model("MixtralForCausalLM", tmp_path / "b", seed=3)
    c = build_tiny_model("MixtralForCausalLM", tmp_path / "c", seed=4)
    from awqconv._io import load_checkpoint

    sa, sb, sc = load_checkpoint(a), load_checkpoint(b), load_checkpoint(c)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.layers.0.self_attn.q_proj.weight"], sc["model.layers.0.self_attn.q_proj.weight"])
    assert any(".experts.3." in k for k in sa)  # 4 experts, saved per expert


def test_bf16_tiny_model_keeps_its_dtype(tmp_path: Path) -> None:
    path = build_tiny_model("LlamaForCausalLM", tmp_path / "bf16", dtype=torch.bfloat16)
    assert load_hf_config(path)["dtype"] == "bfloat16"
    model, _ = load_causal_lm(path)
    assert model.dtype == torch.bfloat16


@pytest.mark.slow
def test_builtin_smollm2_is_a_float_hf_directory_matching_the_gguf() -> None:
    """Materialized once per cache (~20 s); its weights equal the GGUF's own dequantization."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors import safe_open

    path = resolve_model("builtin:smollm2-135m")
    assert path == smollm2_dir()
    assert (path / BUILTIN_MARKER).is_file()
    cfg = load_hf_config(path)
    assert "quantization_config" not in cfg and cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["num_hidden_layers"] == 30 and cfg["hidden_size"] == 576

    reader = GGUFReader(smollm2_gguf_path())
    tensors = {t.name: t for t in reader.tensors}
    with safe_open(path / "model.safetensors", "pt") as f:
        for gguf_name, hf_name in [
            ("blk.7.ffn_down.weight", "model.layers.7.mlp.down_proj.weight"),
            ("blk.0.attn_v.weight", "model.layers.0.self_attn.v_proj.weight"),
            ("output_norm.weight", "model.norm.weight"),
        ]:
            t = tensors[gguf_name]
            expect = dequantize(t.data, t.tensor_type).reshape(list(reversed(t.shape.tolist())))
            got = f.get_tensor(hf_name)
            assert got.dtype == torch.float32
            np.testing.assert_array_equal(got.numpy(), expect.astype(np.float32))

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    assert "<|im_start|>" in (tok.chat_template or "")
    text = [{"role": "user", "content": "Name a prime number."}]
    rendered = tok.apply_chat_template(text, tokenize=False, add_generation_prompt=True)
    assert rendered.rstrip().endswith("<|im_start|>assistant")
