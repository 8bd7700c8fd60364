"""What mlx-lm's model of each family needs from config.json, and where its tensor names differ.

mlx-lm (0.32) builds a model from ``config.json`` with its own dataclass per ``model_type``: keys it
does not know are dropped silently and missing ones take *its* defaults (Qwen2's rope_theta is 1e6,
Llama's tie_word_embeddings True, Gemma 2's soft-caps 50/30). So the config is rewritten in
mlx-lm's vocabulary, with every value it reads written explicitly: transformers 5's
``rope_parameters`` become ``rope_theta`` / ``rope_scaling`` (/ ``partial_rotary_factor``, Gemma 3's
``rope_local_base_freq``), Qwen3-MoE's ``num_local_experts`` becomes ``num_experts``, Gemma 3's
``layer_types`` becomes ``sliding_window_pattern``. What mlx-lm's model cannot compute (a head_dim it
derives differently, soft-caps it lacks) is a refusal; what it computes differently only past a
window length (windows it ignores) is a note on the model card.

Tensor names are Hugging Face's except MoE experts: mlx-lm stacks each projection of all experts
into ``{block}.switch_mlp.{gate,up,down}_proj`` ``[experts, out, in]``, and Mixtral's block is
``block_sparse_moe`` where transformers 5 says ``mlp``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
_LEGACY = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}  # Mixtral checkpoint names
EXPERT = re.compile(r"^(?P<layer>.+)\.(?P<block>mlp|block_sparse_moe)\.experts\.(?P<e>\d+)\."
                    r"(?P<proj>gate_proj|up_proj|down_proj|w1|w2|w3)(?P<part>\.weight|\.bias)?$")
ROUTER = re.compile(r"^(?P<layer>.+)\.(?P<block>mlp|block_sparse_moe)\.gate\.weight$")
SWITCH = re.compile(r"^(?P<layer>.+)\.(?P<block>mlp|block_sparse_moe)\.switch_mlp\.(?P<proj>gate_proj|up_proj|down_proj)$")


@dataclass(frozen=True)
class Family:
    model_type: str  # the mlx_lm.models module that runs it
    moe_block: str | None = None  # where switch_mlp and the router live (MoE only)
    derives_head_dim: bool = False  # mlx-lm computes hidden_size // num_attention_heads
    tied_only: bool = False  # mlx-lm's model has no lm_head: the embedding is always the output matrix
    no_attention_bias: bool = False  # mlx-lm builds q/k/v/o without biases
    ignores_window: bool = False  # mlx-lm attends over the whole context on every layer


FAMILIES: dict[str, Family] = {
    "LlamaForCausalLM": Family("llama"),
    "MistralForCausalLM": Family("llama", ignores_window=True),
    "Qwen2ForCausalLM": Family("qwen2", derives_head_dim=True, ignores_window=True),
    "Qwen3ForCausalLM": Family("qwen3", no_attention_bias=True, ignores_window=True),
    "GemmaForCausalLM": Family("gemma", tied_only=True),
    "Gemma2ForCausalLM": Family("gemma2", tied_only=True, ignores_window=True),
    "Gemma3ForCausalLM": Family("gemma3_text"),
    "Phi3ForCausalLM": Family("phi3", derives_head_dim=True, ignores_window=True),
    "MixtralForCausalLM": Family("mixtral", moe_block="block_sparse_moe", derives_head_dim=True, ignores_window=True),
    "Qwen3MoeForCausalLM": Family("qwen3_moe", moe_block="mlp", no_attention_bias=True, ignores_window=True),
}


def family_of(hf_config: dict[str, Any]) -> tuple[str, Family | None]:
    archs = hf_config.get("architectures") or ["?"]
    return archs[0], FAMILIES.get(archs[0])


def unsupported(arch: str) -> str:
    return (f"mlx: architecture {arch} has no mlx writer; supported: {', '.join(FAMILIES)} "
            "(use hf-awq, which mlx-lm also reads, or gguf)")


# -- config ----------------------------------------------------------------------------------


def mlx_config(hf: dict[str, Any], has_lm_head: bool) -> tuple[dict[str, Any], list[str], list[str]]:
    """(config.json for mlx-lm without the quantization keys, problems, model-card notes)."""
    arch, fam = family_of(hf)
    if fam is None:
        return {}, [unsupported(arch)], []
    cfg = {k: v for k, v in hf.items() if k not in ("quantization_config", "quantization")}
    problems: list[str] = []
    notes: list[str] = []
    rope = hf.get("rope_parameters")
    if fam.model_type == "gemma3_text":
        problems += _gemma3(cfg, hf, rope)
    elif isinstance(rope, dict):
        problems += _flat_rope(cfg, hf, rope, arch)
    if "tie_word_embeddings" not in cfg:  # mlx-lm's defaults differ per family; say what the file holds
        cfg["tie_word_embeddings"] = not has_lm_head
    heads, hidden = hf.get("num_attention_heads"), hf.get("hidden_size")
    if fam.derives_head_dim and hf.get("head_dim") and heads and hidden and hf["head_dim"] * heads != hidden:
        problems.append(f"mlx: {arch} sets head_dim={hf['head_dim']} but mlx-lm's {fam.model_type} model uses "
                        f"hidden_size / num_attention_heads = {hidden // heads}; use hf-awq or gguf")
    if fam.no_attention_bias and hf.get("attention_bias"):
        problems.append(f"mlx: {arch} sets attention_bias but mlx-lm's {fam.model_type} model has no "
                        "attention biases; use hf-awq or gguf")
    if fam.model_type == "gemma2":
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            if hf.get(key) is None:  # mlx-lm always soft-caps; missing would mean its default
                problems.append(f"mlx: Gemma 2 without {key} cannot run in mlx-lm, which always soft-caps")
    if fam.model_type == "qwen3_moe" and "num_experts" not in cfg and "num_local_experts" in hf:
        cfg["num_experts"] = hf["num_local_experts"]
    if fam.model_type == "gemma":
        notes.append("mlx-lm's Gemma model computes the exact (erf) GeLU where transformers uses the tanh "
                     "approximation; activations differ by < 1e-3.")
    window = _window(hf)
    if fam.ignores_window and window is not None:
        notes.append(f"The source model attends within a sliding window of {window} tokens on some layers; "
                     f"mlx-lm's {fam.model_type} model attends over the whole context, so outputs differ "
                     f"from the source model's past {window} tokens.")
    return cfg, problems, notes


def _window(hf: dict[str, Any]) -> int | None:
    w = hf.get("sliding_window")
    if not isinstance(w, int) or ("use_sliding_window" in hf and not hf["use_sliding_window"]):
        return None
    limit = hf.get("max_position_embeddings")
    return None if isinstance(limit, int) and w >= limit else w


def _scaling(rope: dict[str, Any], arch: str) -> dict[str, Any] | None:
    """``rope_scaling`` as mlx-lm reads it (``type`` or ``rope_type``; Phi-3 insists on ``type``)."""
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return None
    extra = {k: v for k, v in rope.items() if k not in ("rope_theta", "type", "rope_type", "partial_rotary_factor")}
    return {**extra, "type": kind, "rope_type": kind}


def _flat_rope(cfg: dict[str, Any], hf: dict[str, Any], rope: dict[str, Any], arch: str) -> list[str]:
    if "rope_theta" not in rope and "rope_theta" not in hf:
        return [f"mlx: {arch}'s rope_parameters hold no rope_theta; mlx-lm would use its own default"]
    cfg.setdefault("rope_theta", rope.get("rope_theta"))
    if hf.get("rope_scaling") is None:
        scaling = _scaling(rope, arch)
        if scaling is not None:
            cfg["rope_scaling"] = scaling
    if rope.get("partial_rotary_factor") is not None and hf.get("partial_rotary_factor") is None:
        cfg["partial_rotary_factor"] = rope["partial_rotary_factor"]
    omp = "original_max_position_embeddings"  # Phi-3's longrope and Llama 3 read it at the top level too
    if rope.get(omp) is not None and hf.get(omp) is None:
        cfg[omp] = rope[omp]
    return []


def _gemma3(cfg: dict[str, Any], hf: dict[str, Any], rope: Any) -> list[str]:
    """Gemma 3: global RoPE (theta, scaling), local theta, and the period of its global layers."""
    problems = []
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if hf.get(key) is not None:
            problems.append(f"mlx: Gemma 3 with {key}={hf[key]}: mlx-lm's gemma3_text model does not soft-cap")
    if isinstance(rope, dict) and isinstance(rope.get("full_attention"), dict):
        full, local = rope["full_attention"], rope.get("sliding_attention") or {}
        cfg.setdefault("rope_theta", full.get("rope_theta", 1_000_000.0))
        scaling = _scaling(full, "Gemma3ForCausalLM")
        if scaling is not None and hf.get("rope_scaling") is None:
            cfg["rope_scaling"] = scaling
        cfg.setdefault("rope_local_base_freq", local.get("rope_theta", 10_000.0))
        if local.get("rope_type", "default") != "default":
            problems.append("mlx: Gemma 3's sliding layers use scaled RoPE, which mlx-lm's gemma3_text model "
                            "does not apply to local layers")
    elif isinstance(rope, dict):
        problems += _flat_rope(cfg, hf, rope, "Gemma3ForCausalLM")
    types = hf.get("layer_types")
    if isinstance(types, list) and types:
        period = types.index("full_attention") + 1 if "full_attention" in types else 0
        if not period or any((t == "full_attention") != ((i + 1) % period == 0) for i, t in enumerate(types)):
            problems.append(
                "mlx: mlx-lm's gemma3_text model needs a full-attention layer every sliding_window_pattern-th "
                f"layer (and at least one); layer_types {types} do not follow that"
            )
        else:
            cfg["sliding_window_pattern"] = period
    elif "sliding_window_pattern" not in hf:
        problems.append("mlx: Gemma 3 config has neither layer_types nor sliding_window_pattern")
    return problems


# -- names -----------------------------------------------------------------------------------


def expert_key(name: str, fam: Family) -> tuple[str, int, str] | None:
    """``(mlx switch_mlp prefix, expert, naming)`` of a per-expert linear name, else None."""
    m = EXPERT.match(name)
    if m is None or m.group("part") or fam.moe_block is None:
        return None
    proj = _LEGACY.get(m.group("proj"), m.group("proj"))
    naming = "legacy" if m.group("proj") in _LEGACY else "hf"
    return f"{m.group('layer')}.{fam.moe_block}.switch_mlp.{proj}", int(m.group("e")), naming


def router_key(key: str, fam: Family) -> str:
    """The mlx-lm name of a dense tensor (MoE routers move to the family's block)."""
    m = ROUTER.match(key)
    if m is None or fam.moe_block is None:
        return key
    return f"{m.group('layer')}.{fam.moe_block}.gate.weight"


def canonical_expert(prefix: str, e: int, naming: str) -> str:
    """Inverse of :func:`expert_key`: the per-expert linear name in the source's naming."""
    m = SWITCH.match(prefix)
    assert m is not None
    proj = m.group("proj")
    if naming == "legacy":  # Mixtral checkpoints: block_sparse_moe.experts.{e}.w1/w3/w2
        legacy = {v: k for k, v in _LEGACY.items()}[proj]
        return f"{m.group('layer')}.block_sparse_moe.experts.{e}.{legacy}"
    return f"{m.group('layer')}.mlp.experts.{e}.{proj}"


def canonical_router(key: str, naming: str) -> str:
    m = ROUTER.match(key)
    if m is None:
        return key
    return f"{m.group('layer')}.{'block_sparse_moe' if naming == 'legacy' else 'mlp'}.gate.weight"
