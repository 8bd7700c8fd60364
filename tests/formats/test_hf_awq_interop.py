"""Our hf-awq exports judged by other people's readers.

1. compressed-tensors' AutoAWQConverter turns the export into ``pack-quantized``; its own
   PackedQuantizationCompressor.decompress must give exactly PackedLinear.dequantize(fp16).
2. transformers loads the converted checkpoint on CPU (compressed-tensors integration,
   ``dequantize=True``); its weights and logits must match a float Llama built from
   qm.dequantized_state_dict().
3. AutoAWQ 0.2.9's own packer (WQLinear_GEMM.from_linear) and unpacker (dequantize_gemm) agree
   with ours bit for bit (skipped when autoawq is not installed).
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from awqconv.formats import hf_awq
from awqconv.formats.awq_layout import to_gemm
from awqconv.packed import bitwise_equal

DOWN = "model.layers.1.mlp.down_proj"


@pytest.fixture(scope="module")
def exported(tiny_qm, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("interop") / "hf-awq"
    out.mkdir()
    hf_awq.write(tiny_qm, out)
    return out


@pytest.fixture(scope="module")
def converted(exported) -> Path:
    """The export converted by compressed-tensors' AutoAWQ converter (CPU)."""
    pytest.importorskip("compressed_tensors", minversion="0.15")
    entry = pytest.importorskip("compressed_tensors.entrypoints.convert")
    out = exported.parent / "compressed-tensors"
    converter = entry.AutoAWQConverter.from_pretrained(str(exported))
    entry.convert_checkpoint(str(exported), str(out), converter, device="cpu")
    return out


def test_compressed_tensors_decompresses_to_our_weights(tiny_qm, converted):
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    cfg = json.loads((converted / "config.json").read_text())["quantization_config"]
    assert cfg["format"] == "pack-quantized" and cfg["ignore"] == ["lm_head"]
    qcfg = QuantizationConfig.model_validate(cfg)
    (scheme,) = qcfg.config_groups.values()
    assert scheme.weights.num_bits == 4 and scheme.weights.group_size == 32
    assert scheme.weights.symmetric is False

    tensors = load_file(str(converted / "model.safetensors"))
    for name, p in tiny_qm.linears.items():
        local = {k.removeprefix(f"{name}."): v for k, v in tensors.items() if k.startswith(f"{name}.")}
        assert set(local) == {"weight_packed", "weight_scale", "weight_zero_point", "weight_shape"}, name
        weight = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
        assert bitwise_equal(weight, p.dequantize(torch.float16)), name
    for key, t in tiny_qm.dense.items():  # everything else passes through untouched
        assert bitwise_equal(tensors[key], t), key


