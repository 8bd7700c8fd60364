"""The experts of one MoE block as one module: E linears of one shape, stacked.

``ExpertWeight`` is the kernel layout (layout.py) of every expert stacked along a leading expert axis
(``qw [E, K/8, N]``, ``scales``/``zeros [E, K/G, N]``), so one grouped kernel launch (moe.py) can run
any (token, expert) pairs: each program finds its expert's words by offset. ``ExpertLinear`` holds the
experts in one of the forms ``Int4Linear`` knows: that kernel layout, a dense stack ``[E, N, K]``
(the CPU path and the float baseline), or per-expert CPU path callables (int4pack, dequant).
``pairs(x, ids)`` computes ``y[p] = W[ids[p]] x[p // x_div]`` for every pair at once; ``expert(e)``
gives one expert for the prefill's loop over the experts that received tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import ShapeError
from ..packed import PackedLinear
from .cpu import DEFAULT_CPU_PATH, make_cpu_linear
from .layout import KernelWeight, supports


@dataclass(eq=False)
class ExpertWeight:
    """E experts' fused linears in kernel layout, stacked: no bias (MoE experts have none)."""

    qw: Tensor  # int32 [E, K/8, N]
    scales: Tensor  # [E, K/G, N]
    zeros: Tensor  # uint8 [E, K/G, N]
    in_features: int
    group_size: int
    splits: tuple[int, ...]

    @property
    def n_experts(self) -> int:
        return self.qw.shape[0]

    @property
    def out_features(self) -> int:
        return self.qw.shape[2]

    @classmethod
    def stack(cls, experts: list[list[PackedLinear]], device: torch.device | str) -> ExpertWeight:
        """Each inner list fused along N (``KernelWeight.fuse``: [gate, up]), the experts stacked."""
        kws = [KernelWeight.fuse(parts) for parts in experts]
        k0 = kws[0]
        for kw in kws:
            if (kw.in_features, kw.group_size, kw.splits, kw.scales.dtype) != (
                    k0.in_features, k0.group_size, k0.splits, k0.scales.dtype):
                raise ShapeError("stacked experts must share shapes, group size and scale dtype")
            if kw.bias is not None:
                raise ShapeError("the grouped expert kernels take experts without a bias")
        qw = torch.stack([kw.qw for kw in kws]).to(device)
        scales = torch.stack([kw.scales for kw in kws]).to(device)
        zeros = torch.stack([kw.zeros for kw in kws]).to(device)
        return cls(qw, scales, zeros, k0.in_features, k0.group_size, k0.splits)

    def expert(self, e: int) -> KernelWeight:
        """Expert ``e`` as a KernelWeight (views, no copy)."""
        return KernelWeight(self.qw[e], self.scales[e], self.zeros[e], None, self.in_features, self.group_size,
                            self.splits)


class ExpertLinear(nn.Module):
    """E same-shaped (possibly fused) linears; see the module docstring."""

    def __init__(self, kw: ExpertWeight | None, dense: Tensor | None, cpu_parts: list[list] | None,
                 splits: tuple[int, ...], in_features: int, n_experts: int):
        super().__init__()
        self.kw, self.dense, self.cpu_parts = kw, dense, cpu_parts
        self.splits = splits
        self.in_features = in_features
        self.out_features = sum(splits)
        self.n_experts = n_experts

    @classmethod
    def from_packed(cls, experts: list[list[PackedLinear]], device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float16, mode: str = "auto") -> ExpertLinear:
        """``experts[e]``: expert e's linears fused along N. ``mode`` as ``Int4Linear.from_packed``:
        auto (the kernel layout on CUDA, the default CPU path on the CPU), triton, dense, int4pack,
        dequant."""
        device = torch.device(device)
        parts0 = experts[0]
        splits, k = tuple(p.out_features for p in parts0), parts0[0].in_features
        if mode == "auto":
            mode = "triton" if device.type == "cuda" else DEFAULT_CPU_PATH
        if mode in ("int4pack", "dequant"):
            return cls(None, None, [[make_cpu_linear(p, mode, dtype) for p in ps] for ps in experts], splits, k,
                       len(experts))
        flat = [p for ps in experts for p in ps]
        kernel_ok = (all(supports(p) is None and p.bias is None for p in flat)
                     and len({(p.group_size, p.scales.dtype) for p in flat}) == 1)
        if mode == "triton" and kernel_ok:
            return cls(ExpertWeight.stack(experts, device), None, None, splits, k, len(experts))
        dense = torch.empty(len(experts), sum(splits), k, dtype=dtype, device=device)
        for e, ps in enumerate(experts):
            dense[e] = torch.cat([p.dequantize(dtype) for p in ps]).to(device)
        return cls(None, dense, None, splits, k, len(experts))

    def expert(self, e: int, x: Tensor, pdl: bool = True, dequant_min_m: int | None = None) -> Tensor:
        """Expert ``e`` of rows ``x [M, K]``: ``[M, N]``."""
        if self.kw is not None:
            from .ops import w4_matmul  # Triton import only where a GPU path runs

            kw = dict(pdl=pdl) if dequant_min_m is None else dict(pdl=pdl, dequant_min_m=dequant_min_m)
            return w4_matmul(x.contiguous(), self.kw.expert(e), **kw)
        if self.cpu_parts is not None:
            ys = [f(x) for f in self.cpu_parts[e]]
            return (ys[0] if len(ys) == 1 else torch.cat(ys, -1)).to(x.dtype)
        return torch.nn.functional.linear(x, self.dense[e])

    def pairs_torch(self, x: Tensor, ids: Tensor, x_div: int) -> Tensor:
        """``y[p] = W[ids[p]] x[p // x_div]`` for ``x [R, K]``, ``ids [P]`` in torch: one batched
        product over the gathered experts (dense weights), else one linear per pair."""
        rows = x.repeat_interleave(x_div, 0) if x_div > 1 else x
        if self.dense is not None:
            return torch.bmm(self.dense[ids], rows[:, :, None])[:, :, 0]
        return torch.cat([self.expert(int(e), rows[i:i + 1]) for i, e in enumerate(ids.tolist())])

    def extra_repr(self) -> str:
        path = "triton" if self.kw is not None else ("cpu" if self.cpu_parts is not None else "dense")
        return f"experts={self.n_experts}, in={self.in_features}, out={self.splits}, path={path}"
