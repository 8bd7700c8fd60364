"""The PEFT-trainable layout: plain transformers loads it, plain peft trains LoRA on it, and the base
still converts back to the canonical INT4 model bit for bit; a changed base is refused; adapters
are kept separate or merged onto the same grid."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from awqconv.formats import detect_format
from awqconv.formats import peft as peft_format
from awqconv.formats.adapter import apply_adapter, copy_adapter
from awqconv.packed import bitwise_equal
from fixtures_helpers import TOY_SENTENCES, assert_same_model, train_steps

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

SENTENCES = TOY_SENTENCES




def lora_config(**kw):
    return peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", **kw)




@pytest.fixture(scope="module")
def exported(tiny_qm, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("peft")
    peft_format.write(tiny_qm, out, None)
    return out


def test_layout_loads_with_plain_transformers_on_the_grid(tiny_qm, exported):
    cfg = json.loads((exported / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert detect_format(exported) == "peft"
    model = transformers.AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32)
    sd = model.state_dict()
    for name, p in tiny_qm.linears.items():
        # exactly (q - z) * s: computed here from the integers, independently of the writer
        g = p.group_size
        q = p.unpack().to(torch.float64)
        z = p.zeros.to(torch.float64).repeat_interleave(g, 1)
        s = p.scales.to(torch.float64).repeat_interleave(g, 1)
        assert torch.equal(sd[f"{name}.weight"].to(torch.float64), (q - z) * s), name


def test_auto_dtype_is_the_smallest_exact_one(tiny_qm, exported):
    """fp16 scales times integers need up to 15 significant bits: fp16 is not exact, fp32 is."""
    w = {n: p.dequantize(torch.float32) for n, p in tiny_qm.linears.items()}
    fp16_exact = all(torch.equal(t.half().float(), t) for t in w.values())
    stored = load_file(str(exported / "model.safetensors"))
    dtype = stored["model.layers.0.self_attn.q_proj.weight"].dtype
    assert not fp16_exact and dtype == torch.float32
    assert json.loads((exported / "awqconv.json").read_text())["weights_exact"] is True

    # power-of-two scales make every product exact in fp16: then fp16 is chosen
    linears = {n: dataclasses.replace(p, scales=torch.full_like(p.scales, 2.0**-7))
               for n, p in tiny_qm.linears.items()}
    qm2 = dataclasses.replace(tiny_qm, linears=linears)
    assert peft_format.weight_dtype_for(qm2) == (torch.float16, True)


def test_lora_trains_and_the_base_round_trips_bit_for_bit(tiny_qm, exported, tmp_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(0)
    pm = peft.get_peft_model(model, lora_config())
    losses = train_steps(pm, SENTENCES)
    assert losses[-1] < 0.9 * losses[0], losses  # observed: 5.57 -> 4.52
    base = pm.get_base_model().state_dict()
    for k, v in before.items():  # LoRA left the base alone ...
        key = k.replace(".weight", ".base_layer.weight") if k.replace(".weight", ".base_layer.weight") in base else k
        assert torch.equal(base[key], v), k
    assert_same_model(tiny_qm, peft_format.read(exported))  # ... so INT4 comes back exactly

    pm.save_pretrained(tmp_path / "adapter")
    qm_sep, report = apply_adapter(tiny_qm, tmp_path / "adapter", "separate")
    assert qm_sep is tiny_qm and not report.lossy and len(report.targets) == len(tiny_qm.linears)
    copied = copy_adapter(tmp_path / "adapter", tmp_path / "export")
    assert (copied / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "adapter" / "adapter_model.safetensors").read_bytes()

    # merge: same scales and zeros, q = clamp(round(W' / s) + z) with W' = PEFT's own merged weight
    merged_qm, report = apply_adapter(tiny_qm, tmp_path / "adapter", "merge")
    assert report.lossy and all(0 < m.q_changed < 1 for m in report.merged.values())
    merged = pm.merge_and_unload().state_dict()
    for name, p in tiny_qm.linears.items():
        m = merged_qm.linears[name]
        assert bitwise_equal(m.scales, p.scales) and bitwise_equal(m.zeros, p.zeros)
        g = p.group_size
        s = p.scales.float().repeat_interleave(g, 1)
        z = p.zeros.float().repeat_interleave(g, 1)
        want = (torch.round(merged[f"{name}.weight"] / s) + z).clamp(0, 15).to(torch.uint8)
        assert torch.equal(m.unpack(), want), name


def test_changed_base_is_refused(tiny_qm, exported, tmp_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32)
    torch.manual_seed(1)
    pm = peft.get_peft_model(model, lora_config())
    train_steps(pm, SENTENCES, steps=3)
    changed = tmp_path / "merged"
    shutil.copytree(exported, changed)
    pm.merge_and_unload().save_pretrained(changed)  # a merged base written over the layout
    with pytest.raises(peft_format.BaseWeightsChanged, match="off its INT4 grid"):
        peft_format.read(changed)

    # a weight moved by exactly one grid step stays on the grid: the q hash catches it
    edited = tmp_path / "edited"
    shutil.copytree(exported, edited)
    sd = load_file(str(edited / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj"
    p = tiny_qm.linears[name]
    q = p.unpack()
    i = int((q[0] < 15).nonzero()[0])
    sd[f"{name}.weight"][0, i] += p.scales[0, i // p.group_size].float()
    save_file(sd, str(edited / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(peft_format.BaseWeightsChanged, match="hash"):
        peft_format.read(edited)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_base_resaved_in_half_precision_still_round_trips(tiny_qm, exported, tmp_path, dtype):
    """Loading in fp16/bf16 rounds each weight once; q = round(W/s + z) still recovers it exactly."""
    model = transformers.AutoModelForCausalLM.from_pretrained(exported, dtype=dtype)
    out = tmp_path / "resaved"
    shutil.copytree(exported, out)
    model.save_pretrained(out)
    assert load_file(str(out / "model.safetensors"))["model.layers.0.mlp.up_proj.weight"].dtype == dtype
    back = peft_format.read(out)
    for name, p in tiny_qm.linears.items():
        assert back.linears[name].equal(p), name


def test_variant_fp16_rounds_but_recovers(tiny_qm, tmp_path):
    peft_format.write(tiny_qm, tmp_path, "fp16")
    manifest = json.loads((tmp_path / "awqconv.json").read_text())
    assert (manifest["weight_dtype"], manifest["weights_exact"]) == ("float16", False)
    assert_same_model(tiny_qm, peft_format.read(tmp_path))


def test_bias_and_merge_into_lm_head(make_tiny_llama_qm, tmp_path):
    qm = make_tiny_llama_qm(attention_bias=True)
    (tmp_path / "layout").mkdir()
    peft_format.write(qm, tmp_path / "layout", None)
    assert_same_model(qm, peft_format.read(tmp_path / "layout"))
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "layout", dtype=torch.float32)
    torch.manual_seed(2)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"]))
    train_steps(pm, SENTENCES, steps=3)
    pm.save_pretrained(tmp_path / "adapter")
    merged_qm, report = apply_adapter(qm, tmp_path / "adapter", "merge")
    assert report.merged_dense == ["lm_head.weight"]
    head = pm.merge_and_unload().state_dict()["lm_head.weight"]
    assert torch.allclose(merged_qm.dense["lm_head.weight"].float(), head, atol=2e-3)
    assert not torch.equal(merged_qm.dense["lm_head.weight"], qm.dense["lm_head.weight"])
    assert set(report.merged) == {n for n in qm.linears if n.endswith("q_proj")}


def test_adapter_for_another_model_is_refused(tiny_qm, tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    save_file({"base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight": torch.zeros(2, 64),
               "base_model.model.model.layers.9.self_attn.q_proj.lora_B.weight": torch.zeros(64, 2)},
              str(tmp_path / "adapter" / "adapter_model.safetensors"))
    from awqconv.errors import InputError

    with pytest.raises(InputError, match="does not have"):
        apply_adapter(tiny_qm, tmp_path / "adapter", "separate")
    with pytest.raises(InputError, match="unknown"):
        apply_adapter(tiny_qm, tmp_path / "adapter", "fuse")
