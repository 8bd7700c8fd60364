"""The sparse MoE block of a decoder layer (Mixtral, Qwen3-MoE): router, top-k routing, experts.

Routing is transformers': softmax of the router logits in fp32, the top-k experts, their weights
renormalised to sum 1 where the row says so (archs.MoeRouting). The experts' output is
``sum_k w_k * down_e(act(gate_e x) * up_e x)``. Two ways to run the experts:
  - grouped (one token per row: every decode step, also inside a CUDA graph): every (token, expert)
    pair at once, in one launch per projection (kernels/moe.py) on a GPU or in the Triton
    interpreter, one batched product over the gathered dense experts on the CPU. No Python loop
    over experts and no host synchronisation.
  - per expert (prefills of several tokens, eager): transformers' loop over the experts that
    received tokens, each running its rows as one matrix (tile / dequantise + cuBLAS on a GPU).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..kernels.experts import ExpertLinear
from .layer_ops import StepPaths, act_mul


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class MoE(nn.Module):
    def __init__(self, router: Tensor, gate_up: ExpertLinear, down: ExpertLinear, top_k: int, renormalize: bool,
                 act: str):
        super().__init__()
        self.router = nn.Parameter(router, requires_grad=False)  # [E, hidden], dense
        self.gate_up, self.down = gate_up, down  # [gate; up] and down of every expert
        self.top_k, self.renormalize, self.act = top_k, renormalize, act

    def route(self, h2: Tensor, paths: StepPaths) -> tuple[Tensor, Tensor]:
        """(expert ids [T, k], fp32 weights [T, k]) of rows ``h2 [T, hidden]``."""
        logits = torch.nn.functional.linear(h2, self.router)
        if paths.triton:  # one kernel for softmax, top-k and renormalisation
            from ..kernels.moe import moe_route

            return moe_route(logits, self.top_k, self.renormalize, pdl=paths.pdl)
        probs = logits.float().softmax(-1)
        w, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            w = w / w.sum(-1, keepdim=True)
        return ids, w

    def forward(self, h: Tensor, paths: StepPaths) -> Tensor:
        """``h [..., hidden]`` (the post-attention norm's output) -> the block's output, same shape."""
        h2 = h.reshape(-1, h.shape[-1])
        ids, w = self.route(h2, paths)
        if h.dim() == 3 and h.shape[1] > 1 and not _capturing():
            y = self._per_expert(h2, ids, w, paths)
        else:
            y = self._grouped(h2, ids, w, paths)
        return y.view(h.shape)

    def _kernels(self, h2: Tensor) -> bool:
        """Whether the grouped Triton kernels take these rows: INT4 experts in the kernel layout with
        fp16/bf16 rows, or dense experts on a GPU."""
        if self.gate_up.kw is not None and self.down.kw is not None:
            return h2.dtype in (torch.float16, torch.bfloat16)
        return self.gate_up.dense is not None and self.down.dense is not None and h2.is_cuda

    def _grouped(self, h2: Tensor, ids: Tensor, w: Tensor, paths: StepPaths) -> Tensor:
        if self._kernels(h2):
            from ..kernels.moe import moe_experts

            return moe_experts(h2, ids.to(torch.int32).contiguous(), w.contiguous(), self.gate_up, self.down,
                               self.act, pdl=paths.pdl)
        flat = ids.reshape(-1)
        gu = self.gate_up.pairs_torch(h2, flat, self.top_k)
        gate, up = gu.split(self.gate_up.splits, -1)
        d = self.down.pairs_torch(act_mul(gate, up, self.act), flat, 1)
        return (d.view(*ids.shape, -1).float() * w[..., None]).sum(1).to(h2.dtype)

    def _per_expert(self, h2: Tensor, ids: Tensor, w: Tensor, paths: StepPaths) -> Tensor:
        y = torch.zeros_like(h2)
        for e in torch.unique(ids).tolist():  # in expert order, as transformers adds them
            tok, pos = torch.where(ids == e)
            gu = self.gate_up.expert(e, h2[tok], pdl=paths.pdl, dequant_min_m=paths.dequant_min_m)
            gate, up = gu.split(self.gate_up.splits, -1)
            a = paths.silu_mul(gate, up, self.act)
            d = self.down.expert(e, a, pdl=paths.pdl, dequant_min_m=paths.dequant_min_m)
            y.index_add_(0, tok, (d * w[tok, pos, None]).to(y.dtype))
        return y

    def extra_repr(self) -> str:
        return f"experts={self.router.shape[0]}, top_k={self.top_k}, renormalize={self.renormalize}, act={self.act}"
