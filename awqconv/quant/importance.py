"""llama.cpp's importance matrix from the calibration pass the quantizer already makes.

llama.cpp's imatrix tool sums ``x_j ** 2`` over every token for each input channel ``j`` of every
weight in the decoder blocks, with the number of tokens summed; for stacked MoE experts one sum and
one count per expert, over the tokens routed to that expert (tools/imatrix/imatrix.cpp,
``collect_imatrix``). llama-quantize then weights each weight's rounding error by ``sum / count``.

``ImportanceRecorder`` hooks every quantizable linear of one layer during the pass that computes
the next layer's inputs, so it sees every calibration token once, from the float model (as
llama-imatrix run on the float GGUF would). Fused experts have no module per expert: the hook on
the ``experts`` module rebuilds each expert's inputs from the routing it receives.

The weights that get quantized are the AWQ-prescaled ones, ``W * s`` with ``1/s`` folded into the
op before, so the activation that meets them is ``x / s``: :meth:`ImportanceRecorder.fold` divides
a linear's sums by ``s ** 2`` when a scale is applied (exact for a norm, a v->o or an up->down fold,
which scale the input linearly). Clipping, applied after, is a second-order change to later
inputs and is not reflected.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..model import ImportanceMatrix
from .mappings import LinearSlot
from .moe import expert_inputs, experts_call, is_fused_experts


class ImportanceRecorder:
    """Sums of ``x ** 2`` per input channel of every slot of one layer (layer-relative names)."""

    def __init__(self, layer: nn.Module, slots: list[LinearSlot]):
        self.sums: dict[str, Tensor] = {}  # fp64: up to millions of tokens are summed
        self.counts: dict[str, int] = {}
        self._handles = []
        modules = dict(layer.named_modules())
        wanted = {s.name for s in slots}
        blocks = sorted({s.name.split(".experts.")[0] for s in slots if s.index})
        for s in slots:  # an expert no token reaches keeps count 0 (llama-quantize then weighs it evenly)
            self.sums[s.name] = torch.zeros(s.shape[1], dtype=torch.float64)
            self.counts[s.name] = 0
            if not s.index:
                self._handles.append(modules[s.name].register_forward_pre_hook(self._linear_hook(s.name), with_kwargs=True))
        for b in blocks:
            experts = modules.get(f"{b}.experts")
            if is_fused_experts(experts):
                self._handles.append(experts.register_forward_pre_hook(self._experts_hook(b, experts, wanted),
                                                                       with_kwargs=True))

    def _add(self, name: str, x: Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
        self.sums[name] += flat.pow(2).sum(0).to("cpu", torch.float64)
        self.counts[name] += flat.shape[0]

    def _linear_hook(self, name: str):
        def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            self._add(name, args[0] if args else kwargs["input"])
        return hook

    def _experts_hook(self, block: str, experts: nn.Module, wanted: set[str]):
        def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden, index = experts_call(args, kwargs)
            for key, x in expert_inputs(experts, hidden, index).items():
                name = f"{block}.{key}"
                if name in wanted:
                    self._add(name, x)
        return hook

    def fold(self, names: list[str], s_in: Tensor) -> None:
        """The inputs of ``names`` are now ``x / s_in`` (an AWQ scale was folded in)."""
        div = s_in.detach().to("cpu", torch.float64).pow(2)
        for n in names:
            if n in self.sums:
                self.sums[n] /= div

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def add_to(self, imatrix: ImportanceMatrix, prefix: str) -> None:
        """Move this layer's statistics into ``imatrix`` under full names (``prefix`` + slot name)."""
        for n, s in self.sums.items():
            imatrix.sums[prefix + n] = s.to(torch.float32)
            imatrix.counts[prefix + n] = self.counts[n]
