"""``Int4Linear``: one (possibly fused) quantized linear as an nn.Module, on any device.

CUDA runs the Triton kernels over the kernel layout (``ops.w4_matmul``); the CPU uses the path in
``cpu.py`` (``DEFAULT_CPU_PATH``). ``forward`` returns the fused output; ``split`` cuts it back into
the original projections. The one-row paths also take an ``X16`` row (x16.py: bf16 activations
already converted for the fp16x2 GEMV) and the fused ones a ``PendingNorm`` row (pending_norm.py:
an RMSNorm left to their merge kernel); anything else gets the bf16 or normalised row back. Construct with
``Int4Linear.from_packed([q, k, v], device=..., dtype=...)``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..packed import PackedLinear
from .cpu import DEFAULT_CPU_PATH, make_cpu_linear
from .layout import KernelWeight, supports
from .pending_norm import PendingNorm
from .x16 import X16


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

    def forward(self, x: Tensor | X16 | PendingNorm) -> Tensor:
        if isinstance(x, PendingNorm):
            return self.forward(x.normed())
        if isinstance(x, X16):
            x2 = self._one_row(x)
            if x2 is None:
                return self.forward(x.bf16())
            from .ops import w4_matmul

            return w4_matmul(x2, self.kw).view(*x.shape[:-1], self.out_features)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if self.kw is not None:
            from .ops import w4_matmul  # Triton import only where a GPU path runs

            y = w4_matmul(x2, self.kw)
        elif self.cpu_parts is not None:
            ys = [f(x2) for f in self.cpu_parts]
            y = ys[0] if len(ys) == 1 else torch.cat(ys, -1)
            y = y.to(x.dtype)
        else:
            y = torch.nn.functional.linear(x2, self.dense, self.dense_bias)
        return y.reshape(*lead, self.out_features)

    def rope_qkv(self, x: Tensor | X16 | PendingNorm, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor,
                 slot: Tensor, n_heads: int, n_kv: int, head_dim: int) -> Tensor | None:
        """For one token (``x`` [1, 1, K]), this fused QKV projection with RoPE and the KV-cache write
        in one kernel (gemv_fused.py): rotated q [1, H, 1, D], k and v stored at ``slot``. None where
        that kernel does not apply (then use ``forward`` and the separate RoPE/cache step)."""
        x2 = self._one_row(x)
        if x2 is None:
            return None
        from .gemv_fused import qkv_rope, rope_shape_ok

        if not rope_shape_ok(self.out_features, n_heads, n_kv, head_dim):
            return None
        return qkv_rope(x2, self.kw, cos.reshape(-1), sin.reshape(-1), k_cache, v_cache, slot, n_heads, n_kv,
                        head_dim)

    def silu_gate_up(self, x: Tensor | X16 | PendingNorm) -> Tensor | X16 | None:
        """For one token (``x`` [1, 1, K]), silu(gate) * up [1, 1, I] of this fused [gate; up]
        projection in one kernel (gemv_fused.py; an ``X16`` in, an ``X16`` out); None where that
        kernel does not apply."""
        x2 = self._one_row(x)
        if x2 is None:
            return None
        from .gemv_fused import gate_up_silu, glu_shape_ok

        if not glu_shape_ok(self.splits):
            return None
        return gate_up_silu(x2, self.kw).view(1, 1, -1)

    def residual_norm(self, a: Tensor | X16, residual: Tensor, w: Tensor, eps: float, x16: bool = False,
                      headroom: float = 1.0) -> tuple[Tensor, PendingNorm] | None:
        """For one token: (s = residual + this projection of ``a``, the RMSNorm of s with weight ``w``
        left pending for the next projection's merge kernel, pending_norm.py; ``x16``: its row as an
        X16; ``headroom``: a power of two its w * s is stored times), from one GEMV and one merge
        kernel (gemv_fused.py); None where they do not apply."""
        a2 = self._one_row(a)
        if a2 is None or residual.numel() != self.out_features:
            return None
        from .gemv_fused import residual_pending_norm

        s, pending = residual_pending_norm(a2, self.kw, residual.reshape(1, -1), w, eps, x16, headroom)
        return s.view(residual.shape), pending

    def _one_row(self, x: Tensor | X16 | PendingNorm) -> Tensor | X16 | PendingNorm | None:
        """``x`` as [1, K] when the fused one-row GEMV kernels can take it, else None (a
        ``PendingNorm`` as it is, its row is [1, K] already)."""
        if isinstance(x, PendingNorm):
            return x if self._one_row(x.xw) is not None else None
        t = x.t if isinstance(x, X16) else x
        if self.kw is None or t.numel() != self.in_features:  # (kernel weights exist only where Triton runs)
            return None
        from .gemv_fused import fits

        x2 = x.view(1, -1) if isinstance(x, X16) else x.reshape(1, -1)
        return x2 if fits(self.kw, x2) else None

    def split(self, y: Tensor) -> tuple[Tensor, ...]:
        return y.split(self.splits, dim=-1) if len(self.splits) > 1 else (y,)

    def extra_repr(self) -> str:
        path = "triton" if self.kw is not None else ("cpu" if self.cpu_parts is not None else "dense")
        return f"in={self.in_features}, out={self.splits}, path={path}"
