"""QuantizedModel: what the quantizer produces and every format writer consumes.

It holds the canonical integers of every quantized linear, keyed by the Hugging Face module name
(``model.layers.3.mlp.down_proj``), every other tensor (embeddings, norms with AWQ scales already
folded in, lm_head) by its HF state-dict key, the search results, provenance, and the small files
(tokenizer, generation config, chat template) copied verbatim from the source model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .config import QuantConfig
from .errors import CorruptFileError, ShapeError
from .hfconfig import validate_hf_config
from .packed import PackedLinear


@dataclass
class ScaleRecord:
    """One smoothing decision: ``prev_op`` absorbs ``1/scales``; each of ``layers`` takes ``* scales``."""

    prev_op: str
    layers: tuple[str, ...]
    scales: Tensor  # fp32 [channels]
    alpha: float  # the grid point chosen (duo-scaling exponent); -1 when not searched
    loss_before: float  # loss with s = 1 (plain quantization)
    loss_after: float  # loss with the chosen s


@dataclass
class SearchResults:
    scales: list[ScaleRecord] = field(default_factory=list)
    clips: dict[str, Tensor] = field(default_factory=dict)  # linear name -> max |w| [out, n_groups]


@dataclass
class ImportanceMatrix:
    """llama.cpp's importance matrix, per quantized linear (HF name): the sum over calibration
    tokens of ``x_j ** 2`` per input channel, and how many tokens were summed (an expert counts only
    the tokens routed to it). ``x`` is the input that meets the AWQ-prescaled weight, i.e. the float
    model's activation divided by the AWQ scale of that channel. K-quant GGUF writers weight each
    weight's rounding error by ``sums / count``, as llama-quantize does with ``--imatrix``."""

    sums: dict[str, Tensor]  # linear name -> fp32 [in_features]
    counts: dict[str, int]
    chunk_size: int = 0  # tokens per calibration block
    chunk_count: int = 0  # calibration blocks
    datasets: list[str] = field(default_factory=list)  # what the calibration text was


@dataclass
class QuantizedModel:
    hf_config: dict[str, Any]  # source config.json, without any quantization_config
    quant_config: QuantConfig
    linears: dict[str, PackedLinear]
    dense: dict[str, Tensor]
    search: SearchResults = field(default_factory=SearchResults)
    provenance: dict[str, Any] = field(default_factory=dict)
    assets: dict[str, bytes] = field(default_factory=dict)  # file name -> bytes (tokenizer etc.)
    # AWQ-prescaled float weights of the quantized linears (scales folded, clips applied, not
    # rounded to the grid), present when the quantizer ran in this process and a target needs them,
    # or read from a canonical artifact that stored them; writers that re-quantize onto another
    # grid (GGUF q4_0, K-quants) use them instead of dequantized ints.
    prescaled: dict[str, Tensor] | None = None
    # store ``prescaled`` in the canonical artifact (prescaled*.safetensors, ~2 bytes per quantized
    # parameter) so a later GGUF export can re-quantize them; off by default (--keep-prescaled)
    keep_prescaled: bool = False
    # calibration statistics of the prescaled weights' inputs (AWQ runs in this process only);
    # K-quant GGUF variants quantize with it and save it beside the .gguf
    importance: ImportanceMatrix | None = None

    @property
    def architecture(self) -> str:
        archs = self.hf_config.get("architectures") or ["?"]
        return archs[0]

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the scales (fp16, or bf16 for bf16 models)."""
        first = next(iter(self.linears.values()))
        return first.scales.dtype

    def validate(self, where: str = "the model") -> None:
        """CorruptFileError naming the first config field, linear or dense tensor that is malformed
        or holds NaN/inf: such a model must not be written into any format."""
        validate_hf_config(self.hf_config, f"{where}: config")
        if not self.linears:
            raise CorruptFileError(f"{where}: no quantized linears")
        for name, p in self.linears.items():
            try:
                p.validate(name)
            except ShapeError as e:
                raise CorruptFileError(f"{where}: {e}; re-export or re-quantize") from None
        for key, t in self.dense.items():
            if t.is_floating_point() and not torch.isfinite(t).all():
                bad = int((~torch.isfinite(t)).sum())
                raise CorruptFileError(f"{where}: tensor {key} holds {bad} NaN/inf value(s); re-export or re-quantize")

    def dequantized_state_dict(self, dtype: torch.dtype = torch.float32, fuse_experts: bool = True) -> dict[str, Tensor]:
        """A plain HF state dict whose linear weights are the dequantized canonical values.

        With ``fuse_experts`` per-expert linears (``...experts.3.gate_proj``) are stacked back into
        the 3-D ``experts.gate_up_proj`` / ``experts.down_proj`` parameters of transformers 5 modules.
        """
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in self.dense.items()}
        for name, p in self.linears.items():
            sd[f"{name}.weight"] = p.dequantize(dtype)
            if p.bias is not None:
                sd[f"{name}.bias"] = p.bias.to(dtype)
        return fuse_expert_weights(sd) if fuse_experts else sd


_EXPERT_KEY = re.compile(r"^(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def fuse_expert_weights(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Stack ``P.experts.{e}.{gate,up,down}_proj.weight`` into ``P.experts.gate_up_proj`` [E, 2I, H]
    (gate rows first, as transformers' fused experts chunk them) and ``P.experts.down_proj`` [E, H, I]."""
    groups: dict[str, dict[str, dict[int, Tensor]]] = {}
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        m = _EXPERT_KEY.match(k)
        if m is None:
            out[k] = v
        else:
            groups.setdefault(m.group(1), {}).setdefault(m.group(3), {})[int(m.group(2))] = v
    for prefix, parts in groups.items():
        n = len(parts["down_proj"])
        out[f"{prefix}.gate_up_proj"] = torch.stack(
            [torch.cat([parts["gate_proj"][e], parts["up_proj"][e]]) for e in range(n)]
        )
        out[f"{prefix}.down_proj"] = torch.stack([parts["down_proj"][e] for e in range(n)])
    return out
