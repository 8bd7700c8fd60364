"""``Int4Linear``: one (possibly fused) quantized linear as an nn.Module, on any device.

It holds the weights in one of three forms: the kernel layout (``kw``, layout.py; run by the Triton
kernels, ``ops.w4_matmul``, on CUDA or in the interpreter), CPU path callables (``cpu.py``), or a
dense fallback weight (shapes the kernels cannot take, and the float baseline). ``forward`` returns
the fused output; ``split`` cuts it back into the original projections. Construct with
``Int4Linear.from_packed([q, k, v], device=..., dtype=...)``. The fused one-token decode kernels
that read ``kw`` directly are the runtime's (runtime/decode_chain.py).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..packed import PackedLinear
from .config import DEQUANT_MIN_M
from .cpu import DEFAULT_CPU_PATH, make_cpu_linear
from .layout import KernelWeight, supports


class Int4Linear(nn.Module):
    def __init__(self, kw: KernelWeight | None, cpu_parts: list | None, splits: tuple[int, ...],
                 in_features: int, dense: Tensor | None = None, bias: Tensor | None = None):
        super().__init__()
        self.kw = kw
        self.cpu_parts = cpu_parts
        self.dense = dense  # fallback weight [N, K] (shapes the kernels cannot take)
        self.dense_bias = bias
        self.splits = splits
        self.in_features = in_features
        self.out_features = sum(splits)

    @classmethod
    def from_packed(cls, parts: list[PackedLinear], device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float16, mode: str = "auto") -> Int4Linear:
        """``mode``: auto (Triton on CUDA, ``DEFAULT_CPU_PATH`` on the CPU), triton (any device; the
        CPU needs TRITON_INTERPRET=1), dense (dequantised float weights, the float baseline), or a
        CPU path name (int4pack, dequant)."""
        device = torch.device(device)
        splits = tuple(p.out_features for p in parts)
        k = parts[0].in_features
        if mode == "auto":
            mode = "triton" if device.type == "cuda" else DEFAULT_CPU_PATH
        if mode in ("int4pack", "dequant"):
            return cls(None, [make_cpu_linear(p, mode, dtype) for p in parts], splits, k)
        kernel_ok = all(supports(p) is None for p in parts) and len({(p.group_size, p.scales.dtype) for p in parts}) == 1
        if mode == "triton" and kernel_ok:
            return cls(KernelWeight.fuse(parts).to(device), None, splits, k)
        w = torch.cat([p.dequantize(dtype).to(device) for p in parts])
        b = None
        if any(p.bias is not None for p in parts):
            b = torch.cat([p.bias.to(dtype) if p.bias is not None else torch.zeros(p.out_features, dtype=dtype)
                           for p in parts]).to(device)
        return cls(None, None, splits, k, dense=w, bias=b)

    def forward(self, x: Tensor, pdl: bool = True, dequant_min_m: int = DEQUANT_MIN_M) -> Tensor:
        """``x [..., K]`` -> ``[..., N]``. On the kernel layout: ``pdl`` (programmatic dependent
        launch where supported) and ``dequant_min_m`` (from this many rows, dequantise + cuBLAS)
        reach ``w4_matmul``."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if self.kw is not None:
            from .ops import w4_matmul  # Triton import only where a GPU path runs

            y = w4_matmul(x2, self.kw, pdl=pdl, dequant_min_m=dequant_min_m)
        elif self.cpu_parts is not None:
            ys = [f(x2) for f in self.cpu_parts]
            y = ys[0] if len(ys) == 1 else torch.cat(ys, -1)
            y = y.to(x.dtype)
        else:
            y = torch.nn.functional.linear(x2, self.dense, self.dense_bias)
        return y.reshape(*lead, self.out_features)

    def split(self, y: Tensor) -> tuple[Tensor, ...]:
        return y.split(self.splits, dim=-1) if len(self.splits) > 1 else (y,)

    def extra_repr(self) -> str:
        path = "triton" if self.kw is not None else ("cpu" if self.cpu_parts is not None else "dense")
        return f"in={self.in_features}, out={self.splits}, path={path}"
