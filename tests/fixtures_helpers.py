"""Cached builders shared by the sources / calibration / evaluation tests (plain functions, not fixtures).

The SmolLM2 model and tokenizer come from the materialized ``builtin:smollm2-135m`` (built once per
cache, ~20 s). ``qm_from_dir`` round-to-nearest packs a tiny model's checkpoint into a QuantizedModel
keyed exactly as the checkpoint, which is what the reference model must reproduce.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

from awqconv._io import load_checkpoint
from awqconv.config import QuantConfig
from awqconv.model import QuantizedModel
from awqconv.quant.grid import IntGrid
from awqconv.sources import collect_assets, load_causal_lm, load_hf_config, materialize_builtin

ROUTER_SUFFIXES = ("mlp.gate.weight", "block_sparse_moe.gate.weight")


@functools.cache
def smollm2() -> tuple[torch.nn.Module, Any]:
    """(model, tokenizer) of the built-in SmolLM2-135M-Instruct, fp32, eval mode. Do not mutate."""
    return load_causal_lm(materialize_builtin())


@functools.cache
def smollm2_tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(materialize_builtin())


@functools.cache
def smollm2_tokenizer_with_bos() -> Any:
    """The same tokenizer configured to add BOS, as Llama-style tokenizers do."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(materialize_builtin(), add_bos_token=True)


def qm_from_dir(path: Path, group_size: int = 64) -> QuantizedModel:
    """RTN-pack every 2-D decoder weight (not norms, not MoE routers) of a checkpoint directory."""
    grid = IntGrid(bits=4, group_size=group_size, zero_point=True, scale_dtype=torch.float16)
    state = load_checkpoint(path)
    names = [
        k.removesuffix(".weight")
        for k, t in state.items()
        if t.ndim == 2 and k.endswith(".weight") and ".layers." in k and not k.endswith(ROUTER_SUFFIXES)
    ]
    linears = {n: grid.pack(state[f"{n}.weight"], state.get(f"{n}.bias")) for n in names}
    packed = {f"{n}.{p}" for n in names for p in ("weight", "bias")}
    dense = {k: t for k, t in state.items() if k not in packed}
    return QuantizedModel(
        hf_config=load_hf_config(path),
        quant_config=QuantConfig(group_size=group_size, method="rtn"),
        linears=linears,
        dense=dense,
        assets=collect_assets(path),
    )


def assert_same_model(a: QuantizedModel, b: QuantizedModel, check_assets: bool = True) -> None:
    """Bit-for-bit equality of two quantized models (linears, dense tensors, configs, assets)."""
    import json

    from awqconv.packed import bitwise_equal

    assert set(a.linears) == set(b.linears)
    for name in a.linears:
        assert a.linears[name].equal(b.linears[name]), name
    assert set(a.dense) == set(b.dense)
    for key in a.dense:
        assert bitwise_equal(a.dense[key], b.dense[key]), key
    assert b.hf_config == json.loads(json.dumps(a.hf_config))
    assert b.quant_config == a.quant_config
    if check_assets:
        assert b.assets == a.assets


def train_steps(model: torch.nn.Module, ids: torch.Tensor, steps: int = 20, lr: float = 1e-2) -> list[float]:
    """Plain AdamW steps of causal-LM loss on ``ids``; returns the loss of each step."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


# "sentences" as token ids: a few repeated patterns a 2-layer model learns within a few steps
TOY_SENTENCES = torch.tensor([
    [1, 17, 42, 99, 5, 17, 42, 99, 5, 17, 42, 99, 5, 17, 42, 99],
    [1, 8, 8, 13, 200, 8, 8, 13, 200, 8, 8, 13, 200, 8, 8, 13],
    [1, 250, 3, 77, 250, 3, 77, 250, 3, 77, 250, 3, 77, 250, 3, 77],
    [1, 64, 65, 66, 67, 68, 69, 70, 71, 72, 73, 74, 75, 76, 77, 78],
])
