"""The canonical packed integer weight of one linear layer: one formula, one layout, no file format.

    W[o, i] = (q[o, i] - zeros[o, i // g]) * scales[o, i // g]      q, zeros in [0, 2**bits - 1]

Groups of ``g`` run along the input dimension (``g == in_features`` is per-channel). ``qweight``
packs ``q`` densely along the input dimension, little-endian in bits: element ``i`` of a row
occupies bits ``[i*bits, (i+1)*bits)`` of that row's byte string, so for 4 bits byte ``b`` holds
``q[2b] | q[2b+1] << 4``. Symmetric quantization is the special case ``zeros == 2**(bits-1)``.
Every writer and the runtime re-lay these integers out with pure functions; nothing here knows a
file format. Whole values per byte (1, 2, 4 bits) go through ``nibbles.py``, the packer every
layout shares; widths that straddle bytes (3, 5, 6, 7) go through a bit stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import nibbles
from .errors import ShapeError

SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def packed_width(n: int, bits: int) -> int:
    """Bytes needed for ``n`` values of ``bits`` bits."""
    return (n * bits + 7) // 8


def _byte_shifts(bits: int) -> tuple[int, ...]:
    """Shifts of the ``8 // bits`` values of one byte (little-endian in bits)."""
    return tuple(bits * k for k in range(8 // bits))


def pack_bits(q: Tensor, bits: int) -> Tensor:
    """Pack uint8 values ``< 2**bits`` along the last dim into bytes (see module docstring)."""
    if not 1 <= bits <= 8:
        raise ShapeError(f"bits={bits} is out of range; use 1..8")
    q = q.to(torch.uint8)
    if bits == 8:
        return q.contiguous()
    lead, n = q.shape[:-1], q.shape[-1]
    if 8 % bits == 0:  # whole values per byte, the first in the low bits
        per = 8 // bits
        pad = (-n) % per
        if pad:
            q = torch.cat([q, q.new_zeros(*lead, pad)], dim=-1)
        return nibbles.pack(q, _byte_shifts(bits), bits=bits, dtype=torch.uint8)
    # values straddle bytes: go through single bits
    bit_idx = torch.arange(bits, dtype=torch.uint8, device=q.device)
    stream = ((q.unsqueeze(-1) >> bit_idx) & 1).reshape(*lead, n * bits)
    pad = (-stream.shape[-1]) % 8
    if pad:
        stream = torch.cat([stream, stream.new_zeros(*lead, pad)], dim=-1)
    weights = torch.tensor([1 << k for k in range(8)], dtype=torch.int32, device=q.device)
    return (stream.reshape(*lead, stream.shape[-1] // 8, 8).to(torch.int32) * weights).sum(-1).to(torch.uint8)


def unpack_bits(packed: Tensor, bits: int, n: int) -> Tensor:
    """Inverse of :func:`pack_bits`: uint8 ``[..., n]``."""
    if not 1 <= bits <= 8:
        raise ShapeError(f"bits={bits} is out of range; use 1..8")
    if packed.dtype != torch.uint8:
        raise ShapeError(f"packed weights must be uint8, got {packed.dtype}")
    if packed.shape[-1] != packed_width(n, bits):
        raise ShapeError(
            f"packed row has {packed.shape[-1]} bytes but {n} values of {bits} bits need "
            f"{packed_width(n, bits)}"
        )
    if bits == 8:
        return packed.contiguous()
    if 8 % bits == 0:
        vals = nibbles.unpack(packed, _byte_shifts(bits), bits=bits)
        return vals if vals.shape[-1] == n else vals[..., :n].contiguous()
    lead = packed.shape[:-1]
    bit_idx = torch.arange(8, dtype=torch.int32, device=packed.device)
    stream = ((packed.to(torch.int32).unsqueeze(-1) >> bit_idx) & 1).reshape(*lead, 8 * packed.shape[-1])
    stream = stream[..., : n * bits].reshape(*lead, n, bits)
    weights = torch.tensor([1 << k for k in range(bits)], dtype=torch.int32, device=packed.device)
    return (stream * weights).sum(-1).to(torch.uint8)


@dataclass(frozen=True, eq=False)
class PackedLinear:
    """Integer weights of one linear layer, ``nn.Linear``-shaped (``[out, in]``)."""

    qweight: Tensor  # uint8 [out, packed_width(in, bits)]
    scales: Tensor  # fp16 | bf16 [out, in // g]
    zeros: Tensor  # uint8 [out, in // g]
    in_features: int
    group_size: int  # g; in_features % g == 0
    bits: int = 4
    bias: Tensor | None = None  # [out], dtype of scales

    @classmethod
    def from_ints(
        cls,
        q: Tensor,
        zeros: Tensor,
        scales: Tensor,
        group_size: int,
        bits: int = 4,
        bias: Tensor | None = None,
    ) -> "PackedLinear":
        """Build from unpacked integers ``q [out, in]`` and per-group ``zeros``/``scales``."""
        if q.dim() != 2:
            raise ShapeError(f"q must be 2-D [out, in], got shape {tuple(q.shape)}")
        if q.dtype.is_floating_point:
            raise ShapeError("q must be an integer tensor; canonical weights never hold floats")
        hi = (1 << bits) - 1
        if q.numel() and (int(q.min()) < 0 or int(q.max()) > hi):
            raise ShapeError(f"q values must lie in [0, {hi}] for {bits}-bit weights")
        if zeros.numel() and (int(zeros.min()) < 0 or int(zeros.max()) > hi):
            raise ShapeError(f"zero points must lie in [0, {hi}] for {bits}-bit weights")
        p = cls(
            qweight=pack_bits(q.to(torch.uint8), bits),
            scales=scales.contiguous(),
            zeros=zeros.to(torch.uint8).contiguous(),
            in_features=q.shape[1],
            group_size=group_size,
            bits=bits,
            bias=None if bias is None else bias.contiguous(),
        )
        p.validate()
        return p

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def n_groups(self) -> int:
        return self.in_features // self.group_size

    def validate(self, name: str = "weight") -> None:
        """Raise :class:`ShapeError` naming the tensor and the rule it breaks."""
        out, g = self.out_features, self.group_size
        if not 1 <= self.bits <= 8:
            raise ShapeError(f"{name}: bits={self.bits} is out of range 1..8")
        if g <= 0 or self.in_features % g:
            raise ShapeError(
                f"{name}: in_features={self.in_features} is not a multiple of group_size={g}"
            )
        if self.qweight.dtype != torch.uint8:
            raise ShapeError(f"{name}.qweight must be uint8, got {self.qweight.dtype}")
        want = (out, packed_width(self.in_features, self.bits))
        if tuple(self.qweight.shape) != want:
            raise ShapeError(f"{name}.qweight has shape {tuple(self.qweight.shape)}, expected {want}")
        for label, t in (("scales", self.scales), ("zeros", self.zeros)):
            if tuple(t.shape) != (out, self.n_groups):
                raise ShapeError(
                    f"{name}.{label} has shape {tuple(t.shape)}, expected {(out, self.n_groups)}"
                )
        if self.scales.dtype not in SCALE_DTYPES:
            raise ShapeError(f"{name}.scales must be fp16, bf16 or fp32, got {self.scales.dtype}")
        if self.zeros.dtype != torch.uint8:
            raise ShapeError(f"{name}.zeros must be uint8, got {self.zeros.dtype}")
        if self.bias is not None and tuple(self.bias.shape) != (out,):
            raise ShapeError(f"{name}.bias has shape {tuple(self.bias.shape)}, expected {(out,)}")
        # values too: a NaN scale or an out-of-range zero would be copied into every format
        if not torch.isfinite(self.scales).all():
            raise ShapeError(f"{name}.scales holds {int((~torch.isfinite(self.scales)).sum())} NaN/inf value(s)")
        if self.bias is not None and not torch.isfinite(self.bias).all():
            raise ShapeError(f"{name}.bias holds NaN/inf values")
        if self.bits < 8 and self.zeros.numel() and int(self.zeros.max()) >= 1 << self.bits:
            raise ShapeError(f"{name}.zeros holds {int(self.zeros.max())}, out of range for {self.bits}-bit integers")

    def unpack(self) -> Tensor:
        """uint8 ``q [out, in]``."""
        return unpack_bits(self.qweight, self.bits, self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """``(q - z) * s`` evaluated in fp32 (exact for fp16/bf16 scales), then cast to ``dtype``."""
        g = self.group_size
        q = self.unpack().to(torch.float32)
        z = self.zeros.to(torch.float32).repeat_interleave(g, dim=1)
        s = self.scales.to(torch.float32).repeat_interleave(g, dim=1)
        return ((q - z) * s).to(dtype)

    def to(self, device: torch.device | str) -> "PackedLinear":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return PackedLinear(
            move(self.qweight), move(self.scales), move(self.zeros),
            self.in_features, self.group_size, self.bits, move(self.bias),
        )

    def equal(self, other: "PackedLinear") -> bool:
        """Bit-for-bit equality of every tensor and field."""
        return (
            (self.in_features, self.group_size, self.bits)
            == (other.in_features, other.group_size, other.bits)
            and bitwise_equal(self.qweight, other.qweight)
            and bitwise_equal(self.zeros, other.zeros)
            and bitwise_equal(self.scales, other.scales)
            and bitwise_equal(self.bias, other.bias)
        )


def bitwise_equal(a: Tensor | None, b: Tensor | None) -> bool:
    """Same dtype, shape and bytes (NaN payloads and signed zeros included)."""
    if a is None or b is None:
        return a is None and b is None
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    a, b = a.detach().cpu().contiguous(), b.detach().cpu().contiguous()
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
