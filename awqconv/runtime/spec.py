"""What the built-in decoder computes for one model: ``DecoderSpec``, read from its HF config through
the architecture's registry row (``archs.RuntimeSpec``).

The config is first normalised by transformers (``AutoConfig.for_model``), so values that
transformers derives or renames reach the runtime as the reference model sees them: ``layer_types``
(which layers use the sliding window), Gemma's legacy ``hidden_act: "gelu"`` meaning the tanh
approximation, ``num_experts`` stored as ``num_local_experts``, per-layer-type RoPE parameters
(Gemma 3's local and global bases). The row says which of those matter (norm placement, q/k norms,
activation key, embedding scaling, soft-capping, sliding windows, MoE routing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .. import archs

_NOT_CONFIG = ("model_type", "architectures", "transformers_version")


def hf_config(cfg: dict[str, Any]):
    """``cfg`` as transformers' config object of its model type (derived fields filled in)."""
    from transformers import AutoConfig

    kw = {k: v for k, v in cfg.items() if k not in _NOT_CONFIG}
    return AutoConfig.for_model(cfg.get("model_type", "llama"), **kw)


def _get(hf, cfg: dict[str, Any], key: str, default: Any = None) -> Any:
    v = getattr(hf, key, None)
    return cfg.get(key, default) if v is None else v


@dataclass(frozen=True)
class MoeSpec:
    n_experts: int
    top_k: int
    renormalize: bool  # top-k weights divided by their sum
    sparse: tuple[bool, ...]  # per layer: experts (True) or a dense MLP


@dataclass(frozen=True)
class DecoderSpec:
    hidden: int
    n_layers: int
    n_heads: int
    n_kv: int
    head_dim: int
    vocab: int
    eps: float
    act: str
    tie: bool
    windows: tuple[int | None, ...]  # per layer: its attention window (None: full attention)
    rope_kinds: tuple[str, ...]  # per layer: its RoPE table ("": the model's single table, else a layer type)
    qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE
    offset_norm: bool = False  # norms compute x * (1 + w)
    sandwich: bool = False  # norms also after attention and after the MLP (Gemma 2/3)
    embed_scale: float | None = None  # embeddings times this (rounded to the activations' dtype)
    attn_scale: float | None = None  # scores times this; None: head_dim ** -0.5
    attn_softcap: float | None = None  # scores soft-capped: cap * tanh(s / cap)
    final_softcap: float | None = None  # logits soft-capped likewise
    moe: MoeSpec | None = None

    @property
    def sliding_window(self) -> int | None:
        """The window of the windowed layers (one size per model), None when none is."""
        return next((w for w in self.windows if w), None)

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> DecoderSpec:
        """The decoder's shape and features from an HF config; the architecture's row in the registry
        (archs.py) says whether the built-in runtime runs it (else UnsupportedArchitecture) and which
        features it has."""
        row = archs.runtime_row(cfg)
        rt = row.runtime
        hf = hf_config(cfg)  # sizes and flags a config.json leaves out take the model class's defaults
        h, nh = _get(hf, cfg, "hidden_size"), _get(hf, cfg, "num_attention_heads")
        n_layers = _get(hf, cfg, "num_hidden_layers")
        caps = [_get(hf, cfg, k) if k else None for k in rt.softcap_keys] + [None, None]  # (scores, logits)
        scale_base = _get(hf, cfg, rt.attn_scale_key) if rt.attn_scale_key else None
        return cls(hidden=h, n_layers=n_layers, n_heads=nh, n_kv=_get(hf, cfg, "num_key_value_heads") or nh,
                   head_dim=head_dim_of(hf, cfg), vocab=_get(hf, cfg, "vocab_size"),
                   eps=_get(hf, cfg, "rms_norm_eps", 1e-6), act=_get(hf, cfg, rt.act_key, "silu") or "silu",
                   tie=bool(_get(hf, cfg, "tie_word_embeddings", False)),
                   windows=layer_windows(rt, cfg, hf, n_layers), rope_kinds=rope_kinds(hf, n_layers),
                   qk_norm=rt.qk_norm, offset_norm=row.awq.offset_norm, sandwich=rt.norms == "sandwich",
                   embed_scale=math.sqrt(h) if rt.embed_scale else None,
                   attn_scale=None if scale_base is None else float(scale_base) ** -0.5,
                   attn_softcap=caps[0], final_softcap=caps[1], moe=moe_spec(rt, cfg, hf, n_layers))


