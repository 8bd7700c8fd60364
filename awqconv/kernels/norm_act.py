"""The decoder's small elementwise steps as Triton kernels: (residual add +) RMSNorm, and act(gate) * up
(SiLU, GeLU-tanh or exact GeLU: ``ACT_CODES``).

On the GPU runtime they sit between the INT4 GEMVs; being Triton kernels they take part in the
programmatic-dependent-launch chain (launch.py), so each one's launch overlaps the kernel before.
Rounding follows the torch reference in runtime/layer_ops.py step for step: the residual sum is rounded
to the activation dtype, the normalised row is rounded before the weight multiply, SiLU is rounded
before the multiply by ``up`` (GeLU likewise). With ``x16`` the normalised row (bf16) is written as an ``X16``
(x16.py) for the one-row GEMV that reads it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .gemv_f16x2 import x16_from_f32
from .launch import pdl_launch, pdl_start, pdl_wait
from .x16 import X16

# config ``hidden_act`` names -> the kernels' ACT code: 0 SiLU, 1 GeLU with the tanh approximation
# (Gemma's "gelu_pytorch_tanh"; "gelu_new" is the same formula), 2 exact (erf) GeLU
ACT_CODES = {"silu": 0, "swish": 0, "gelu_pytorch_tanh": 1, "gelu_new": 1, "gelu": 2}


@triton.jit
def activation(g, ACT: tl.constexpr):
    """act(g) in fp32 for an ``ACT_CODES`` code, torch's formulas; GeLU-tanh's 0.5 (1 + tanh t) is
    computed as sigmoid(2t), which neither overflows nor cancels."""
    if ACT == 0:
        return g / (1.0 + tl.exp(-g))
    elif ACT == 1:
        t = 0.7978845608028654 * (g + 0.044715 * g * g * g)  # sqrt(2 / pi)
        return g / (1.0 + tl.exp(-2.0 * t))
    else:
        return 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))


@triton.jit
def rms_norm_kernel(x_ptr, r_ptr, w_ptr, sum_ptr, y_ptr, H, eps,
                    HAS_RES: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr = False,
                    X16: tl.constexpr = False):
    """One row per program: s = x (+ r), written to ``sum_ptr`` when there is a residual;
    y = w * (s * rsqrt(mean(s^2) + eps)), rounded to x's dtype (``X16``: then stored as fp16 y / 16)."""
    pdl_start(USE_PDL)
    row = tl.program_id(0)
    c = tl.arange(0, BLOCK)
    m = c < H
    w = tl.load(w_ptr + c, mask=m, other=0.0).to(tl.float32)  # a constant: read before the wait
    pdl_wait(USE_PDL)
    dt = x_ptr.dtype.element_ty
    s = tl.load(x_ptr + row * H + c, mask=m, other=0.0).to(tl.float32)
    if HAS_RES:
        s = (s + tl.load(r_ptr + row * H + c, mask=m, other=0.0).to(tl.float32)).to(dt)
        tl.store(sum_ptr + row * H + c, s, mask=m)
        s = s.to(tl.float32)
    inv = 1.0 / tl.sqrt_rn(tl.sum(s * s, axis=0) / H + eps)
    y = (s * inv).to(dt).to(tl.float32)
    if X16:
        tl.store(y_ptr + row * H + c, x16_from_f32(w * y), mask=m)
    else:
        tl.store(y_ptr + row * H + c, (w * y).to(dt), mask=m)


@triton.jit
def silu_mul_kernel(g_ptr, u_ptr, y_ptr, N, stride_g, stride_u,
                    BLOCK: tl.constexpr, USE_PDL: tl.constexpr = False, ACT: tl.constexpr = 0):
    """y[row] = act(g[row]) * u[row] (``ACT``: SiLU by default); g and u may be column slices of one
    fused output."""
    pdl_start(USE_PDL)
    pdl_wait(USE_PDL)
    row = tl.program_id(1)
    c = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = c < N
    dt = y_ptr.dtype.element_ty
    g = tl.load(g_ptr + row * stride_g + c, mask=m, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + row * stride_u + c, mask=m, other=0.0).to(tl.float32)
    a = activation(g, ACT).to(dt).to(tl.float32)
    tl.store(y_ptr + row * N + c, (a * u).to(dt), mask=m)


def _warps(h: int) -> int:
    return 8 if h >= 4096 else 4 if h >= 1024 else 1


def _rows(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1]).contiguous()


def _normed(x2: Tensor, x16: bool) -> tuple[Tensor, dict]:
    """The normalised rows' buffer and the kernel's X16 switch (``x16`` needs bf16 rows)."""
    if x16 and x2.dtype != torch.bfloat16:
        raise TypeError(f"X16 output needs bf16 activations, got {x2.dtype}")
    return torch.empty(x2.shape, dtype=torch.float16 if x16 else x2.dtype, device=x2.device), {"X16": x16}


def rms_norm(x: Tensor, w: Tensor, eps: float, x16: bool = False, pdl: bool = True) -> Tensor | X16:
    """``w * rmsnorm(x)`` over the last dim (the runtime's ``layer_ops.rms_norm``); ``x16``: as an
    ``X16``; ``pdl``: programmatic dependent launch where supported."""
    x2 = _rows(x)
    y, flag = _normed(x2, x16)
    H = x2.shape[1]
    rms_norm_kernel[(x2.shape[0],)](x2, x2, w, y, y, H, eps, HAS_RES=False, BLOCK=triton.next_power_of_2(H),
                                    num_warps=_warps(H), **flag, **pdl_launch(x.device, pdl))
    return X16(y.view(x.shape)) if x16 else y.view(x.shape)


def add_rms_norm(x: Tensor, r: Tensor, w: Tensor, eps: float, x16: bool = False,
                 pdl: bool = True) -> tuple[Tensor, Tensor | X16]:
    """``(x + r, w * rmsnorm(x + r))`` (the runtime's ``layer_ops.add_rms_norm``); ``x16``: the
    second as an ``X16``."""
    x2, r2 = _rows(x), _rows(r)
    s = torch.empty_like(x2)
    y, flag = _normed(x2, x16)
    H = x2.shape[1]
    rms_norm_kernel[(x2.shape[0],)](x2, r2, w, s, y, H, eps, HAS_RES=True, BLOCK=triton.next_power_of_2(H),
                                    num_warps=_warps(H), **flag, **pdl_launch(x.device, pdl))
    return s.view(x.shape), (X16(y.view(x.shape)) if x16 else y.view(x.shape))


def silu_mul(g: Tensor, u: Tensor, pdl: bool = True, act: str = "silu") -> Tensor:
    """``act(g) * u`` (SiLU unless ``act`` names another of ``ACT_CODES``) for ``g, u [..., N]`` whose
    rows may be strided (slices of one fused output)."""
    lead, N = g.shape[:-1], g.shape[-1]
    g2, u2 = g.reshape(-1, N), u.reshape(-1, N)
    if g2.stride(1) != 1 or u2.stride(1) != 1:
        g2, u2 = g2.contiguous(), u2.contiguous()
    y = torch.empty(g2.shape, dtype=g.dtype, device=g.device)
    block = 1024
    silu_mul_kernel[(triton.cdiv(N, block), g2.shape[0])](g2, u2, y, N, g2.stride(0), u2.stride(0), BLOCK=block,
                                                         ACT=ACT_CODES[act], num_warps=4, **pdl_launch(g.device, pdl))
    return y.view(*lead, N)
