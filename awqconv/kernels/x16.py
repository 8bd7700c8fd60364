"""``X16``: bf16 activations carried between the decode step's kernels as fp16 ``x / 16``.

The one-row fp16x2 GEMV (gemv_f16x2.py) multiplies fp16 pairs, so a bf16 row enters it as fp16
``x / 16``: exact for 2^-10 <= |x| < 2^20 (fp16's 11 significant bits hold bf16's 8), rounded to
nearest below. Converting inside the GEMV makes every program convert the same activations again
(69 against 64 us per 7B layer on the H100), so in a bf16 decode step the kernels that
produce a GEMV's input (RMSNorm, decode attention, the gate/up + SiLU epilogue) can write it
already converted. The wrapper keeps such a tensor from being read as fp16 activations: every
consumer takes it explicitly, and ``bf16()`` gives the bf16 row back for the paths that cannot.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

X16_SCALE = 0.0625  # bf16 x enters as fp16 x * X16_SCALE; GEMV sums are multiplied back by 16


@dataclass(frozen=True)
class X16:
    t: Tensor  # fp16, the bf16 activations times X16_SCALE

    @classmethod
    def of(cls, x: Tensor) -> X16:
        """A bf16 tensor converted as the GEMV converts it (fp32, times 1/16, rounded to fp16)."""
        if x.dtype != torch.bfloat16:
            raise TypeError(f"X16 carries bf16 activations, got {x.dtype}")
        return cls((x.float() * X16_SCALE).to(torch.float16))

    def bf16(self) -> Tensor:
        """The bf16 activations (exact inside the range above)."""
        return (self.t.float() / X16_SCALE).to(torch.bfloat16)

    def view(self, *shape: int) -> X16:
        return X16(self.t.view(*shape))

    @property
    def shape(self) -> torch.Size:
        return self.t.shape
