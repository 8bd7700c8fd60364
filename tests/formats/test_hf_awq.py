"""The HF-transformers AWQ (GEMM) writer/reader and the pure GEMM re-layout.

Layout facts are checked against a reference written from AutoAWQ's description (word = sum of
nibbles of output channels 8c + (0,2,4,6,1,3,5,7)[j] << 4j, read as a signed int32), not against
awq_layout.py itself. Third-party readers are exercised in test_hf_awq_interop.py.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from awqconv.errors import CorruptFileError, FormatConstraintError, InputError, ShapeError
from awqconv.formats import ExportRequest, Target, canonical, detect_format, hf_awq
from awqconv.formats.awq_layout import from_gemm, pack_awq_int32, to_gemm, unpack_awq_int32
from awqconv.packed import PackedLinear, bitwise_equal

ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ AWQ_ORDER (awq_internals.md §2.1)
DOWN = "model.layers.1.mlp.down_proj"


def reference_gemm_words(v: torch.Tensor) -> list[list[int]]:
    """``v [rows, cols]`` -> AWQ words per row, built with Python ints and wrapped to int32."""
    out = []
    for row in v.tolist():
        words = []
        for c in range(len(row) // 8):
            word = sum(row[8 * c + ORDER[j]] << (4 * j) for j in range(8))
            words.append(word - (1 << 32) if word >= 1 << 31 else word)
        out.append(words)
    return out


def _write(qm, tmp_path: Path, name: str = "h") -> Path:
    out = tmp_path / name
    out.mkdir()
    hf_awq.write(qm, out)
    return out


# -- awq_layout -------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    out=st.sampled_from([8, 16, 40]),
    groups=st.integers(1, 3),
    g=st.sampled_from([8, 16, 32]),
    dtype=st.sampled_from([torch.float16, torch.bfloat16]),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_gemm_round_trip_and_reference_layout(make_packed, out, groups, g, dtype, bias, seed):
    p = make_packed(out, groups * g, g, dtype=dtype, bias=bias, seed=seed)
    gemm = to_gemm(p)
    assert gemm.qweight.dtype == gemm.qzeros.dtype == torch.int32
    assert tuple(gemm.qweight.shape) == (groups * g, out // 8)
    assert tuple(gemm.qzeros.shape) == (groups, out // 8)
    assert tuple(gemm.scales.shape) == (groups, out) and gemm.scales.dtype == dtype
    assert gemm.qweight.tolist() == reference_gemm_words(p.unpack().t())
    assert gemm.qzeros.tolist() == reference_gemm_words(p.zeros.t())
    assert from_gemm(*gemm).equal(p)


def test_sign_bit_nibble_round_trips():
    v = torch.full((2, 16), 15, dtype=torch.uint8)
    v[1, :8] = torch.arange(8, dtype=torch.uint8) + 8
    words = pack_awq_int32(v)
    assert words[0].tolist() == [-1, -1]  # 0xFFFFFFFF
    assert int(words[1, 0]) < 0  # nibble 7 = channel 7 = 15 sets the sign bit
    assert torch.equal(unpack_awq_int32(words), v)


def test_to_gemm_refuses_what_gemm_cannot_hold(make_packed):
    with pytest.raises(FormatConstraintError, match="4-bit"):
        to_gemm(make_packed(8, 32, 32, bits=3))
    with pytest.raises(FormatConstraintError, match="out_features % 8"):
        to_gemm(make_packed(12, 32, 32))


def test_from_gemm_checks_shapes(make_packed):
    gemm = to_gemm(make_packed(16, 64, 32))
    with pytest.raises(ShapeError, match="qzeros has shape"):
        from_gemm(gemm.qweight, gemm.qzeros[:, :1], gemm.scales)
    with pytest.raises(ShapeError, match="packs 16 outputs"):
        from_gemm(gemm.qweight, gemm.qzeros, gemm.scales[:, :8])


# -- write ------------------------------------------------------------------------------------


def test_checkpoint_layout(tiny_qm, tmp_path):
    assets = {"tokenizer.json": b'{"model": {}}', "generation_config.json": b'{"do_sample": false}',
              "README.md": b"source model card", "config.json": b"{}"}
    qm = dataclasses.replace(tiny_qm, assets=assets)
    out = _write(qm, tmp_path)
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "README.md",
                                               "tokenizer.json", "generation_config.json"}
    assert (out / "generation_config.json").read_bytes() == b'{"do_sample": false}'  # not forced
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"] == {"quant_method": "awq", "bits": 4, "group_size": 32,
                                          "zero_point": True, "version": "gemm",
                                          "modules_to_not_convert": None}
    assert cfg["torch_dtype"] == cfg["dtype"] == "float16"
    assert {k: v for k, v in cfg.items() if k not in ("quantization_config", "dtype", "torch_dtype")} == {
        k: v for k, v in qm.hf_config.items() if k not in ("dtype", "torch_dtype")}

    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        keys = set(f.keys())
        qw, qz, sc = (f.get_tensor(f"{DOWN}.{n}") for n in ("qweight", "qzeros", "scales"))
        dense_dtypes = {f.get_tensor(k).dtype for k in qm.dense}
    assert (qw.dtype, tuple(qw.shape)) == (torch.int32, (128, 8))
    assert (qz.dtype, tuple(qz.shape)) == (torch.int32, (4, 8))
    assert (sc.dtype, tuple(sc.shape)) == (torch.float16, (4, 64))
    assert dense_dtypes == {torch.float16}
    assert f"{DOWN}.weight" not in keys and "lm_head.weight" in keys
    # the stored integers are the canonical ones, read through the reference layout
    p = qm.linears[DOWN]
    assert qw.tolist() == reference_gemm_words(p.unpack().t())
    assert bitwise_equal(sc, p.scales.t().contiguous())

    card = (out / "README.md").read_text()
    for needle in ("tests/tiny-llama-random", "| Weight bits | 4 |", "| Group size | 32 |", "awqconv",
                   "round-to-nearest", "base_model: tests/tiny-llama-random"):
        assert needle in card


@pytest.mark.parametrize(
    "kw",
    [dict(), dict(group_size=-1), dict(group_size=64, attention_bias=True), dict(zero_point=False)],
    ids=["g32", "per-channel", "g64-bias", "symmetric"],
)
def test_round_trip_is_bit_exact(make_tiny_llama_qm, tmp_path, kw):
    qm = make_tiny_llama_qm(**kw)
    out = _write(qm, tmp_path)
    assert hf_awq.detect(out) and detect_format(out) == "hf-awq"
    back = hf_awq.read(out)
    assert list(back.linears) == sorted(qm.linears)
    for name, p in qm.linears.items():
        assert back.linears[name].equal(p), name
    assert set(back.dense) == set(qm.dense)
    for key, t in qm.dense.items():
        assert bitwise_equal(back.dense[key], t), key
    assert back.quant_config.group_size == qm.quant_config.group_size
    assert back.quant_config.zero_point is True  # symmetric is stored as zero point 8
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["group_size"] == qm.quant_config.group_size and cfg["zero_point"] is True
    if kw.get("attention_bias"):
        assert back.linears["model.layers.0.self_attn.q_proj"].bias is not None


def test_symmetric_zeros_are_stored_as_eight(make_tiny_llama_qm, tmp_path):
    out = _write(make_tiny_llama_qm(zero_point=False), tmp_path)
    qz = load_file(str(out / "model.safetensors"))[f"{DOWN}.qzeros"]
    assert bool((qz == 0x88888888 - (1 << 32)).all())
    assert "zero point 8" in (out / "README.md").read_text()


def test_exact_bf16_scales_are_written_as_fp16(make_tiny_llama_qm, tmp_path):
    qm = make_tiny_llama_qm(scale_dtype=torch.bfloat16)
    back = hf_awq.read(_write(qm, tmp_path))
    for name, p in qm.linears.items():
        assert back.linears[name].scales.dtype == torch.float16
        assert bitwise_equal(back.linears[name].dequantize(), p.dequantize()), name
    assert back.quant_config.scale_dtype == "float16"


def test_inexact_bf16_scale_is_refused_at_write(make_tiny_llama_qm, tmp_path):
    qm = make_tiny_llama_qm(scale_dtype=torch.bfloat16)
    p = qm.linears[DOWN]
    scales = p.scales.clone()
    scales[3, 1] = torch.tensor(3.0e-7, dtype=torch.bfloat16)  # below fp16's subnormal spacing
    bad = dataclasses.replace(p, scales=scales)
    qm2 = dataclasses.replace(qm, linears={**qm.linears, DOWN: bad})
    with pytest.raises(FormatConstraintError, match=rf"{DOWN}.scales\[3, 1\].*not exactly representable"):
        _write(qm2, tmp_path)


def test_tied_embeddings_follow_the_config(make_tiny_llama_qm, tmp_path):
    qm = make_tiny_llama_qm(tie_word_embeddings=True)
    out = _write(qm, tmp_path)
    keys = set(load_file(str(out / "model.safetensors")))
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
    untied = make_tiny_llama_qm()
    assert "lm_head.weight" in load_file(str(_write(untied, tmp_path, "u") / "model.safetensors"))
    # a config that claims tying while lm_head differs would be loaded wrongly: refuse
    clash = dataclasses.replace(untied, hf_config={**untied.hf_config, "tie_word_embeddings": True})
    with pytest.raises(FormatConstraintError, match="tie_word_embeddings"):
        _write(clash, tmp_path, "x")


def test_modules_not_converted_come_from_provenance(tiny_qm, tmp_path):
    qm = dataclasses.replace(tiny_qm, provenance={"modules_not_converted": ["mlp.gate"]})
    cfg = json.loads((_write(qm, tmp_path) / "config.json").read_text())
    assert cfg["quantization_config"]["modules_to_not_convert"] == ["mlp.gate"]


def test_plan_lists_every_problem(tiny_qm):
    def req(bits=4, g=32, shapes=None, variant=None):
        shapes = shapes or {n: (p.out_features, p.in_features) for n, p in tiny_qm.linears.items()}
        return ExportRequest(Target("hf-awq", variant), tiny_qm.hf_config, bits, g, True, torch.float16,
                             shapes)

    assert hf_awq.plan(req()) == [] and hf_awq.plan(req(g=-1)) == []
    assert hf_awq.plan(req(bits=3)) == [
        "hf-awq stores only 4-bit weights; use --w-bit 4 or the canonical/gguf formats"]
    problems = hf_awq.plan(req(g=48, shapes={"a": (12, 96), "b": (16, 100)}))
    assert len(problems) == 2
    assert problems[0].startswith("a: out_features=12 is not a multiple of 8")
    assert problems[1].startswith("b: in_features=100 is not a multiple of group_size=48")
    assert "variant 'gemv'" in hf_awq.plan(req(variant="gemv"))[0]


def test_write_refuses_non_4bit_models(make_tiny_llama_qm, tmp_path):
    with pytest.raises(FormatConstraintError, match="only 4-bit"):
        _write(make_tiny_llama_qm(bits=3), tmp_path)
    with pytest.raises(InputError, match="variant"):
        hf_awq.write(make_tiny_llama_qm(), tmp_path, variant="gemv")


# -- read -------------------------------------------------------------------------------------


def test_reads_sharded_checkpoints(tiny_qm, tmp_path):
    from huggingface_hub import save_torch_state_dict

    out = _write(tiny_qm, tmp_path)
    tensors = load_file(str(out / "model.safetensors"))
    (out / "model.safetensors").unlink()
    save_torch_state_dict(tensors, out, max_shard_size="40KB", metadata={"format": "pt"})
    assert len(list(out.glob("model-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").exists()
    back = hf_awq.read(out)
    assert all(back.linears[n].equal(p) for n, p in tiny_qm.linears.items())


def test_read_errors(tiny_qm, tmp_path):
    out = _write(tiny_qm, tmp_path)
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())

    def with_qcfg(**kw):
        cfg_path.write_text(json.dumps({**cfg, "quantization_config": {**cfg["quantization_config"], **kw}}))

    with_qcfg(version="gemv")
    with pytest.raises(FormatConstraintError, match="'gemv'"):
        hf_awq.read(out)
    with_qcfg(group_size=64)
    with pytest.raises(CorruptFileError, match="group_size=64"):
        hf_awq.read(out)
    with_qcfg(quant_method="gptq")
    with pytest.raises(InputError, match="no AWQ quantization_config"):
        hf_awq.read(out)
    assert not hf_awq.detect(out)
    with_qcfg()
    tensors = load_file(str(out / "model.safetensors"))
    del tensors[f"{DOWN}.scales"]
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CorruptFileError, match=f"{DOWN}.scales"):
        hf_awq.read(out)
    c = tmp_path / "c"
    c.mkdir()
    canonical.write(tiny_qm, c)
    assert not hf_awq.detect(c)


def test_read_assets_skip_weights_and_card(tiny_qm, tmp_path):
    assets = {"tokenizer_config.json": b"{}", "special_tokens_map.json": b"[]"}
    qm = dataclasses.replace(tiny_qm, assets=assets)
    back = hf_awq.read(_write(qm, tmp_path))
    assert back.assets == qm.assets
    assert back.provenance["source_format"] == "hf-awq"


def test_symmetric_checkpoint_without_qzeros(tiny_qm, tmp_path):
    """A zero_point=false GEMM checkpoint may omit qzeros: the implicit zero point is 8."""
    out = _write(tiny_qm, tmp_path)
    stored = load_file(str(out / "model.safetensors"))
    tensors = {k: v for k, v in stored.items() if not k.endswith(".qzeros")}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"]["zero_point"] = False
    (out / "config.json").write_text(json.dumps(cfg))
    back = hf_awq.read(out)
    p = back.linears[DOWN]
    assert bool((p.zeros == 8).all()) and isinstance(p, PackedLinear)
    assert torch.equal(p.unpack(), tiny_qm.linears[DOWN].unpack())


def test_mixed_group_sizes_are_refused(tiny_qm, make_packed, tmp_path):
    odd = make_packed(64, 128, 64, seed=5)  # g=64 in a g=32 model
    qm = dataclasses.replace(tiny_qm, linears={**tiny_qm.linears, DOWN: odd})
    with pytest.raises(FormatConstraintError, match=f"{DOWN}: group size 64 differs"):
        _write(qm, tmp_path)
