"""One token through one decoder layer (B = T = 1): the fused one-row chain of Triton kernels.

Where the layer's weights are in the kernel layout and the row fits the one-row fp16x2 GEMV
(kernels/gemv_fused.py ``fits``), the step runs, per layer:
  - QKV + RoPE + KV-cache write: one GEMV whose merge kernel rotates q and k and stores k and v at
    this step's slot (``gemv_fused.qkv_rope``);
  - decode attention over the cache (kernels/decode_attention.py);
  - the o projection + residual add, its RMSNorm left pending (``gemv_fused.residual_pending_norm``,
    kernels/pending_norm.py) for the next merge to apply (``StepPaths.pending_norm``);
  - gate/up + SiLU(gate) * up: one GEMV whose merge kernel applies the pending norm and the
    activation (``gemv_fused.gate_up_silu``);
  - the down projection + residual add, the next layer's RMSNorm left pending.
In a bf16 step (``StepPaths.x16``) each producer writes the next GEMV's input as fp16 x / 16
(kernels/x16.py). Every piece falls back to the general path (the separate kernels, or torch on
the CPU) where its kernel does not apply: dense or CPU weights, shapes, partial rotary dims. Model
features: q/k norms run in the RoPE merge; GeLU in the gate/up merge; Gemma's norms of the attention
and MLP outputs (``post_attn``/``post_ff``) need the whole row, so those residual adds take the
projection, a norm kernel and the add + norm kernel instead of a pending norm; a MoE block
(runtime/moe.py) takes plain rows and runs its grouped expert kernels.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from ..kernels.linear import Int4Linear
from ..kernels.pending_norm import PendingNorm
from ..kernels.x16 import X16
from .layer_ops import StepPaths, attention
from .moe import MoE

if TYPE_CHECKING:  # pragma: no cover
    from .model import Layer, RMSNorm

Row = Tensor | X16 | PendingNorm  # a one-token GEMV input: a row, an X16 row, or a row with its norm pending


def one_row(lin: Int4Linear, x: Row) -> Row | None:
    """``x`` as [1, K] when the fused one-row GEMV kernels can take it for ``lin``, else None (a
    ``PendingNorm`` as it is: its row is [1, K] already)."""
    if isinstance(x, PendingNorm):
        return x if one_row(lin, x.xw) is not None else None
    t = x.t if isinstance(x, X16) else x
    if lin.kw is None or t.numel() != lin.in_features:  # (kernel weights exist only where Triton runs)
        return None
    from ..kernels.gemv_fused import fits  # Triton import only where a GPU path runs

    x2 = x.view(1, -1) if isinstance(x, X16) else x.reshape(1, -1)
    return x2 if fits(lin.kw, x2) else None


def project(lin: Int4Linear, x: Row, paths: StepPaths) -> Tensor:
    """``lin`` of a one-token input: an ``X16`` row goes to the one-row GEMV as it is (a bf16
    output) where it fits, else back to bf16; a ``PendingNorm`` row is normalised first."""
    if isinstance(x, PendingNorm):  # its rows are [1, K]: the one token as [1, 1, N], as from any other row
        return project(lin, x.normed(pdl=paths.pdl), paths).view(1, 1, -1)
    if isinstance(x, X16):
        x2 = one_row(lin, x)
        if x2 is None:
            return paths.linear(lin, x.bf16())
        from ..kernels.ops import w4_matmul

        return w4_matmul(x2, lin.kw, pdl=paths.pdl).view(*x.shape[:-1], lin.out_features)
    return paths.linear(lin, x)


def qkv_rope(lin: Int4Linear, x: Row, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor, slot: Tensor,
             n_heads: int, n_kv: int, head_dim: int, pdl: bool = True,
             qk_norm: tuple[Tensor, Tensor, float] | None = None) -> Tensor | None:
    """This fused QKV projection of one token with (q/k norms,) RoPE and the KV-cache write in one
    GEMV + merge kernel: rotated q [1, H, 1, D], k and v stored at ``slot``. None where that kernel
    does not apply (then the projection and the separate RoPE/cache step run): partial rotary dims
    among them."""
    x2 = one_row(lin, x)
    if x2 is None or cos.shape[-1] != head_dim:
        return None
    from ..kernels import gemv_fused

    if not gemv_fused.rope_shape_ok(lin.out_features, n_heads, n_kv, head_dim):
        return None
    return gemv_fused.qkv_rope(x2, lin.kw, cos.reshape(-1), sin.reshape(-1), k_cache, v_cache, slot, n_heads, n_kv,
                               head_dim, pdl=pdl, qk_norm=qk_norm)


def gate_up_silu(lin: Int4Linear, x: Row, pdl: bool = True, act: str = "silu") -> Tensor | X16 | None:
    """act(gate) * up [1, 1, I] (SiLU, or another of norm_act.ACT_CODES) of this fused [gate; up]
    projection of one token in one GEMV + merge kernel (an ``X16`` in, an ``X16`` out); None where
    that kernel does not apply."""
    x2 = one_row(lin, x)
    if x2 is None:
        return None
    from ..kernels import gemv_fused

    if not gemv_fused.glu_shape_ok(lin.splits) or act not in gemv_fused.ACT_CODES:
        return None
    return gemv_fused.gate_up_silu(x2, lin.kw, pdl=pdl, act=act).view(1, 1, -1)


def residual_norm(lin: Int4Linear, a: Row, residual: Tensor, norm: RMSNorm, paths: StepPaths,
                  post: RMSNorm | None = None, row: bool = True) -> tuple[Tensor, Tensor | X16 | PendingNorm]:
    """(s = residual + ``post(lin(a))``, ``norm(s)``): with ``paths.pending_norm`` and no ``post``
    norm, one GEMV + merge kernel that leaves the norm pending for the next projection's merge
    where it applies; else the projection, ``post`` (Gemma's norm of a block's output) and the
    add + RMSNorm step. ``row=False``: ``norm(s)`` as a plain tensor (for a MoE block, which is no
    one-row GEMV)."""
    if paths.pending_norm and post is None and row:
        a2 = one_row(lin, a)
        if a2 is not None and residual.numel() == lin.out_features:
            from ..kernels import gemv_fused

            s, pending = gemv_fused.residual_pending_norm(a2, lin.kw, residual.reshape(1, -1), norm.weight, norm.eps,
                                                          paths.x16, norm.headroom, pdl=paths.pdl)
            return s.view(residual.shape), pending
    y = project(lin, a, paths)
    if post is not None:
        y = paths.norm(y, post.weight, post.eps)
    return paths.add_norm(residual, y, norm.weight, norm.eps, x16=paths.x16 and row)


def layer_step(layer: Layer, x: Tensor, h: Row, cos: Tensor, sin: Tensor, kc: Tensor, vc: Tensor, slots: Tensor,
               bias: Tensor, kv_len: int, paths: StepPaths,
               nxt: RMSNorm | None = None) -> tuple[Tensor, Row]:
    """One token (``x [1, 1, hidden]``, the residual stream; ``h = ln1(x)``) through ``layer``:
    (new residual, ``nxt`` of it: the next layer's ln1 input), or without ``nxt`` (new residual,
    the MLP's output)."""
    s = layer.spec
    q = qkv_rope(layer.qkv, h, cos, sin, kc, vc, slots, s.n_heads, s.n_kv, s.head_dim, paths.pdl, layer.qk_norm)
    if q is None:
        q = layer.rope_cache(project(layer.qkv, h, paths), cos, sin, kc, vc, slots, paths)
    a = attention(q, kc[:, :, :kv_len], vc[:, :, :kv_len], bias, s.n_kv != s.n_heads, paths.x16, slots, paths.pdl,
                  s.attn_scale, s.attn_softcap)
    a = a.view(1, 1, -1) if paths.x16 else a.transpose(1, 2).reshape(1, 1, s.n_heads * s.head_dim)
    mlp = layer.mlp
    if isinstance(mlp, MoE):  # plain rows in and out
        x, h = residual_norm(layer.o, a, x, layer.ln2, paths, layer.post_attn, row=False)
        y = layer.post_norm(mlp(h, paths), layer.post_ff, paths)
        return (x, y) if nxt is None else paths.add_norm(x, y, nxt.weight, nxt.eps, x16=paths.x16)
    x, h = residual_norm(layer.o, a, x, layer.ln2, paths, layer.post_attn)
    act = gate_up_silu(mlp.gate_up, h, paths.pdl, mlp.act)
    if act is None:
        act = mlp.act_mul(project(mlp.gate_up, h, paths), paths)
    if nxt is None:
        return x, layer.post_norm(project(mlp.down, act, paths), layer.post_ff, paths)
    return residual_norm(mlp.down, act, x, nxt, paths, layer.post_ff)
