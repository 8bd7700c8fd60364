"""Small in-memory QuantizedModels of every registry family, for the runtime tests.

``family_qm(arch, **overrides)``: a 2-layer model of ``arch`` (hidden 64, 4 query / 2 KV heads of
32, MLP 128, MoE 4 experts top-2 of width 64, vocabulary 256: small enough for the Triton
interpreter) with config ``overrides`` (windows, soft-caps, partial rotary, ...). Weights are
transformers' init under a fixed seed, norm gains perturbed so that ``(1 + w)`` norms are not the
identity; no EOS token (the reference's ``min_new_tokens`` would mask it); every decoder linear
RTN-packed (IntGrid, g32), MoE experts unfused into the
``mlp.experts.{e}.gate_proj`` names the quantizer writes, routers kept dense.
"""

from __future__ import annotations

import functools
import json

import torch

from awqconv.config import QuantConfig
from awqconv.model import QuantizedModel
from awqconv.quant.grid import IntGrid
from tests.tiny_models import TINY_ARCHS

SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=32, vocab_size=256, max_position_embeddings=256, bos_token_id=1, eos_token_id=None,
             pad_token_id=None)
MOE = {"MixtralForCausalLM": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=64),
       "Qwen3MoeForCausalLM": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                                   decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True)}
MODEL_TYPES = {arch: mt for arch, (mt, _) in TINY_ARCHS.items()} | {"Gemma3ForCausalLM": "gemma3_text"}
_ROUTERS = ("mlp.gate.weight",)


def _unfused(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5's 3-D expert stacks back to per-expert linears (the quantizer's names)."""
    out = {}
    for k, v in sd.items():
        if k.endswith("experts.gate_up_proj"):
            inter = v.shape[1] // 2
            for e in range(v.shape[0]):
                out[f"{k[:-len('gate_up_proj')]}{e}.gate_proj.weight"] = v[e, :inter]
                out[f"{k[:-len('gate_up_proj')]}{e}.up_proj.weight"] = v[e, inter:]
        elif k.endswith("experts.down_proj"):
            for e in range(v.shape[0]):
                out[f"{k[:-len('down_proj')]}{e}.down_proj.weight"] = v[e]
        else:
            out[k] = v
    return out


@functools.lru_cache(maxsize=None)
def _family_qm(arch: str, scale_dtype: torch.dtype, seed: int, items: tuple) -> QuantizedModel:
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = {**SHAPE, **MOE.get(arch, {}), **{k: json.loads(v) for k, v in items}}
    cfg = AutoConfig.for_model(MODEL_TYPES[arch], **kw, architectures=[arch])
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name and p.ndim == 1:  # gains away from 1 (and (1 + w) away from w = 0)
                    p.add_(0.3 * torch.randn(p.shape))
    sd = _unfused({k: v.detach() for k, v in model.state_dict().items()})
    grid = IntGrid(group_size=32, scale_dtype=scale_dtype)
    names = [k[:-7] for k, v in sd.items() if v.ndim == 2 and ".layers." in k and k.endswith(".weight")
             and not k.endswith(_ROUTERS)]
    linears = {n: grid.pack(sd[f"{n}.weight"], sd.get(f"{n}.bias")) for n in names}
    packed = {f"{n}.{p}" for n in names for p in ("weight", "bias")}
    dense = {k: v.to(scale_dtype) for k, v in sd.items() if k not in packed}
    hf = json.loads(json.dumps(cfg.to_dict()))
    hf["architectures"] = [arch]
    qc = QuantConfig(method="rtn", group_size=32,
                     scale_dtype="bfloat16" if scale_dtype == torch.bfloat16 else "float16")
    return QuantizedModel(hf, qc, linears, dense)


def family_qm(arch: str, scale_dtype: torch.dtype = torch.float16, seed: int = 0, **overrides) -> QuantizedModel:
    """See the module docstring (cached per arguments; do not mutate)."""
    return _family_qm(arch, scale_dtype, seed, tuple(sorted((k, json.dumps(v)) for k, v in overrides.items())))
