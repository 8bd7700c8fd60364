"""Pending sums: a one-row GEMV's output left as split-K sums for the next GEMV to finish.

In a one-row decode step each projection's split-K partials need a merge, and the merge carries the
next elementwise step (residual add, SiLU-mul, gemv_fused.py): a kernel of its own per projection,
each one a boundary in the launch chain. Here the GEMV programs instead add their partials into
zeroed int64 accumulators as fixed-point numbers (triton_w4.to_fixed: integer atomics, so the sum
has the same bits in any order), and the next GEMV finishes the row in its prologue
(gemv_chain.py): each of its programs computes the slice of its input it reads.

- ``PendingResidual``: s = residual + y, then the RMSNorm of s left pending (as ``PendingNorm``).
  Its consumer must store s at ``s`` (the new residual row) and the sums of s^2 of its slices.
- ``PendingSilu``: silu(gate) * up from a gate/up projection's sums, scaled by the pending RMSNorm
  of that projection's input.

``materialize()`` runs the merge kernel for any other consumer (one fixed-point "split"). The
accumulators come from a ``SumPool`` that the decode step zeroes once before its first GEMV.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .pending_norm import PendingNorm
from .x16 import X16


class SumPool:
    """Zeroed int64 accumulators for one decode step, handed out in order (``take``) after
    ``begin`` zeroes them (one fill for the whole step, outside the GEMVs' launch chain)."""

    def __init__(self) -> None:
        self.buf: Tensor | None = None
        self.used = 0

    def reserve(self, n: int, device: torch.device) -> None:
        """Room for ``n`` accumulators per step (allocate before capturing a graph)."""
        if self.buf is None or self.buf.numel() < n or self.buf.device != torch.device(device):
            self.buf = torch.zeros(n, dtype=torch.int64, device=device)

    def begin(self) -> None:
        if self.buf is None:
            raise RuntimeError("SumPool.begin: reserve() the accumulators first (Decoder.allocate_cache)")
        self.buf.zero_()
        self.used = 0

    def take(self, n: int) -> Tensor:
        """``n`` zeroed accumulators as ``[1, n]``."""
        if self.buf is None or self.used + n > self.buf.numel():
            have = 0 if self.buf is None else self.buf.numel()
            raise RuntimeError(f"SumPool: {self.used} + {n} accumulators asked of {have}; reserve more")
        view = self.buf[self.used:self.used + n].view(1, n)
        self.used += n
        return view


@dataclass(frozen=True)
class PendingResidual:
    acc: Tensor  # int64 [1, N]: the projection's fixed-point sums, bias not added
    bias: Tensor | None
    residual: Tensor  # [1, N], the activations' dtype
    s: Tensor  # [1, N]: where the consumer stores s = residual + y
    w: Tensor  # the pending RMSNorm's weight
    eps: float
    headroom: float  # w * s is formed times this power of two (pending_norm.py)
    x16: bool  # the consumer's input as an X16 (bf16 step)
    pool: SumPool

    @property
    def width(self) -> int:
        return self.residual.shape[-1]

    @property
    def dtype(self) -> torch.dtype:
        return self.residual.dtype

    def materialize(self) -> PendingNorm:
        """s stored, and the row as a ``PendingNorm`` (the residual merge kernel)."""
        # Triton import only where a GPU path runs
        from .gemv_chain import materialize_residual

        return materialize_residual(self)

    def normed(self) -> Tensor | X16:
        return self.materialize().normed()


@dataclass(frozen=True)
class PendingSilu:
    acc: Tensor  # int64 [1, 2I]: the [gate; up] projection's fixed-point sums, bias not added
    bias: Tensor | None
    sumsq: Tensor  # fp32: the sums of s^2 of the projection's input s, one per slice
    h_norm: int  # the width of s
    eps: float
    unscale: float  # 1 / the pending norm's headroom
    dtype: torch.dtype  # the activations' dtype
    x16: bool
    pool: SumPool

    @property
    def width(self) -> int:
        return self.acc.shape[-1] // 2

    def materialize(self) -> Tensor | X16:
        """silu(gate) * up as a row (the SiLU merge kernel)."""
        # Triton import only where a GPU path runs
        from .gemv_chain import materialize_silu

        return materialize_silu(self)


PendingSum = PendingResidual | PendingSilu