def head_dim_of(hf, cfg: dict[str, Any]) -> int:
    return _get(hf, cfg, "head_dim") or _get(hf, cfg, "hidden_size") // _get(hf, cfg, "num_attention_heads")


def layer_windows(rt: archs.RuntimeSpec, cfg: dict[str, Any], hf, n_layers: int) -> tuple[int | None, ...]:
    """Each layer's attention window. The row's ``sliding_window`` says whether the config's window
    is on; which layers it covers follows transformers: the layers ``layer_types`` marks
    "sliding_attention" where the normalised config lists them (Qwen2/3 from max_window_layers,
    Gemma 2/3 alternating), else every layer (Mistral, Mixtral, Phi-3, Qwen3-MoE); for "alternate"
    without ``layer_types``, every other layer from the first."""
    if rt.sliding_window is None:
        return (None,) * n_layers
    w = _get(hf, cfg, "sliding_window") if rt.sliding_window == "alternate" else rt.window(cfg)
    if not w:
        return (None,) * n_layers
    types = getattr(hf, "layer_types", None)
    if types:
        return tuple(w if t == "sliding_attention" else None for t in types[:n_layers])
    if rt.sliding_window == "alternate":
        return tuple(w if i % 2 == 0 else None for i in range(n_layers))
    return (w,) * n_layers


def rope_kinds(hf, n_layers: int) -> tuple[str, ...]:
    """Per layer, the key of its RoPE table: its layer type where the config keeps RoPE parameters
    per layer type (Gemma 3: local base for sliding layers, global base and scaling for the others),
    else "" (one table)."""
    params = getattr(hf, "rope_parameters", None) or {}
    types = getattr(hf, "layer_types", None)
    if types and params and all(isinstance(params.get(t), dict) for t in set(types)):
        return tuple(types[:n_layers])
    return ("",) * n_layers


def moe_spec(rt: archs.RuntimeSpec, cfg: dict[str, Any], hf, n_layers: int) -> MoeSpec | None:
    m = rt.moe
    if m is None:
        return None
    n_exp = int(_get(hf, cfg, m.experts_key, 0) or 0)
    if n_exp <= 0:
        return None
    renorm = m.renormalize if isinstance(m.renormalize, bool) else bool(_get(hf, cfg, m.renormalize, False))
    dense = set(_get(hf, cfg, m.dense_layers_key, ()) or ()) if m.dense_layers_key else set()
    step = int(_get(hf, cfg, m.sparse_step_key, 1) or 1) if m.sparse_step_key else 1
    sparse = tuple(i not in dense and (i + 1) % step == 0 for i in range(n_layers))
    return MoeSpec(n_exp, int(_get(hf, cfg, m.top_k_key)), renorm, sparse)


def rope_inv_freq(cfg: dict[str, Any], kind: str = "") -> tuple[Tensor, float]:
    """Inverse frequencies and attention scaling of RoPE table ``kind`` (``rope_kinds``), through
    transformers' RoPE functions for every scaled type. Fewer frequencies than head_dim / 2: a
    partial rotary (``partial_rotary_factor``, Phi-4-mini), the other dims pass through."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = hf_config(cfg)
    params = getattr(hf, "rope_parameters", None) or {}
    if kind:
        params = params[kind]
    rtype = params.get("rope_type", "default")
    if rtype == "default":
        head_dim = head_dim_of(hf, cfg)
        base = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
        d = int(head_dim * params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)))
        return 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d)), 1.0
    if kind:
        inv, scale = ROPE_INIT_FUNCTIONS[rtype](hf, torch.device("cpu"), layer_type=kind)
    else:
        inv, scale = ROPE_INIT_FUNCTIONS[rtype](hf, torch.device("cpu"))
    return inv.float(), float(scale)
