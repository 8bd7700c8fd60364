"""The fake-quant reference: a plain transformers model whose linear weights are the dequantized INT4 values.

It is the ground truth every exported artifact is compared with: same architecture (``from_config`` on
the source ``config.json``), weights from ``QuantizedModel.dequantized_state_dict``. The state dict is
written to a temporary checkpoint and loaded with ``from_pretrained``, so transformers applies exactly
the key conversions (fused MoE experts, tied embeddings) a user's load would.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch

from ._io import save_sharded
from .errors import InputError, ShapeError
from .model import QuantizedModel

log = logging.getLogger(__name__)

TOKENIZER_ASSETS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def reference_model(qm: QuantizedModel, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """An eval-mode transformers model holding ``qm.dequantized_state_dict(dtype)``."""
    from transformers import AutoModelForCausalLM

    config = {k: v for k, v in qm.hf_config.items() if k != "quantization_config"}
    state = qm.dequantized_state_dict(dtype)
    embed, head = state.get("model.embed_tokens.weight"), state.get("lm_head.weight")
    if config.get("tie_word_embeddings", False) and head is not None:
        if embed is not None and torch.equal(embed, head):
            del state["lm_head.weight"]  # tied: transformers re-ties it to the embedding
        else:
            log.warning("lm_head differs from the tied embedding; building the reference untied")
            config["tie_word_embeddings"] = False
    config["dtype"] = str(dtype).removeprefix("torch.")
    with tempfile.TemporaryDirectory(prefix="awqconv-ref-") as tmp:
        directory = Path(tmp)
        (directory / "config.json").write_text(json.dumps(config))
        save_sharded(state, directory)
        del state
        model, info = AutoModelForCausalLM.from_pretrained(
            directory, dtype=dtype, use_safetensors=True, output_loading_info=True
        )
    missing, unexpected = sorted(info.get("missing_keys", ())), sorted(info.get("unexpected_keys", ()))
    if missing or unexpected or info.get("mismatched_keys"):
        raise ShapeError(
            f"the dequantized state dict does not fit {qm.architecture}: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}, mismatched {list(info.get('mismatched_keys', ()))[:3]}"
        )
    return model.eval()


def load_tokenizer_from_assets(qm: QuantizedModel) -> Any:
    """The source model's tokenizer, rebuilt from the files carried in ``qm.assets``."""
    from transformers import AutoTokenizer

    if not any(name in qm.assets for name in TOKENIZER_ASSETS):
        raise InputError(
            "the quantized model carries no tokenizer files (assets: "
            f"{', '.join(sorted(qm.assets)) or 'none'}); re-quantize from a directory that has them"
        )
    with tempfile.TemporaryDirectory(prefix="awqconv-tok-") as tmp:
        directory = Path(tmp)
        for name, data in qm.assets.items():
            (directory / name).write_bytes(data)
        if "config.json" not in qm.assets:
            (directory / "config.json").write_text(json.dumps(qm.hf_config))
        return AutoTokenizer.from_pretrained(directory)
