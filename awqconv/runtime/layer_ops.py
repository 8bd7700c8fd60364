"""The pieces of a decoder layer around its INT4 linears, and which implementation a Decoder uses.

The torch functions here define the rounding (the Triton kernels in kernels/norm_act.py and
kernels/rope_kv.py follow them step for step). ``StepPaths`` is a Decoder's ``RuntimeOptions``
resolved for its device and dtype: the small elementwise steps as Triton kernels on a GPU (one
launch each, in the GEMVs' programmatic-dependent-launch chain), plain torch on the CPU, and which
of the one-token GPU paths (runtime/decode_chain.py) are on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..kernels.config import DEQUANT_MIN_M
from ..kernels.x16 import X16
from .options import RuntimeOptions


def rms_norm(x: Tensor, w: Tensor, eps: float, x16: bool = False) -> Tensor | X16:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    y = w * xf.to(x.dtype)
    return X16.of(y) if x16 else y


def add_rms_norm(x: Tensor, r: Tensor, w: Tensor, eps: float, x16: bool = False) -> tuple[Tensor, Tensor | X16]:
    x = x + r
    return x, rms_norm(x, w, eps, x16)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE (half-split pairs) on the first ``cos.shape[-1]`` dims; the rest pass through (partial rotary)."""
    rot = cos.shape[-1]
    if rot < x.shape[-1]:
        return torch.cat((rotate(x[..., :rot], cos, sin), x[..., rot:]), -1)
    h = rot // 2
    x1, x2 = x[..., :h], x[..., h:]
    return x * cos + torch.cat((-x2, x1), -1) * sin


