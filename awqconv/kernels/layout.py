"""The kernel layout: canonical PackedLinear integers re-laid out for the Triton INT4 kernels.

    qw     int32 [K/8, N]   word (w, n) holds q[n, 8w + j] at bit NIBBLE_SHIFTS[j]
    scales fp16|bf16 [K/G, N]   zeros uint8 [K/G, N]   bias [N] | None

N (the output dim) is contiguous so a warp reads consecutive words; 8 consecutive k share a word,
so a K tile unpacks with shifts alone and no lane exchange. Within a word, k = 8w + 2i sits at bit
4i and k = 8w + 2i + 1 at bit 16 + 4i: one ``(word >> 4i) & 0x000F000F`` then yields the pair
(q[2i], q[2i+1]) in the two 16-bit halves, the order of an fp16x2 register holding (x[2i], x[2i+1])
(the decode GEMV dequantises two weights per instruction this way). The repack is lossless
(`to_packed` inverts it bit for bit). Fused projections (QKV, gate/up) concatenate along N.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ShapeError
from ..packed import PackedLinear, pack_bits

NIBBLE_SHIFTS = (0, 16, 4, 20, 8, 24, 12, 28)  # bit offset of q[8w + j] inside word w


def _shifts(device: torch.device) -> Tensor:
    return torch.tensor(NIBBLE_SHIFTS, dtype=torch.int32, device=device)


def pack_words(q: Tensor) -> Tensor:
    """int q ``[N, K]`` (K % 8 == 0) -> int32 words ``[K/8, N]`` in the kernel nibble order."""
    n, k = q.shape
    parts = q.to(torch.int32).reshape(n, k // 8, 8) << _shifts(q.device)  # disjoint bits: sum == or
    return parts.sum(-1, dtype=torch.int32).t().contiguous()


def unpack_words(qw: Tensor) -> Tensor:
    """Inverse of :func:`pack_words`: uint8 q ``[N, K]``."""
    q = (qw.t().unsqueeze(-1) >> _shifts(qw.device)) & 15  # [N, K/8, 8]
    return q.reshape(qw.shape[1], -1).to(torch.uint8)


def supports(p: PackedLinear) -> str | None:
    """Why ``p`` cannot use the INT4 kernel layout, or None when it can."""
    if p.bits != 4:
        return f"bits={p.bits} (the INT4 kernels need 4)"
    if p.in_features % 8:
        return f"in_features={p.in_features} is not a multiple of 8"
    if p.group_size % 8:
        return f"group_size={p.group_size} is not a multiple of 8"
    return None


@dataclass(eq=False)
class KernelWeight:
    """One (possibly fused) INT4 linear in kernel layout; ``splits`` are the fused output widths."""

    qw: Tensor
    scales: Tensor
    zeros: Tensor
    bias: Tensor | None
    in_features: int
    group_size: int
    splits: tuple[int, ...]

    @property
    def out_features(self) -> int:
        return self.qw.shape[1]

    @property
    def nbytes(self) -> int:
        b = self.qw.numel() * 4 + self.scales.numel() * self.scales.element_size() + self.zeros.numel()
        return b + (0 if self.bias is None else self.bias.numel() * self.bias.element_size())

    @classmethod
    def from_packed(cls, p: PackedLinear) -> KernelWeight:
        why = supports(p)
        if why:
            raise ShapeError(f"cannot repack for the INT4 kernels: {why}")
        return cls(
            qw=pack_words(p.unpack()),
            scales=p.scales.t().contiguous(),
            zeros=p.zeros.t().contiguous(),
            bias=p.bias,
            in_features=p.in_features,
            group_size=p.group_size,
            splits=(p.out_features,),
        )

    @classmethod
    def fuse(cls, parts: list[PackedLinear]) -> KernelWeight:
        """Concatenate linears that read the same input (q/k/v, gate/up) along N."""
        kws = [cls.from_packed(p) for p in parts]
        k0 = kws[0]
        for p, kw in zip(parts, kws):
            if (kw.in_features, kw.group_size, kw.scales.dtype) != (k0.in_features, k0.group_size, k0.scales.dtype):
                raise ShapeError("fused linears must share in_features, group_size and scale dtype")
        biases = [kw.bias for kw in kws]
        bias = None
        if any(b is not None for b in biases):
            bias = torch.cat([
                b if b is not None else torch.zeros(kw.out_features, dtype=k0.scales.dtype)
                for b, kw in zip(biases, kws)
            ])
        return cls(
            qw=torch.cat([kw.qw for kw in kws], 1),
            scales=torch.cat([kw.scales for kw in kws], 1),
            zeros=torch.cat([kw.zeros for kw in kws], 1),
            bias=bias,
            in_features=k0.in_features,
            group_size=k0.group_size,
            splits=tuple(kw.out_features for kw in kws),
        )

    def to_packed(self) -> list[PackedLinear]:
        """Back to canonical PackedLinears (one per split), bit for bit."""
        out, start = [], 0
        for n in self.splits:
            sl = slice(start, start + n)
            qweight = pack_bits(unpack_words(self.qw[:, sl]), 4)
            out.append(PackedLinear(
                qweight=qweight,
                scales=self.scales[:, sl].t().contiguous(),
                zeros=self.zeros[:, sl].t().contiguous(),
                in_features=self.in_features,
                group_size=self.group_size,
                bits=4,
                bias=None if self.bias is None else self.bias[sl].contiguous(),
            ))
            start += n
        return out

    def to(self, device: torch.device | str) -> KernelWeight:
        mv = lambda t: None if t is None else t.to(device)
        return KernelWeight(mv(self.qw), mv(self.scales), mv(self.zeros), mv(self.bias),
                            self.in_features, self.group_size, self.splits)

    def dequantize_ref(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """Dense ``W [K, N]`` = (q - z) * s in fp32, cast to ``dtype`` (a torch reference)."""
        q = unpack_words(self.qw).t().to(torch.float32)  # [K, N]
        g = self.group_size
        z = self.zeros.to(torch.float32).repeat_interleave(g, 0)
        s = self.scales.to(torch.float32).repeat_interleave(g, 0)
        return ((q - z) * s).to(dtype)
