"""Integer grids: turn float weights into canonical integers, and fake-quantize for the search.

AutoAWQ's min-max grid, asymmetric by default:
    s = max(max_g W - min_g W, 1e-5) / (2^b - 1),  z = clamp(-round(min_g W / s), 0, 2^b - 1),
    q = clamp(round(W / s) + z, 0, 2^b - 1)
symmetric: s = max(|W|, 1e-5) / (2^(b-1) - 1), q = clamp(round(W / s), -2^(b-1), 2^(b-1) - 1) + 2^(b-1).
Unlike AutoAWQ, ``s`` is rounded to its storage dtype *before* ``z`` and ``q`` are computed, so
the fake-quant weights the search sees are exactly ``(q - z) * s`` of the artifact.

The scale search takes any object with ``fake_quantize(w [out, in]) -> w_hat`` (the ``Grid``
protocol) so a search can target another format's grid (a GGUF block type, say).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from ..errors import ShapeError
from ..packed import PackedLinear


class Grid(Protocol):
    def fake_quantize(self, w: Tensor) -> Tensor: ...


@dataclass(frozen=True)
class IntGrid:
    """The canonical integer grid: ``bits`` bits, groups of ``group_size`` along the input dim."""

    bits: int = 4
    group_size: int = 128  # -1: one group per row
    zero_point: bool = True
    scale_dtype: torch.dtype = torch.float16

    def group_for(self, in_features: int) -> int:
        g = in_features if self.group_size == -1 else self.group_size
        if in_features % g:
            raise ShapeError(f"in_features={in_features} is not a multiple of group_size={g}")
        return g

    def quantize(self, w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``w [out, in]`` -> ``(q uint8 [out, in], zeros uint8 [out, G], scales [out, G])``."""
        out, n_in = w.shape
        g = self.group_for(n_in)
        wg = w.detach().to(torch.float32).reshape(out, n_in // g, g)
        qmax = (1 << self.bits) - 1
        if self.zero_point:
            hi, lo = wg.amax(-1), wg.amin(-1)
            s = (hi - lo).clamp(min=1e-5) / qmax
            s = _round_scale(s, self.scale_dtype)
            sf = s.to(torch.float32)
            z = (-torch.round(lo / sf)).clamp(0, qmax)
            q = (torch.round(wg / sf[..., None]) + z[..., None]).clamp(0, qmax)
        else:
            half = 1 << (self.bits - 1)
            s = wg.abs().amax(-1).clamp(min=1e-5) / (half - 1)
            s = _round_scale(s, self.scale_dtype)
            sf = s.to(torch.float32)
            q = torch.round(wg / sf[..., None]).clamp(-half, half - 1) + half
            z = torch.full_like(sf, float(half))
        return q.reshape(out, n_in).to(torch.uint8), z.to(torch.uint8), s

    def fake_quantize(self, w: Tensor) -> Tensor:
        """``(q - z) * s`` in fp32, the exact values the canonical artifact will hold."""
        out, n_in = w.shape
        g = self.group_for(n_in)
        q, z, s = self.quantize(w)
        wq = (q.to(torch.float32).reshape(out, n_in // g, g) - z.to(torch.float32)[..., None])
        return (wq * s.to(torch.float32)[..., None]).reshape(out, n_in)

    def pack(self, w: Tensor, bias: Tensor | None = None) -> PackedLinear:
        q, z, s = self.quantize(w)
        b = None if bias is None else bias.detach().to(self.scale_dtype)
        return PackedLinear.from_ints(q, z, s, self.group_for(w.shape[1]), self.bits, b)


def _round_scale(s: Tensor, dtype: torch.dtype) -> Tensor:
    """Round scales to their storage dtype, never to zero or infinity."""
    info = torch.finfo(dtype)
    return s.clamp(min=info.tiny, max=info.max).to(dtype)
