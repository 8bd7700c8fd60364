"""CPU paths for INT4 linears: torch's int4pack kernel, or dequantise + matmul.

``int4pack``: ``_weight_int4pack_mm_for_cpu`` computes ``(q - 8) * s + zero`` per group; with
``zero = (8 - z) * s`` and fp32 activations every product is exact in fp32 (s is fp16/bf16, the
integers need <= 5 bits), so it equals the canonical ``(q - z) * s``. ``dense``: the dequantised
weight cached once (4-8x the memory of INT4). ``dequant``: dequantise on every call (no cache).
benchmarks/cpu_linear_paths.py measures the three; ``DEFAULT_CPU_PATH`` is the winner there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ShapeError
from ..packed import PackedLinear

CPU_PATHS = ("dense", "int4pack", "dequant")
DEFAULT_CPU_PATH = "dense"


class CpuInt4Pack:
    """Weights pre-packed for ``_weight_int4pack_mm_for_cpu`` (fp32 activations)."""

    def __init__(self, p: PackedLinear):
        if p.bits != 4 or p.in_features % 2 or p.out_features % 16:
            raise ShapeError("the int4pack CPU path needs 4-bit weights, an even in_features and "
                             f"out_features divisible by 16 (got {p.out_features}); use the dense path")
        q = p.unpack().to(torch.int32)  # [N, K]
        self.w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        s = p.scales.to(torch.float32).t()  # [K/G, N]
        z = p.zeros.to(torch.float32).t()
        self.sz = torch.stack([s, (8.0 - z) * s], dim=2).contiguous()
        self.g = p.group_size
        self.bias = None if p.bias is None else p.bias.to(torch.float32)

    def __call__(self, x: Tensor) -> Tensor:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.float32), self.w, self.g, self.sz)
        return y if self.bias is None else y + self.bias


class CpuDense:
    """The dequantised weight, computed once."""

    def __init__(self, p: PackedLinear, dtype: torch.dtype = torch.float32):
        self.w = p.dequantize(dtype)
        self.bias = None if p.bias is None else p.bias.to(dtype)

    def __call__(self, x: Tensor) -> Tensor:
        return F.linear(x.to(self.w.dtype), self.w, self.bias)


class CpuDequant:
    """Dequantise on every call; keeps only the INT4 tensors resident."""

    def __init__(self, p: PackedLinear, dtype: torch.dtype = torch.float32):
        self.p, self.dtype = p, dtype
        self.bias = None if p.bias is None else p.bias.to(dtype)

    def __call__(self, x: Tensor) -> Tensor:
        return F.linear(x.to(self.dtype), self.p.dequantize(self.dtype), self.bias)


def make_cpu_linear(p: PackedLinear, path: str = DEFAULT_CPU_PATH, dtype: torch.dtype = torch.float32):
    if path == "dense":
        return CpuDense(p, dtype)
    if path == "int4pack":
        return CpuInt4Pack(p)
    if path == "dequant":
        return CpuDequant(p, dtype)
    raise ShapeError(f"unknown CPU linear path {path!r}; choose from {', '.join(CPU_PATHS)}")
