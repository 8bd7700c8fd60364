"""A transformers-shaped wrapper over the runtime Decoder, for scoring.

``RuntimeLM`` wraps a Decoder so code written for transformers models
(``model(input_ids=..., use_cache=False).logits``, e.g. ``evaluate.perplexity``) scores it: each
call is one full-sequence prefill into a fresh cache. Artifacts are read with
``awqconv.formats.read_artifact`` (checksums, reader, validation), the one way to read one;
``load_quantized`` is that same function under its former name, kept for callers not yet moved.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..formats import read_artifact as load_quantized  # noqa: F401 - former name of read_artifact
from .model import Decoder


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
