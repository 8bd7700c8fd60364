"""The ExLlamaV2 (GPTQ v1) layout: decoded by an independent reference written from the layout
description (exllama_peft.md §1.2-1.3, ExLlamaV2's kernel rule "zero = nibble + 1, no mask"), it gives
the canonical weights, zero-point-0 groups included; read() returns the canonical model bit-exactly."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from awqconv.errors import FormatConstraintError
from awqconv.formats import ExportRequest, Target, detect_format, exllamav2
from awqconv.formats.gptq_layout import from_gptq, to_gptq
from awqconv.model import QuantizedModel
from awqconv.packed import PackedLinear
from fixtures_helpers import assert_same_model


def reference_decode(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> np.ndarray:
    """What ExLlamaV2's GPTQ path computes, in float64, from the raw int32 words (numpy, no awqconv).

    qweight [in/8, out]: nibble j of word [r, c] is q[c, 8r + j]; qzeros [G, out/8]: nibble j of
    word [g, c8] is zero(8*c8 + j, g) - 1 and the kernel adds 1 without masking; scales [G, out].
    """
    qw = qweight.numpy().view(np.uint32)
    qz = qzeros.numpy().view(np.uint32)
    sc = scales.to(torch.float32).numpy().astype(np.float64)
    n_in, out = qw.shape[0] * 8, qw.shape[1]
    n_groups = qz.shape[0]
    g = n_in // n_groups
    rows = np.arange(n_in)
    cols = np.arange(out)
    # q[c, i] = nibble i % 8 of qweight[i // 8, c]
    q = (qw[rows // 8, :] >> (4 * (rows % 8)).astype(np.uint32)[:, None]) & np.uint32(0xF)  # [in, out]
    # zero[g, c] = nibble c % 8 of qzeros[g, c // 8], plus one
    zero = ((qz[:, cols // 8] >> (4 * (cols % 8)).astype(np.uint32)[None, :]) & np.uint32(0xF)) + 1  # [G, out]
    grp = rows // g
    w = (q.astype(np.float64) - zero[grp, :].astype(np.float64)) * sc[grp, :]
    return w.T


def with_zero_groups(qm: QuantizedModel, every: int = 3) -> QuantizedModel:
    """``qm`` with every ``every``-th (row, group) zero point forced to 0 (q untouched)."""
    linears = {}
    for name, p in qm.linears.items():
        z = p.zeros.clone()
        z.view(-1)[::every] = 0
        linears[name] = PackedLinear.from_ints(p.unpack(), z, p.scales, p.group_size, p.bits, p.bias)
    return dataclasses.replace(qm, linears=linears)




@pytest.mark.parametrize("bias", [False, True])
def test_reference_decoder_gives_canonical_weights_including_zero_groups(make_packed, bias):
    p = make_packed(64, 256, 32, bias=bias, seed=3)  # uniform zeros: many groups have z = 0
    n_zero = int((p.zeros == 0).sum())
    assert n_zero > 10
    t = to_gptq(p)
    assert t.flipped_groups == n_zero
    assert t.qweight.dtype == torch.int32 and tuple(t.qweight.shape) == (256 // 8, 64)
    assert t.qzeros.dtype == torch.int32 and tuple(t.qzeros.shape) == (256 // 32, 64 // 8)
    assert tuple(t.scales.shape) == (256 // 32, 64)
    decoded = reference_decode(t.qweight, t.qzeros, t.scales)
    canonical = p.dequantize(torch.float32).numpy().astype(np.float64)
    np.testing.assert_array_equal(decoded, canonical)
    # ExLlamaV2 decodes nibble 15 as zero 16: the writer must never store it
    nibbles = (t.qzeros.numpy().view(np.uint32)[..., None] >> (4 * np.arange(8, dtype=np.uint32))) & 0xF
    assert nibbles.max() <= 14


def test_zero_group_fp16_values_match_exactly(make_packed):
    """The flipped groups give the same fp16 weight the canonical formula rounds to."""
    p = make_packed(32, 64, 32, seed=5)
    t = to_gptq(p)
    decoded = torch.from_numpy(reference_decode(t.qweight, t.qzeros, t.scales)).to(torch.float16)
    assert torch.equal(decoded, p.dequantize(torch.float16))


def test_layout_round_trip_is_bit_exact(make_packed):
    for seed in range(4):
        p = make_packed(48, 128, 64, bias=seed % 2 == 1, seed=seed)
        t = to_gptq(p, with_g_idx=seed % 2 == 0)
        assert from_gptq(t.qweight, t.qzeros, t.scales, t.g_idx, t.bias).equal(p)


def test_write_read_round_trip_with_zero_groups_bias_and_assets(make_tiny_llama_qm, tmp_path):
    qm = with_zero_groups(make_tiny_llama_qm(attention_bias=True))
    qm = dataclasses.replace(qm, assets={"tokenizer.json": b'{"model": {}}', "generation_config.json": b"{}"})
    exllamav2.write(qm, tmp_path, None)
    back = exllamav2.read(tmp_path)
    assert_same_model(qm, back)
    assert detect_format(tmp_path) == "exllamav2"
    assert (tmp_path / "tokenizer.json").read_bytes() == b'{"model": {}}'

    tensors = load_file(str(tmp_path / "model.safetensors"))
    for name, p in qm.linears.items():
        assert tensors[f"{name}.scales"].dtype == torch.float16
        if p.bias is not None:
            assert tensors[f"{name}.bias"].dtype == torch.float16
        assert f"{name}.g_idx" not in tensors
        w = reference_decode(tensors[f"{name}.qweight"], tensors[f"{name}.qzeros"], tensors[f"{name}.scales"])
        np.testing.assert_array_equal(w, p.dequantize(torch.float32).numpy().astype(np.float64))
    flips = sum(int((p.zeros == 0).sum()) for p in qm.linears.values())
    assert flips > 0 and json.loads((tmp_path / "awqconv.json").read_text())["flipped_groups"] == flips


def test_config_is_what_exllamav2_reads(tiny_qm, tmp_path):
    exllamav2.write(tiny_qm, tmp_path, "g_idx")
    cfg = json.loads((tmp_path / "config.json").read_text())
    q = cfg["quantization_config"]
    assert (q["quant_method"], q["bits"], q["checkpoint_format"], q["desc_act"]) == ("gptq", 4, "gptq", False)
    assert q["group_size"] == 32
    # ExLlamaV2 reads only a top-level rope_theta (transformers 5 moved it into rope_parameters)
    assert cfg["rope_theta"] == tiny_qm.hf_config["rope_parameters"]["rope_theta"]
    tensors = load_file(str(tmp_path / "model.safetensors"))
    g_idx = tensors["model.layers.0.mlp.down_proj.g_idx"]
    assert g_idx.dtype == torch.int32 and torch.equal(g_idx, torch.arange(128, dtype=torch.int32) // 32)
    assert_same_model(tiny_qm, exllamav2.read(tmp_path))


def test_llama3_rope_scaling_is_written_the_way_exllamav2_reads_it(tiny_qm, tmp_path):
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    qm = dataclasses.replace(tiny_qm, hf_config={**tiny_qm.hf_config, "rope_parameters": rope})
    exllamav2.write(qm, tmp_path, None)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["rope_theta"] == 500000.0
    rs = cfg["rope_scaling"]
    # ExLlamaV2 0.3.2 config.py: exactly one of type/rope_type, then factor, low/high_freq_factor, original_max_...
    assert ("type" in rs) != ("rope_type" in rs) and (rs.get("type") or rs.get("rope_type")) == "llama3"
    assert (rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"], rs["original_max_position_embeddings"]) == (
        8.0, 1.0, 4.0, 8192)
    assert exllamav2.read(tmp_path).hf_config == json.loads(json.dumps(qm.hf_config))


def test_bf16_scales_round_trip(make_tiny_llama_qm, tmp_path):
    qm = make_tiny_llama_qm(scale_dtype=torch.bfloat16)
    exllamav2.write(qm, tmp_path, None)
    assert load_file(str(tmp_path / "model.safetensors"))["model.layers.1.mlp.up_proj.scales"].dtype == torch.float16
    assert_same_model(qm, exllamav2.read(tmp_path))


def test_foreign_gptq_v2_checkpoint_is_read(tiny_qm, tmp_path):
    """A GPTQModel-style v2 file (zero nibble = true zero, no manifest) decodes to the same integers."""
    qm = with_zero_groups(tiny_qm, every=5)
    exllamav2.write(qm, tmp_path, None)
    (tmp_path / "awqconv.json").unlink()
    tensors = load_file(str(tmp_path / "model.safetensors"))
    for name, p in qm.linears.items():
        # unflipped v2 nibbles, packed here from the description (nibble j of word [g, c8] = z[8*c8+j, g])
        z = p.zeros.t().to(torch.int64).reshape(p.n_groups, -1, 8)
        words = (z << (4 * torch.arange(8))).sum(-1)
        tensors[f"{name}.qzeros"] = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
        tensors[f"{name}.scales"] = p.scales.t().contiguous()
        q = p.unpack().to(torch.int64).t().reshape(-1, 8, p.out_features)
        words = (q << (4 * torch.arange(8))[None, :, None]).sum(1)
        tensors[f"{name}.qweight"] = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"]["checkpoint_format"] = "gptq_v2"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    back = exllamav2.read(tmp_path)
    for name, p in qm.linears.items():
        assert back.linears[name].equal(p), name


def test_act_order_and_zero_16_are_refused(make_packed):
    p = make_packed(16, 64, 32, seed=1)
    t = to_gptq(p, with_g_idx=True)
    with pytest.raises(FormatConstraintError, match="act-order"):
        from_gptq(t.qweight, t.qzeros, t.scales, t.g_idx.flip(0))
    all15 = torch.full_like(t.qzeros, -1)  # every nibble 15: zero 16 under v1
    with pytest.raises(FormatConstraintError, match="outside 0..15"):
        from_gptq(t.qweight, all15, t.scales.abs())


def test_negative_canonical_scales_are_refused(make_packed):
    p = make_packed(16, 64, 32, seed=2)
    neg = dataclasses.replace(p, scales=-p.scales)
    with pytest.raises(FormatConstraintError, match="negative"):
        to_gptq(neg)


def test_plan_reports_what_the_layout_cannot_hold():
    req = ExportRequest(
        target=Target("exllamav2"), hf_config={}, bits=3, group_size=96, zero_point=True,
        scale_dtype=torch.float16, linear_shapes={"a": (12, 192), "b": (64, 128)},
    )
    problems = exllamav2.plan(req)
    assert any("4-bit" in m for m in problems)
    assert any("power of two" in m for m in problems)
    assert any(m.startswith("a:") and "multiple of 8" in m for m in problems)
    assert not any(m.startswith("b:") and "multiple of 8" in m for m in problems)
    ok = dataclasses.replace(req, bits=4, group_size=128, linear_shapes={"b": (64, 128)})
    assert exllamav2.plan(ok) == []
    assert exllamav2.plan(dataclasses.replace(ok, target=Target("exllamav2", "exl2")))
