"""Loading artifacts into the runtime, and a transformers-shaped wrapper for scoring.

``load_quantized(path)`` reads any artifact through the format registry (``read_artifact``: checksums,
reader, validation) into a QuantizedModel. ``RuntimeLM`` wraps a Decoder so code written for
transformers models (``model(input_ids=..., use_cache=False).logits``, e.g. ``evaluate.perplexity``)
scores it: each call is one full-sequence prefill into a fresh cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..model import QuantizedModel
from .model import Decoder


def load_quantized(path: str | Path) -> tuple[QuantizedModel, str]:
    """``(QuantizedModel, format name)`` of the artifact at ``path``, checked (see ``read_artifact``)."""
    from ..formats import read_artifact

    return read_artifact(Path(path))


@dataclass
class _Out:
    logits: Tensor


class RuntimeLM(nn.Module):
    """``forward(input_ids [B, T]) -> .logits [B, T, V]`` over the runtime Decoder."""

    def __init__(self, decoder: Decoder):
        super().__init__()
        self.decoder = decoder

    @torch.no_grad()
    def forward(self, input_ids: Tensor, use_cache: bool = False, **_: object) -> _Out:
        d = self.decoder
        B, T = input_ids.shape
        if not d.k_cache or d.k_cache[0].shape[0] < B or d.max_len < T:
            with torch.inference_mode(False):  # the cache outlives this call: keep it a normal tensor
                d.allocate_cache(max(B, d.k_cache[0].shape[0] if d.k_cache else 0), max(T, d.max_len))
        ids = input_ids.to(d.device)
        pos = torch.arange(T, device=d.device).expand(B, T)
        d.key_valid[:B].zero_()
        logits = d(ids, pos, torch.tensor(0, device=d.device), T, last_only=False)
        return _Out(logits)
