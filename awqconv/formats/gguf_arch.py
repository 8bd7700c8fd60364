"""GGUF architecture metadata: hyper-parameters, rope, experts, sliding windows, soft-capping.

Everything comes from the HF ``config.json`` (``hf_config``); keys follow llama.cpp's ``{arch}.*``
names and types. Which architectures get a GGUF, under which llama.cpp name, tensor layout and
graph constraints, is the GGUF column of the architecture registry (``awqconv/archs.py``).
``arch_problems`` is pure and feeds ``plan()``: it names every config value a family's llama.cpp
graph hard-codes otherwise (Gemma's query scale, Gemma 2's soft-caps, Qwen3-MoE's renormalized
routing, the period of the windowed layers). ``add_model_metadata`` writes into a ``GGUFWriter``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from gguf import GGUFWriter, RopeScalingType

from .. import archs
from ..archs import GgufSpec
from ..errors import UnsupportedArchitecture


def rope_params(cfg: dict[str, Any], layer_type: str = "full_attention") -> dict[str, Any]:
    """``rope_scaling`` / ``rope_parameters`` merged with top-level ``rope_theta`` (transformers 4 and 5).

    ``layer_type``: transformers 5 nests the parameters per layer type where windowed layers rotate
    differently (Gemma 3); transformers 4 Gemma 3 keeps the windowed layers' base in ``rope_local_base_freq``.
    """
    p = dict(cfg.get("rope_parameters") or {})
    if any(isinstance(v, dict) for v in p.values()):
        p = dict(p.get(layer_type) or {})
    elif layer_type == "sliding_attention" and cfg.get("rope_local_base_freq"):
        p = {"rope_theta": cfg["rope_local_base_freq"]}
    else:
        p.update(cfg.get("rope_scaling") or {})
    if p.get("rope_theta") is None:
        p["rope_theta"] = cfg.get("rope_theta") or 10000.0
    p["rope_type"] = p.get("rope_type") or p.get("type") or "default"
    return p


def head_dim(cfg: dict[str, Any]) -> int:
    return int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])


def rope_dims(cfg: dict[str, Any]) -> int:
    """Rotated dimensions per head (Phi-4-mini rotates 3/4 of each head)."""
    f = cfg.get("partial_rotary_factor") or rope_params(cfg).get("partial_rotary_factor") or 1.0
    return int(head_dim(cfg) * float(f))


def windowed_layers(cfg: dict[str, Any], spec: GgufSpec) -> list[bool]:
    """Which decoder layers transformers runs with the sliding window."""
    n = int(cfg["num_hidden_layers"])
    if not cfg.get("sliding_window"):
        return [False] * n
    if cfg.get("layer_types"):
        return [t == "sliding_attention" for t in cfg["layer_types"]]
    period = int(cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or spec.swa_period or 1)
    return [(i + 1) % period != 0 for i in range(n)]  # every period-th layer attends globally


def swa_period(cfg: dict[str, Any], spec: GgufSpec) -> int | None:
    """The period p for which llama.cpp windows exactly the layers transformers does (layer i iff
    i % p < p - 1), the default first; None if no period does."""
    want = windowed_layers(cfg, spec)
    for p in (spec.swa_period or 1, *range(1, len(want) + 2)):
        if [i % p < p - 1 for i in range(len(want))] == want:
            return p
    return None


_SOFTCAPS = ("attn_logit_softcapping", "final_logit_softcapping")  # HF keys, also llama.cpp's {arch}.* names
# config keys transformers 5 renamed when it saves a config (Qwen3-MoE's num_experts)
_RENAMED = {"num_experts": "num_local_experts"}


def config_value(cfg: dict[str, Any], key: str) -> Any:
    return cfg[key] if key in cfg else cfg.get(_RENAMED.get(key, key))


def tied_embeddings(cfg: dict[str, Any]) -> bool:
    """config.json's tie_word_embeddings; where it is left out (Gemma's configs), transformers' default
    for the model type, which is what transformers loads."""
    if "tie_word_embeddings" in cfg:
        return bool(cfg["tie_word_embeddings"])
    try:
        from transformers import AutoConfig

        return bool(AutoConfig.for_model(cfg["model_type"]).tie_word_embeddings)
    except (ImportError, KeyError, ValueError):
        return False


def _spec(cfg: dict[str, Any]) -> GgufSpec | None:
    row = archs.lookup((cfg.get("architectures") or ["?"])[0])
    return None if row is None else row.gguf


def arch_problems(cfg: dict[str, Any]) -> list[str]:
    """Why this HF config cannot become a GGUF llama.cpp runs (empty list: it can)."""
    arch = (cfg.get("architectures") or ["?"])[0]
    spec = _spec(cfg)
    if spec is None:
        supported = ", ".join(archs.gguf_supported())
        return [f"gguf: architecture {arch} has no GGUF writer in awqconv; supported: {supported}"]
    row = archs.REGISTRY[arch]
    problems = []
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                           "intermediate_size", "vocab_size", *(spec.experts or ()),
                           *([spec.expert_width_key] if spec.expert_width_key else [])) if config_value(cfg, k) is None]
    if missing:
        problems.append(f"gguf: config.json lacks {', '.join(missing)}")
        return problems
    act = cfg.get(row.runtime.act_key, "silu")
    if act not in spec.act:
        problems.append(f"gguf: {row.runtime.act_key}={act!r}; llama.cpp's {spec.arch} graph computes "
                        f"{spec.act[0]} (a gated MLP)")
    for kind in ("full_attention", "sliding_attention") if spec.swa_period else ("full_attention",):
        rp = rope_params(cfg, kind)
        allowed = ("default", "linear", "yarn", "llama3") if kind == "full_attention" else ("default",)
        if rp["rope_type"] not in allowed:
            problems.append(f"gguf: rope type {rp['rope_type']!r} ({kind}) is not written by awqconv; "
                            f"supported: {', '.join(allowed)}")
    hd = head_dim(cfg)
    if spec.heads_span_hidden and hd * cfg["num_attention_heads"] != cfg["hidden_size"]:
        problems.append(f"gguf: llama.cpp's {spec.arch} graph needs num_attention_heads * head_dim == hidden_size")
    if rope_dims(cfg) % 2:
        problems.append(f"gguf: {rope_dims(cfg)} rotary dimensions per head is odd; rotary embeddings need pairs")
    if spec.rope_permute is not None and rope_dims(cfg) != hd:
        problems.append(f"gguf: partial rotary embeddings (partial_rotary_factor) are not written for {spec.arch}")
    if not tied_embeddings(cfg) and "lm_head" not in dict(spec.global_tensors):
        problems.append(f"gguf: llama.cpp's {spec.arch} graph reuses the embedding as the output matrix; "
                        "this model has its own lm_head (tie_word_embeddings is false)")
    return problems + _family_problems(cfg, spec)


def _family_problems(cfg: dict[str, Any], spec: GgufSpec) -> list[str]:
    """What llama.cpp hard-codes for this graph that the config may contradict."""
    a, out = spec.arch, []
    for key in _SOFTCAPS:
        if cfg.get(key) and key not in spec.softcaps:
            out.append(f"gguf: llama.cpp's {a} graph does not apply {key}={cfg[key]}")
        if not cfg.get(key) and key in spec.softcaps and spec.softcap_always:
            out.append(f"gguf: llama.cpp's {a} graph always soft-caps with {key}; this config leaves it unset")
    if spec.query_scale_27b_layers:
        n_head, n_layer = int(cfg["num_attention_heads"]), int(cfg["num_hidden_layers"])
        want = cfg["hidden_size"] / n_head if n_layer == spec.query_scale_27b_layers else head_dim(cfg)
        have = float(cfg.get("query_pre_attn_scalar") or head_dim(cfg))
        if abs(have - want) > 1e-6 * want:
            out.append(f"gguf: query_pre_attn_scalar={have:g}, but llama.cpp's {a} graph scales queries by "
                       f"1/sqrt({want:g}) for a {n_layer}-layer model")
    if spec.swa_period is not None and swa_period(cfg, spec) is None:
        out.append(f"gguf: the sliding-window layers (layer_types) repeat with no period llama.cpp's {a} graph "
                   "can express (every p-th layer global)")
    if spec.swa_period is None and cfg.get("layer_types") and len(set(cfg["layer_types"])) > 1:
        kinds = sorted(set(cfg["layer_types"]))
        out.append(f"gguf: llama.cpp's {a} graph runs every layer alike; this config mixes {kinds}")
    if spec.experts:
        if cfg.get("norm_topk_prob") is False:
            out.append(f"gguf: llama.cpp's {a} graph renormalizes the top-k expert weights; norm_topk_prob is false")
        if cfg.get("mlp_only_layers") or int(cfg.get("decoder_sparse_step") or 1) != 1:
            out.append(f"gguf: llama.cpp's {a} graph routes experts in every layer; this config has dense-MLP "
                       "layers (mlp_only_layers / decoder_sparse_step)")
    return out


def check_arch(cfg: dict[str, Any]) -> tuple[str, bool]:
    """(llama.cpp architecture, whether q/k rows take the rotary permutation), or UnsupportedArchitecture."""
    problems = arch_problems(cfg)
    if problems:
        raise UnsupportedArchitecture(problems[0])
    spec = archs.REGISTRY[cfg["architectures"][0]].gguf
    return spec.arch, spec.rope_permute is not None


def add_model_metadata(w: GGUFWriter, cfg: dict[str, Any], n_vocab: int) -> None:
    """llama.cpp's ``{arch}.*`` hyper-parameters (context, widths, heads, rope, norm eps, experts, windows)."""
    spec = _spec(cfg)
    n_head = int(cfg["num_attention_heads"])
    n_kv = int(cfg.get("num_key_value_heads") or n_head)
    hd = head_dim(cfg)
    w.add_context_length(int(cfg.get("max_position_embeddings", 2048)))
    w.add_embedding_length(int(cfg["hidden_size"]))
    w.add_block_count(int(cfg["num_hidden_layers"]))
    w.add_feed_forward_length(int(cfg["intermediate_size"]))
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_rope_dimension_count(rope_dims(cfg))
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    w.add_vocab_size(n_vocab)
    rp = rope_params(cfg)
    w.add_rope_freq_base(float(rp["rope_theta"]))
    if rp["rope_type"] == "linear":
        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rp["factor"]))
    elif rp["rope_type"] == "yarn":
        w.add_rope_scaling_type(RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rp["factor"]))
        if "original_max_position_embeddings" in rp:
            w.add_rope_scaling_orig_ctx_len(int(rp["original_max_position_embeddings"]))
    if spec is None:
        return
    if spec.experts:
        w.add_expert_count(int(config_value(cfg, spec.experts[0])))
        w.add_expert_used_count(int(config_value(cfg, spec.experts[1])))
    if spec.expert_width_key:
        w.add_expert_feed_forward_length(int(config_value(cfg, spec.expert_width_key)))
    for key, add in zip(_SOFTCAPS, (w.add_attn_logit_softcapping, w.add_final_logit_softcapping)):
        if key in spec.softcaps and cfg.get(key):
            add(float(cfg[key]))
    if spec.swa_period is not None:
        if any(windowed_layers(cfg, spec)):
            w.add_sliding_window(int(cfg["sliding_window"]))
            w.add_rope_freq_base_swa(float(rope_params(cfg, "sliding_attention")["rope_theta"]))
        period = swa_period(cfg, spec)
        if period != spec.swa_period:
            w.add_sliding_window_pattern(int(period))


def llama3_rope_freqs(cfg: dict[str, Any]) -> np.ndarray | None:
    """The ``rope_freqs.weight`` divisors llama.cpp applies for Llama-3.1-style rope scaling."""
    rp = rope_params(cfg)
    if rp["rope_type"] != "llama3":
        return None
    hd, base = head_dim(cfg), float(rp["rope_theta"])
    factor, lo, hi = float(rp["factor"]), float(rp["low_freq_factor"]), float(rp["high_freq_factor"])
    old_ctx = float(rp["original_max_position_embeddings"])
    out = []
    for i in range(0, hd, 2):
        wavelen = 2 * math.pi * base ** (i / hd)
        if wavelen < old_ctx / hi:
            out.append(1.0)
        elif wavelen > old_ctx / lo:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - lo) / (hi - lo)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)
