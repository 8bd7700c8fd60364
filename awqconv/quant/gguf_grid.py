"""GGUF block grids for the AWQ search: ``fake_quantize(w [out, in]) -> w_hat`` on a GGML type's grid.

Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 reproduce llama.cpp's reference (no-imatrix) quantizers bit for bit in
vectorised torch (blocks of 32 along the input dim; fp32 arithmetic as in ggml-quants.c, scales
and minimums rounded to fp16 for storage); tests check them against ``gguf.quants``. Q4_K and Q6_K
are approximations (min-max sub-blocks, 6-/8-bit sub-scales), not llama.cpp's iterative search.
The search in quant/search.py takes any object with ``fake_quantize``; ``block_size`` sizes clips.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import InputError, ShapeError

GGUF_GRIDS = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q4_k", "q6_k")


def _fp16(x: Tensor) -> Tensor:
    """Round to fp16 storage and back (what the GGUF block header holds)."""
    return x.to(torch.float16).to(torch.float32)


def _round_away(x: Tensor) -> Tensor:
    """Round half away from zero (C ``roundf``), as ggml's Q8_0 reference does."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


@dataclass(frozen=True)
class GGUFGrid:
    """``qtype`` in GGUF_GRIDS; ``block_size`` is the element count of one scale."""

    qtype: str = "q4_0"

    def __post_init__(self) -> None:
        if self.qtype not in GGUF_GRIDS:
            raise InputError(f"unknown GGUF grid {self.qtype!r}; choose from {', '.join(GGUF_GRIDS)}")

    @property
    def block_size(self) -> int:
        return {"q4_k": 32, "q6_k": 16}.get(self.qtype, 32)

    @property
    def super_block(self) -> int:
        """Row length that must divide ``in_features`` (256 for K-quants)."""
        return 256 if self.qtype.endswith("_k") else 32

    def fake_quantize(self, w: Tensor) -> Tensor:
        out, n_in = w.shape
        if n_in % self.super_block:
            raise ShapeError(
                f"in_features={n_in} is not a multiple of {self.super_block}, the {self.qtype} block"
            )
        x = w.detach().to(torch.float32)
        fn = getattr(self, f"_{self.qtype}")
        return fn(x).reshape(out, n_in)

    # -- legacy 32-element types (ggml-quants.c quantize_row_*_ref) --------------------------

    @staticmethod
    def _sym(x: Tensor, half: int) -> Tensor:
        b = x.reshape(-1, 32)
        idx = b.abs().argmax(dim=-1, keepdim=True)  # first index of the largest magnitude
        mx = torch.gather(b, -1, idx)
        d = mx / -half
        inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
        q = torch.trunc(b * inv + (half + 0.5)).clamp(0, 2 * half - 1)
        return (q - half) * _fp16(d)

    @staticmethod
    def _asym(x: Tensor, levels: int) -> Tensor:
        b = x.reshape(-1, 32)
        lo = b.amin(-1, keepdim=True)
        hi = b.amax(-1, keepdim=True)
        d = (hi - lo) / levels
        inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
        q = torch.trunc((b - lo) * inv + 0.5).clamp(0, levels)
        return q * _fp16(d) + _fp16(lo)

    def _q4_0(self, x: Tensor) -> Tensor:
        return self._sym(x, 8)

    def _q5_0(self, x: Tensor) -> Tensor:
        return self._sym(x, 16)

    def _q4_1(self, x: Tensor) -> Tensor:
        return self._asym(x, 15)

    def _q5_1(self, x: Tensor) -> Tensor:
        return self._asym(x, 31)

    def _q8_0(self, x: Tensor) -> Tensor:
        b = x.reshape(-1, 32)
        d = b.abs().amax(-1, keepdim=True) / 127
        inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
        return _round_away(b * inv) * _fp16(d)

    # -- K-quant approximations ----------------------------------------------------------------

    def _q4_k(self, x: Tensor) -> Tensor:
        """8 sub-blocks of 32 per 256: 4-bit codes, per-sub-block scale and min quantized to 6 bits
        against fp16 super-block factors (value = d*sc*q - dmin*m)."""
        b = x.reshape(-1, 8, 32)
        lo = b.amin(-1).clamp(max=0)  # llama.cpp keeps the min <= 0
        hi = b.amax(-1)
        sc = (hi - lo) / 15
        m = -lo
        d = _fp16(sc.amax(-1, keepdim=True) / 63)
        dmin = _fp16(m.amax(-1, keepdim=True) / 63)
        isc = torch.where(d == 0, torch.zeros_like(sc), torch.round(sc / d.clamp(min=1e-30))).clamp(0, 63)
        im = torch.where(dmin == 0, torch.zeros_like(m), torch.round(m / dmin.clamp(min=1e-30))).clamp(0, 63)
        step = (d * isc)[..., None]
        off = (dmin * im)[..., None]
        inv = torch.where(step == 0, torch.zeros_like(step), 1.0 / step)
        q = torch.round((b + off) * inv).clamp(0, 15)
        return q * step - off

    def _q6_k(self, x: Tensor) -> Tensor:
        """16 sub-blocks of 16 per 256: symmetric 6-bit codes (-32..31), int8 sub-scales against an
        fp16 super-block scale."""
        b = x.reshape(-1, 16, 16)
        idx = b.abs().argmax(dim=-1, keepdim=True)
        mx = torch.gather(b, -1, idx).squeeze(-1)
        sc = mx / -32
        d = _fp16(sc.abs().amax(-1, keepdim=True) / 127)
        isc = torch.where(d == 0, torch.zeros_like(sc), torch.round(sc / d.clamp(min=1e-30))).clamp(-128, 127)
        step = (d * isc)[..., None]
        inv = torch.where(step == 0, torch.zeros_like(step), 1.0 / step)
        q = torch.round(b * inv).clamp(-32, 31)
        return q * step
