"""The decoder's small elementwise steps as Triton kernels: (residual add +) RMSNorm, and SiLU(gate) * up.

On the GPU runtime they sit between the INT4 GEMVs; being Triton kernels they take part in the
programmatic-dependent-launch chain (launch.py), so each one's launch overlaps the kernel before.
Rounding follows the torch reference in runtime/model.py step for step: the residual sum is rounded
to the activation dtype, the normalised row is rounded before the weight multiply, SiLU is rounded
before the multiply by ``up``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .launch import pdl_launch, pdl_start, pdl_wait


@triton.jit
def rms_norm_kernel(x_ptr, r_ptr, w_ptr, sum_ptr, y_ptr, H, eps,
                    HAS_RES: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr = False):
    """One row per program: s = x (+ r), written to ``sum_ptr`` when there is a residual;
    y = w * (s * rsqrt(mean(s^2) + eps))."""
    pdl_start(USE_PDL)
    row = tl.program_id(0)
    c = tl.arange(0, BLOCK)
    m = c < H
    w = tl.load(w_ptr + c, mask=m, other=0.0).to(tl.float32)  # a constant: read before the wait
    pdl_wait(USE_PDL)
    dt = y_ptr.dtype.element_ty
    s = tl.load(x_ptr + row * H + c, mask=m, other=0.0).to(tl.float32)
    if HAS_RES:
        s = (s + tl.load(r_ptr + row * H + c, mask=m, other=0.0).to(tl.float32)).to(dt)
        tl.store(sum_ptr + row * H + c, s, mask=m)
        s = s.to(tl.float32)
    inv = 1.0 / tl.sqrt_rn(tl.sum(s * s, axis=0) / H + eps)
    y = (s * inv).to(dt).to(tl.float32)
    tl.store(y_ptr + row * H + c, (w * y).to(dt), mask=m)


@triton.jit
def silu_mul_kernel(g_ptr, u_ptr, y_ptr, N, stride_g, stride_u,
                    BLOCK: tl.constexpr, USE_PDL: tl.constexpr = False):
    """y[row] = silu(g[row]) * u[row]; g and u may be column slices of one fused output."""
    pdl_start(USE_PDL)
    pdl_wait(USE_PDL)
    row = tl.program_id(1)
    c = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = c < N
    dt = y_ptr.dtype.element_ty
    g = tl.load(g_ptr + row * stride_g + c, mask=m, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * stride_u + c, mask=m, other=0.0).to(tl.float32)
    a = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
    tl.store(y_ptr + row * N + c, (a * u).to(dt), mask=m)


def _warps(h: int) -> int:
    return 8 if h >= 4096 else 4 if h >= 1024 else 1


def _rows(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1]).contiguous()


def rms_norm(x: Tensor, w: Tensor, eps: float) -> Tensor:
    """``w * rmsnorm(x)`` over the last dim (the runtime's ``_rms_norm``)."""
    x2 = _rows(x)
    y = torch.empty_like(x2)
    H = x2.shape[1]
    rms_norm_kernel[(x2.shape[0],)](x2, x2, w, y, y, H, eps, HAS_RES=False, BLOCK=triton.next_power_of_2(H),
                                    num_warps=_warps(H), **pdl_launch(x.device))
    return y.view(x.shape)


def add_rms_norm(x: Tensor, r: Tensor, w: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``(x + r, w * rmsnorm(x + r))`` (the runtime's ``_add_rms_norm``)."""
    x2, r2 = _rows(x), _rows(r)
    s = torch.empty_like(x2)
    y = torch.empty_like(x2)
    H = x2.shape[1]
    rms_norm_kernel[(x2.shape[0],)](x2, r2, w, s, y, H, eps, HAS_RES=True, BLOCK=triton.next_power_of_2(H),
                                    num_warps=_warps(H), **pdl_launch(x.device))
    return s.view(x.shape), y.view(x.shape)


def silu_mul(g: Tensor, u: Tensor) -> Tensor:
    """``silu(g) * u`` for ``g, u [..., N]`` whose rows may be strided (slices of one fused output)."""
    lead, N = g.shape[:-1], g.shape[-1]
    g2, u2 = g.reshape(-1, N), u.reshape(-1, N)
    if g2.stride(1) != 1 or u2.stride(1) != 1:
        g2, u2 = g2.contiguous(), u2.contiguous()
    y = torch.empty(g2.shape, dtype=g.dtype, device=g.device)
    block = 1024
    silu_mul_kernel[(triton.cdiv(N, block), g2.shape[0])](g2, u2, y, N, g2.stride(0), u2.stride(0), BLOCK=block,
                                                         num_warps=4, **pdl_launch(g.device))
    return y.view(*lead, N)