def test_transformers_loads_the_converted_checkpoint(tiny_qm, converted):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig, LlamaConfig, LlamaForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(converted), quantization_config=CompressedTensorsConfig(dequantize=True)
    ).eval()
    assert model.dtype == torch.float16
    sd = model.state_dict()
    reference = tiny_qm.dequantized_state_dict(torch.float16)
    for key, t in reference.items():
        assert bitwise_equal(sd[key], t), key

    config = LlamaConfig.from_dict(tiny_qm.hf_config)
    ids = torch.randint(0, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model(ids).logits.float()
        fp16 = LlamaForCausalLM(config).to(torch.float16).eval()
        fp16.load_state_dict(reference)
        want16 = fp16(ids).logits.float()
        fp32 = LlamaForCausalLM(config).eval()
        fp32.load_state_dict(tiny_qm.dequantized_state_dict(torch.float32))
        want32 = fp32(ids).logits
    # |logits| < 1 here. Same fp16 weights: measured max difference 4.9e-4 (1 fp16 ulp at 0.5,
    # from a different attention path); allow 2e-3. Against fp32 math on the same integers:
    # measured 4.2e-4 from fp16 activations; allow 4e-3. A wrong nibble order or zero point
    # moves logits by > 1e-1 on this model.
    torch.testing.assert_close(got, want16, atol=2e-3, rtol=0)
    torch.testing.assert_close(got, want32, atol=4e-3, rtol=0)


# -- AutoAWQ's own packing code ----------------------------------------------------------------


@pytest.fixture(scope="module")
def autoawq_gemm():
    """AutoAWQ 0.2.9's awq.modules.linear.gemm, imported without awq/__init__.py.

    The package __init__ pulls in datasets and transformers-4-only model code; the GEMM module
    and packing_utils need only torch, so the top-level package is registered as a bare namespace.
    """
    spec = importlib.util.find_spec("awq")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("autoawq is not installed (pip install --no-deps autoawq==0.2.9)")
    root = Path(list(spec.submodule_search_locations)[0])
    if not (root / "utils" / "packing_utils.py").exists():
        pytest.skip("the installed 'awq' package is not AutoAWQ (no awq/utils/packing_utils.py)")
    saved = {k: v for k, v in sys.modules.items() if k == "awq" or k.startswith("awq.")}
    pkg = types.ModuleType("awq")
    pkg.__path__ = [str(root)]
    sys.modules["awq"] = pkg
    try:
        gemm = importlib.import_module("awq.modules.linear.gemm")
        packing = importlib.import_module("awq.utils.packing_utils")
    except Exception as e:  # noqa: BLE001 - any import failure means we cannot judge with it
        pytest.skip(f"AutoAWQ's GEMM module cannot be imported here: {type(e).__name__}: {e}")
    finally:
        for k in [k for k in sys.modules if k == "awq" or k.startswith("awq.")]:
            del sys.modules[k]
        sys.modules.update(saved)
    return gemm, packing


@pytest.mark.parametrize("name", ["model.layers.0.self_attn.k_proj", DOWN])
def test_autoawq_packs_and_unpacks_like_us(tiny_qm, autoawq_gemm, name):
    gemm_mod, packing = autoawq_gemm
    p = tiny_qm.linears[name]
    linear = torch.nn.Linear(p.in_features, p.out_features, bias=False)
    with torch.no_grad():
        linear.weight.copy_(p.dequantize(torch.float32))
    awq = gemm_mod.WQLinear_GEMM.from_linear(
        linear, 4, p.group_size, scales=p.scales.t().contiguous(), zeros=p.zeros.t().float().contiguous()
    )
    ours = to_gemm(p)
    assert torch.equal(awq.qweight, ours.qweight)
    assert torch.equal(awq.qzeros, ours.qzeros)
    assert bitwise_equal(awq.scales, ours.scales.to(torch.float16))
    w_t = packing.dequantize_gemm(ours.qweight, ours.qzeros, ours.scales, 4, p.group_size)
    assert bitwise_equal(w_t.t().contiguous(), p.dequantize(torch.float16))


def test_we_read_a_checkpoint_packed_by_autoawq(tiny_qm, autoawq_gemm, exported, tmp_path):
    """Replace every quantized linear of our export with AutoAWQ-packed buffers; read() is exact."""
    gemm_mod, _ = autoawq_gemm
    out = tmp_path / "autoawq"
    out.mkdir()
    tensors = load_file(str(exported / "model.safetensors"))
    for name, p in tiny_qm.linears.items():
        linear = torch.nn.Linear(p.in_features, p.out_features, bias=False)
        with torch.no_grad():
            linear.weight.copy_(p.dequantize(torch.float32))
        awq = gemm_mod.WQLinear_GEMM.from_linear(
            linear, 4, p.group_size, scales=p.scales.t().contiguous(), zeros=p.zeros.t().float().contiguous()
        )
        for part in ("qweight", "qzeros", "scales"):
            tensors[f"{name}.{part}"] = getattr(awq, part).contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_bytes((exported / "config.json").read_bytes())
    back = hf_awq.read(out)
    for name, p in tiny_qm.linears.items():
        assert back.linears[name].equal(p), name
