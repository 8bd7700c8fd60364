"""Checks on a Hugging Face ``config.json`` before anything builds a model from it.

transformers raises deep inside model construction (or later, on a shape mismatch) when a size
field has the wrong type or the attention heads do not divide the hidden size; these checks name
the field instead.
"""

from __future__ import annotations

from typing import Any

from .errors import CorruptFileError

# size fields that must be positive integers when present
POSITIVE_INTS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "vocab_size", "max_position_embeddings", "head_dim", "moe_intermediate_size", "num_experts",
    "num_local_experts", "num_experts_per_tok", "sliding_window",
)


def validate_hf_config(config: Any, where: str) -> dict[str, Any]:
    """``config`` when its types and sizes are coherent; CorruptFileError naming the field otherwise."""
    if not isinstance(config, dict):
        raise CorruptFileError(f"{where} does not hold a JSON object; re-create it")
    archs = config.get("architectures")
    if archs is not None and (not isinstance(archs, list) or not all(isinstance(a, str) for a in archs)):
        raise CorruptFileError(f"{where}: architectures must be a list of class names, got {archs!r}")
    if "model_type" in config and not isinstance(config["model_type"], str):
        raise CorruptFileError(f"{where}: model_type must be a string, got {config['model_type']!r}")
    for key in POSITIVE_INTS:
        v = config.get(key)
        if v is None:
            continue
        if type(v) is not int or v <= 0:
            raise CorruptFileError(f"{where}: {key} must be a positive integer, got {v!r}")
    hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
    kv = config.get("num_key_value_heads")
    if hidden and heads and config.get("head_dim") is None and hidden % heads:
        raise CorruptFileError(
            f"{where}: hidden_size={hidden} is not divisible by num_attention_heads={heads}; "
            "fix the config (or give head_dim explicitly)"
        )
    if heads and kv and heads % kv:
        raise CorruptFileError(
            f"{where}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}; fix the config"
        )
    return config


def context_length(config: dict[str, Any]) -> int | None:
    """The model's context in tokens (``max_position_embeddings``, also under ``text_config``), if given."""
    for cfg in (config, config.get("text_config") or {}):
        n = cfg.get("max_position_embeddings") if isinstance(cfg, dict) else None
        if type(n) is int and n > 0:
            return n
    return None
