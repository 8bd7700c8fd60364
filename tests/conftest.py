"""Shared test fixtures: seeded random PackedLinear layers and tiny quantized Llama models.

Everything is built in memory from a fixed seed (no hub access); builders are cached per session,
so tests must not mutate what they receive.
"""

from __future__ import annotations

import os

# Triton kernels run in the interpreter on the CPU. Set before anything imports triton (the runtime
# and LoRA tests import it too, and collection order is not the kernels folder first).
os.environ.setdefault("TRITON_INTERPRET", "1")

import functools
import json

import pytest
import torch

from awqconv.config import QuantConfig
from awqconv.model import QuantizedModel
from awqconv.packed import PackedLinear
from awqconv.quant.grid import IntGrid


def random_packed(
    out: int,
    n_in: int,
    group_size: int,
    bits: int = 4,
    dtype: torch.dtype = torch.float16,
    bias: bool = False,
    seed: int = 0,
) -> PackedLinear:
    """A PackedLinear with uniformly random integers, positive scales and an optional bias."""
    gen = torch.Generator().manual_seed(seed)
    hi = 1 << bits
    q = torch.randint(0, hi, (out, n_in), generator=gen, dtype=torch.int64)
    zeros = torch.randint(0, hi, (out, n_in // group_size), generator=gen, dtype=torch.int64)
    scales = (torch.rand(out, n_in // group_size, generator=gen) * 0.02 + 1e-3).to(dtype)
    b = torch.randn(out, generator=gen).to(dtype) if bias else None
    return PackedLinear.from_ints(q, zeros, scales, group_size, bits, b)


@functools.lru_cache(maxsize=None)
def tiny_llama_qm(
    group_size: int = 32,
    zero_point: bool = True,
    bits: int = 4,
    scale_dtype: torch.dtype = torch.float16,
    tie_word_embeddings: bool = False,
    attention_bias: bool = False,
    seed: int = 0,
    head_dim: int | None = None,
) -> QuantizedModel:
    """A random 2-layer GQA Llama (hidden 64) whose decoder-block linears are IntGrid-packed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=128,
        tie_word_embeddings=tie_word_embeddings,
        attention_bias=attention_bias,
        **({"head_dim": head_dim} if head_dim else {}),
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    grid = IntGrid(bits=bits, group_size=group_size, zero_point=zero_point, scale_dtype=scale_dtype)
    linears = {
        name: grid.pack(mod.weight, mod.bias)
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear) and ".layers." in name
    }
    packed_keys = {f"{n}.{p}" for n in linears for p in ("weight", "bias")}
    dense = {
        k: v.detach().to(scale_dtype)
        for k, v in model.state_dict().items()
        if k not in packed_keys
    }
    hf_config = json.loads(json.dumps(config.to_dict()))  # as config.json holds it (str keys)
    hf_config["architectures"] = ["LlamaForCausalLM"]
    qc = QuantConfig(
        w_bit=bits,
        group_size=group_size,
        zero_point=zero_point,
        method="rtn",
        scale_dtype="bfloat16" if scale_dtype == torch.bfloat16 else "float16",
    )
    return QuantizedModel(
        hf_config=hf_config,
        quant_config=qc,
        linears=linears,
        dense=dense,
        provenance={"source_model": "tests/tiny-llama-random", "seed": seed},
    )


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked ``gpu`` need a CUDA device and the compiled kernels (not the interpreter): on a
    machine without them (CI) they are skipped with the reason and the command that runs them."""
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") == "0":
        return
    why = ("needs a CUDA device and compiled kernels: run `TRITON_INTERPRET=0 python3 -m pytest -q -m gpu` "
           "on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=why))


@pytest.fixture(scope="session")
def make_packed():
    """Factory fixture: ``make_packed(out, n_in, group_size, bits=4, dtype=fp16, bias=False, seed=0)``."""
    return random_packed


@pytest.fixture(scope="session")
def make_tiny_llama_qm():
    """Factory fixture: ``make_tiny_llama_qm(group_size=32, zero_point=True, ...)`` (cached)."""
    return tiny_llama_qm


@pytest.fixture(scope="session")
def tiny_qm() -> QuantizedModel:
    """The default tiny Llama: 4-bit, g=32, asymmetric, fp16 scales, untied embeddings."""
    return tiny_llama_qm()