def rope_qk(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    return rotate(q, cos, sin), rotate(k, cos, sin)


def silu_mul(g: Tensor, u: Tensor) -> Tensor:
    return F.silu(g) * u


# config activation names (archs.RuntimeSpec.act_key) -> torch; kernels/norm_act.ACT_CODES has the same names
ACTS = {"silu": F.silu, "swish": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
        "gelu_new": lambda x: F.gelu(x, approximate="tanh")}


def act_mul(g: Tensor, u: Tensor, act: str = "silu") -> Tensor:
    """act(g) * u, each step rounded to the activations' dtype (as transformers' gated MLPs)."""
    return silu_mul(g, u) if act == "silu" else ACTS[act](g) * u


def softcap(x: Tensor, cap: float) -> Tensor:
    """cap * tanh(x / cap), in x's dtype step by step (transformers' Gemma 2 soft-capping)."""
    return torch.tanh(x / cap) * cap


def _attention_math(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, scale: float, cap: float | None) -> Tensor:
    """transformers' eager attention: scores * scale, soft-capped, masked, softmax in fp32 cast back,
    times v; KV heads repeated over their query heads. A query that sees no slot (left padding) gets
    zero weights, as SDPA gives it, not NaN (whose V rows would poison every later layer's cache)."""
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    sc = (q @ k.transpose(-1, -2)) * scale
    if cap is not None:
        sc = softcap(sc, cap)
    p = (sc + bias).softmax(-1, dtype=torch.float32)
    p = p.masked_fill((bias == float("-inf")).all(-1, keepdim=True), 0.0)
    return p.to(q.dtype) @ v


def attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, gqa: bool, x16: bool = False,
              slot: Tensor | None = None, pdl: bool = True, scale: float | None = None,
              cap: float | None = None) -> Tensor | X16:
    """Single-token decode: the split-KV Triton kernel on a GPU (kernels/decode_attention.py), the
    plain math on the CPU (SDPA's CPU flash kernel costs milliseconds per call there), grouping query
    heads per KV head instead of repeating K/V. Several tokens (prefill): SDPA. ``bias`` is the
    additive mask (0 or -inf), built once per step: a boolean mask made SDPA convert it in three
    small kernels per layer. ``x16``: the one-token output as an ``X16``. ``slot``: the one cache slot
    this step wrote (the GPU kernel may then read the others before the previous kernel ends).
    ``scale``: of the scores (default 1 / sqrt(D)); ``cap``: scores soft-capped before the mask
    (Gemma 2; SDPA has no such step, so several tokens then take transformers' eager math)."""
    if q.shape[2] == 1 and q.is_cuda:
        from ..kernels.decode_attention import decode_attention  # Triton import only where a GPU path runs

        return decode_attention(q, k, v, bias, slot=slot, x16=x16, pdl=pdl, scale=scale, cap=cap)
    if x16:
        return X16.of(attention(q, k, v, bias, gqa, scale=scale, cap=cap))
    B, H, T, D = q.shape
    scale = D ** -0.5 if scale is None else scale
    if cap is not None and (q.device.type != "cpu" or T != 1):
        return _attention_math(q, k, v, bias, scale, cap)
    if q.device.type != "cpu" or T != 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=gqa, scale=scale)
    hk = k.shape[1]
    qg = q.reshape(B, hk, H // hk * T, D)
    sc = (qg @ k.transpose(-1, -2)) * scale  # [B, hk, H/hk, S]
    if cap is not None:
        sc = softcap(sc, cap)
    sc = (sc + bias).softmax(-1)  # bias [B, 1, 1, S] broadcasts
    return (sc @ v).reshape(B, H, T, D)


def rope_cache_write(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, kc: Tensor, vc: Tensor,
                     slots: Tensor, n_heads: int, n_kv: int, head_dim: int, pdl: bool = True,
                     qk_norm: tuple[Tensor, Tensor, float] | None = None) -> Tensor:
    """RoPE on ``q, k [B, T, heads * D]`` (column slices of one fused QKV output), k and v into the
    caches at ``slots``: returns q as ``[B, H, T, D]``. ``qk_norm``: (q weight, k weight, eps) of a
    per-head RMSNorm before RoPE (Qwen3). One Triton kernel on a GPU (kernels/rope_kv.py)."""
    if q.is_cuda:
        from ..kernels.rope_kv import rope_kv_write  # Triton import only where a GPU path runs

        return rope_kv_write(q, k, v, cos, sin, kc, vc, slots, n_heads, n_kv, head_dim, pdl=pdl, qk_norm=qk_norm)
    B, T, _ = q.shape
    q = q.view(B, T, n_heads, head_dim)
    k = k.view(B, T, n_kv, head_dim)
    if qk_norm is not None:
        q, k = rms_norm(q, qk_norm[0], qk_norm[2]), rms_norm(k, qk_norm[1], qk_norm[2])
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    v = v.view(B, T, n_kv, head_dim).transpose(1, 2)
    q, k = rope_qk(q, k, cos, sin)
    kc.index_copy_(2, slots, k.to(kc.dtype))
    vc.index_copy_(2, slots, v.to(vc.dtype))
    return q


@dataclass(frozen=True)
class StepPaths:
    """``RuntimeOptions`` resolved for one Decoder's device and dtype (``resolve``)."""

    triton: bool = False  # RMSNorm (+ residual) and SiLU-mul as Triton kernels (norm_act.py), not torch
    pdl: bool = True  # programmatic dependent launch, passed to every kernel launch
    dequant_min_m: int = DEQUANT_MIN_M  # passed to every INT4 linear (kernels/config.py)
    x16: bool = False  # one-token steps: bf16 GEMV inputs as X16
    pending_norm: bool = False  # one-token steps: residual add + RMSNorm left to the merge kernels
    prologue: bool = False  # one-token steps: mask, RoPE rows and embedding in one kernel
    head_gemv: bool = False  # one row's lm_head on the Triton GEMV

    @classmethod
    def resolve(cls, options: RuntimeOptions, gpu: bool, dtype: torch.dtype) -> StepPaths:
        """What ``options`` turn on for a decoder on a GPU (``gpu``) or the CPU, in ``dtype``."""
        if not gpu:
            return cls(pdl=options.pdl, dequant_min_m=options.dequant_min_m)
        from ..kernels.config import PTX

        return cls(triton=True, pdl=options.pdl, dequant_min_m=options.dequant_min_m,
                   x16=options.x16 and dtype == torch.bfloat16 and PTX, pending_norm=options.pending_norm,
                   prologue=options.decode_prologue, head_gemv=options.head_gemv)

    def norm(self, x: Tensor, w: Tensor, eps: float, x16: bool = False) -> Tensor | X16:
        if self.triton:
            from ..kernels import norm_act  # Triton import only where a GPU path runs

            return norm_act.rms_norm(x, w, eps, x16=x16, pdl=self.pdl)
        return rms_norm(x, w, eps, x16)

    def add_norm(self, x: Tensor, r: Tensor, w: Tensor, eps: float, x16: bool = False) -> tuple[Tensor, Tensor | X16]:
        if self.triton:
            from ..kernels import norm_act

            return norm_act.add_rms_norm(x, r, w, eps, x16=x16, pdl=self.pdl)
        return add_rms_norm(x, r, w, eps, x16)

    def silu_mul(self, g: Tensor, u: Tensor, act: str = "silu") -> Tensor:
        """act(g) * u (SiLU unless ``act`` names another activation of ``ACTS``)."""
        if self.triton:
            from ..kernels import norm_act

            if act in norm_act.ACT_CODES:
                return norm_act.silu_mul(g, u, pdl=self.pdl, act=act)
        return act_mul(g, u, act)

    def linear(self, lin, x: Tensor) -> Tensor:
        """``lin(x)`` (an Int4Linear) with this decoder's launch options."""
        return lin(x, pdl=self.pdl, dequant_min_m=self.dequant_min_m)
