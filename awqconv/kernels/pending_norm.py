"""``PendingNorm``: a decode row whose RMSNorm is left to the next projection's merge kernel.

In a one-row decode step the residual add + RMSNorm between two projections needs a kernel of its
own only for its row-wide sum of squares (H100, Llama-2-7B shape: the two per layer cost 3.7 us in
the PDL chain). RMSNorm scales a row by r = 1 / sqrt(mean(s^2) + eps), and the next
projection is linear: W (w * s * r) = r * W (w * s). So the merge kernel that finishes the
projection before it (gemv_fused.residual_pending_norm) adds the residual, stores s and ``w * s`` (the
next GEMV's input) and parks the sum of s^2 over its block of columns; the next GEMV's merge kernel
(RoPE or SiLU, gemv_fused.py) sums those blocks and scales its sums by r before the bias.

Rounding differs from the separate norm kernel: ``w * s`` is rounded once, where the norm rounds
``s * r`` and then ``w * (s * r)``. Unlike the normed row, ``w * s`` is not small: where the
weight has entries above 1 it is stored times a power of two ``headroom`` <= 1 / max |w| (so fp16
w * s is never larger than s itself), and the merge multiplies r back by 1 / headroom, exactly.
``normed()`` gives any other consumer the row the separate kernel writes, bit for bit
(norm_act.rms_norm of the same ``s``).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .x16 import X16


@dataclass(frozen=True)
class PendingNorm:
    xw: Tensor | X16  # w * s as the next one-row GEMV's input [1, H] (an X16 in a bf16 step with X16)
    sumsq: Tensor  # fp32 [P]: the sums of s^2 over P blocks of columns
    s: Tensor  # the residual sum, in the activations' dtype
    w: Tensor  # the norm's weight
    eps: float
    headroom: float = 1.0  # xw holds w * s * headroom (a power of two)

    @property
    def x16(self) -> bool:
        return isinstance(self.xw, X16)

    def normed(self, pdl: bool = True) -> Tensor | X16:
        """The normalised row, as norm_act.rms_norm writes it (an X16 where ``xw`` is one)."""
        from .norm_act import rms_norm  # Triton import only where a GPU path runs

        return rms_norm(self.s, self.w, self.eps, x16=self.x16, pdl=pdl)
