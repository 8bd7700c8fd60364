"""A decoder for every architecture the registry marks ``runs`` (archs.py), over INT4 linears with a
static KV cache.

Built from a QuantizedModel only (build.py): q/k/v and gate/up are fused into one Int4Linear each
(Phi-3 stores them fused already); MoE layers hold their experts stacked (moe.py); norms,
embeddings and lm_head come from ``qm.dense`` (HF state-dict keys). What a model needs beyond
Llama's layer comes from its ``DecoderSpec`` (spec.py): q/k norms before RoPE, norms after attention
and after the MLP (Gemma's sandwich), ``(1 + w)`` norms (their weights stored as 1 + w), scaled
embeddings, soft-capped scores and logits, a window per layer, a RoPE table per layer type, the MLP
activation, partial rotary dims. Caches are ``[B, n_kv, max_len, head_dim]``; a forward writes its T
tokens at cache slots ``slot .. slot+T-1`` (``slot`` a 0-d long tensor so the decode step can be
captured in a CUDA graph). ``key_valid [B, max_len]`` marks real (non-padding) slots; RoPE positions
are per row (left-padded batches). A one-token step runs each layer through the fused one-row
chain (decode_chain.py); ``RuntimeOptions`` (options.py) choose the GPU paths, resolved per decoder
into ``StepPaths`` (layer_ops.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UsageError
from ..kernels.linear import Int4Linear
from ..kernels.pending_norm import PendingNorm
from ..kernels.x16 import X16
from . import decode_chain
from .layer_ops import StepPaths, attention, rms_norm, rope_cache_write, softcap
from .moe import MoE
from .options import RuntimeOptions
from .spec import DecoderSpec, rope_inv_freq

__all__ = ["Decoder", "DecoderSpec", "Layer", "Mlp", "RMSNorm", "build_decoder", "rope_inv_freq"]


class RMSNorm(nn.Module):
    def __init__(self, w: Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(w, requires_grad=False)
        self.eps = eps
        # a power of two that keeps w * s as large as s at most: what a pending norm stores (fp16 s
        # cannot overflow there; kernels/pending_norm.py)
        self.headroom = 2.0 ** -max(0, math.ceil(math.log2(max(w.abs().max().item(), 1.0))))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


class Mlp(nn.Module):
    """The gated MLP: down(act(gate x) * up x), gate and up fused."""

    def __init__(self, gate_up: Int4Linear, down: Int4Linear, act: str):
        super().__init__()
        self.gate_up, self.down, self.act = gate_up, down, act

    def forward(self, h: Tensor, paths: StepPaths) -> Tensor:
        return paths.linear(self.down, self.act_mul(paths.linear(self.gate_up, h), paths))

    def act_mul(self, gate_up: Tensor, paths: StepPaths) -> Tensor:
        """act(gate) * up of the fused [gate; up] output (one kernel on a GPU)."""
        gate, up = self.gate_up.split(gate_up)
        return paths.silu_mul(gate, up, self.act)


class Layer(nn.Module):
    """One decoder layer. ``ln2`` is the norm whose output the MLP reads (post_attention_layernorm,
    or Gemma's pre_feedforward_layernorm); ``post_attn``/``post_ff`` (Gemma) normalise the attention
    and MLP outputs before the residual add; ``q_norm``/``k_norm`` act per head before RoPE."""

    def __init__(self, qkv: Int4Linear, o: Int4Linear, mlp: Mlp | MoE, ln1: RMSNorm, ln2: RMSNorm, spec: DecoderSpec,
                 index: int = 0, q_norm: RMSNorm | None = None, k_norm: RMSNorm | None = None,
                 post_attn: RMSNorm | None = None, post_ff: RMSNorm | None = None):
        super().__init__()
        self.qkv, self.o, self.mlp, self.ln1, self.ln2 = qkv, o, mlp, ln1, ln2
        self.q_norm, self.k_norm, self.post_attn, self.post_ff = q_norm, k_norm, post_attn, post_ff
        self.spec = spec
        self.window = spec.windows[index]
        self.rope_kind = spec.rope_kinds[index]

    @property
    def qk_norm(self) -> tuple[Tensor, Tensor, float] | None:
        """(q weight, k weight, eps) of the per-head norms, for the RoPE kernels."""
        if self.q_norm is None:
            return None
        return self.q_norm.weight, self.k_norm.weight, self.q_norm.eps

    def forward(self, x: Tensor, h: Tensor | X16 | PendingNorm, cos: Tensor, sin: Tensor, kc: Tensor, vc: Tensor,
                slots: Tensor, bias: Tensor, kv_len: int, paths: StepPaths,
                nxt: RMSNorm | None = None) -> tuple[Tensor, Tensor | X16 | PendingNorm]:
        """``x`` the residual stream, ``h = ln1(x)``; returns (new residual, ``nxt`` of it: the next
        layer's ln1 input), or without ``nxt`` (new residual's last term: the MLP's output).
        One token (B = T = 1) takes the fused one-row chain (decode_chain.py)."""
        B, T, _ = x.shape
        if B * T == 1:
            return decode_chain.layer_step(self, x, h, cos, sin, kc, vc, slots, bias, kv_len, paths, nxt)
        s = self.spec
        q = self.rope_cache(paths.linear(self.qkv, h), cos, sin, kc, vc, slots, paths)
        a = attention(q, kc[:, :, :kv_len], vc[:, :, :kv_len], bias, s.n_kv != s.n_heads, False, slots, paths.pdl,
                      s.attn_scale, s.attn_softcap)
        a = a.transpose(1, 2).reshape(B, T, s.n_heads * s.head_dim)
        x, h = paths.add_norm(x, self.post_norm(paths.linear(self.o, a), self.post_attn, paths), self.ln2.weight,
                              self.ln2.eps)
        y = self.post_norm(self.mlp(h, paths), self.post_ff, paths)
        return (x, y) if nxt is None else paths.add_norm(x, y, nxt.weight, nxt.eps)

    @staticmethod
    def post_norm(y: Tensor, norm: RMSNorm | None, paths: StepPaths) -> Tensor:
        return y if norm is None else paths.norm(y, norm.weight, norm.eps)

    def rope_cache(self, qkv: Tensor, cos: Tensor, sin: Tensor, kc: Tensor, vc: Tensor, slots: Tensor,
                   paths: StepPaths) -> Tensor:
        """The fused QKV output ``[B, T, N]``: q/k norms, RoPE on q and k, k and v into the cache at
        ``slots``; returns q ``[B, H, T, D]``."""
        s = self.spec
        q, k, v = self.qkv.split(qkv)
        return rope_cache_write(q, k, v, cos, sin, kc, vc, slots, s.n_heads, s.n_kv, s.head_dim, paths.pdl,
                                self.qk_norm)


class Decoder(nn.Module):
    """The whole model; owns its KV cache once ``allocate_cache`` is called."""

    def __init__(self, spec: DecoderSpec, embed: Tensor, layers: list[Layer], norm: RMSNorm,
                 lm_head: Tensor, inv_freq: Tensor | dict[str, tuple[Tensor, float]], rope_scale: float = 1.0,
                 options: RuntimeOptions | None = None):
        super().__init__()
        self.spec = spec
        self.embed = nn.Parameter(embed, requires_grad=False)
        self.layers = nn.ModuleList(layers)
        self.norm = norm
        self.lm_head = nn.Parameter(lm_head, requires_grad=False) if lm_head is not embed else None
        # RoPE per table kind (spec.rope_kinds): inverse frequencies and attention scaling
        self.rope = dict(inv_freq) if isinstance(inv_freq, dict) else {"": (inv_freq, rope_scale)}
        self.set_options(RuntimeOptions() if options is None else options)
        self.k_cache: list[Tensor] = []
        self.v_cache: list[Tensor] = []
        self.key_valid: Tensor | None = None
        self.max_len = 0
        self.rope_tables: dict[str, tuple[Tensor, Tensor]] = {}  # cos, sin [max_len, rotary dims] (allocate_cache)
        # (window, RoPE kind) of every layer, in first-use order: one mask and RoPE rows per pair a step
        self.kinds = list(dict.fromkeys((layer.window, layer.rope_kind) for layer in layers))
        self._embed_scale: tuple[torch.dtype, float] | None = None

    def set_options(self, options: RuntimeOptions) -> None:
        """Use ``options`` from the next forward on (a Generator captures its graphs with the options
        of its first steps: make a new one after a change)."""
        if not isinstance(options, RuntimeOptions):
            raise UsageError(f"options must be a RuntimeOptions, got {type(options).__name__}")
        self.options = options
        self.paths = StepPaths.resolve(options, self.device.type == "cuda", self.dtype)

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def graph_prefill(self) -> bool:
        """Whether a prefill may replay a CUDA graph: not with MoE layers, whose prefill loops over
        the experts that received tokens (data-dependent shapes)."""
        return self.spec.moe is None

    @property
    def rope_table(self) -> tuple[Tensor, Tensor] | None:
        """The first layer's RoPE table (cos, sin)."""
        return self.rope_tables.get(self.layers[0].rope_kind) if self.rope_tables else None

    def allocate_cache(self, batch: int, max_len: int) -> None:
        s = self.spec
        shape = (batch, s.n_kv, max_len, s.head_dim)
        if self.k_cache and tuple(self.k_cache[0].shape) == shape:
            return
        self.k_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(s.n_layers)]
        self.v_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(s.n_layers)]
        self.key_valid = torch.zeros(batch, max_len, dtype=torch.bool, device=self.device)
        self.max_len = max_len
        self.rope_tables = {kind: self._rope_table(max_len, *self.rope[kind]) for kind in self.rope}

    def _rope_table(self, n: int, inv_freq: Tensor, scale: float) -> tuple[Tensor, Tensor]:
        """cos and sin of RoPE at positions 0..n-1: [n, rotary dims] each, in the model's dtype."""
        freqs = torch.arange(n, device=self.device)[:, None].float() * inv_freq.to(self.device)
        emb = torch.cat((freqs, freqs), -1)
        return (emb.cos() * scale).to(self.dtype), (emb.sin() * scale).to(self.dtype)

    def cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k_cache + self.v_cache)

    def embed_scale(self) -> float | None:
        """The embedding multiplier as a value of the model's dtype (transformers rounds it so:
        sqrt(3584) = 59.87 is 60.0 in bf16)."""
        s = self.spec.embed_scale
        if s is None:
            return None
        if self._embed_scale is None or self._embed_scale[0] != self.dtype:
            self._embed_scale = (self.dtype, torch.tensor(s, dtype=self.dtype).item())
        return self._embed_scale[1]

    def forward(self, tokens: Tensor, positions: Tensor, slot: Tensor, kv_len: int,
                valid: Tensor | None = None, last_only: bool = True) -> Tensor:
        """Logits for ``tokens [B, T]`` written at cache slots ``slot..slot+T-1``.

        ``positions [B, T]`` are RoPE positions; ``valid [B, T]`` marks real tokens (default all);
        attention sees cache slots ``< kv_len`` that are valid, not in the future and, in a windowed
        layer, inside its window.
        """
        B, T = tokens.shape
        s, p = self.spec, self.paths
        if T == 1 and valid is None and p.prologue:  # one kernel per (window, RoPE) kind, not a dozen small ones
            from ..kernels.decode_prologue import decode_prologue

            slots, rows, x = slot.reshape(1), {}, None
            for window, kind in self.kinds:
                xk, cos, sin, bias = decode_prologue(tokens, positions, slot, self.embed, self.rope_tables[kind],
                                                     self.key_valid[:B], kv_len, window, self.embed_scale())
                x = xk if x is None else x
                rows[window, kind] = (cos, sin, bias)
        else:
            slots, x, rows = self._step_inputs(tokens, positions, slot, kv_len, valid)
        x16 = B * T == 1 and p.x16  # the layers' GEMV inputs as X16 (decode_chain.py)
        h = p.norm(x, self.layers[0].ln1.weight, self.layers[0].ln1.eps, x16=x16)
        for i, layer in enumerate(self.layers):
            nxt = self.layers[i + 1].ln1 if i + 1 < len(self.layers) else None
            cos, sin, bias = rows[layer.window, layer.rope_kind]
            x, h = layer(x, h, cos, sin, self.k_cache[i][:B], self.v_cache[i][:B], slots, bias, kv_len, p, nxt)
        if last_only:  # h: the last MLP's output
            x, h = x[:, -1:], h[:, -1:]
        _, x = p.add_norm(x, h, self.norm.weight, self.norm.eps)
        head = self.embed if self.lm_head is None else self.lm_head
        if p.head_gemv and x.numel() == x.shape[-1] and x.dtype == head.dtype:
            from ..kernels.dense_gemv import dense_gemv

            logits = dense_gemv(x, head, pdl=p.pdl)
        else:
            logits = F.linear(x, head)
        return logits if s.final_softcap is None else softcap(logits, s.final_softcap)

    def _step_inputs(self, tokens: Tensor, positions: Tensor, slot: Tensor, kv_len: int,
                     valid: Tensor | None) -> tuple[Tensor, Tensor, dict]:
        """The cache slots, embeddings, and per (window, RoPE kind) the RoPE cos/sin and additive
        mask of a forward, in torch (marks the slots in ``key_valid``)."""
        B, T = tokens.shape
        slots = slot + torch.arange(T, device=tokens.device)
        kv = self.key_valid[:B]
        if valid is None:
            kv.index_fill_(1, slots, True)
        else:
            kv.index_copy_(1, slots, valid.to(torch.bool))
        s_idx = torch.arange(kv_len, device=tokens.device)
        mask = kv[:, None, None, :kv_len] & (s_idx[None, None, None, :] <= slots[None, None, :, None])
        biases = {}
        for window in dict.fromkeys(w for w, _ in self.kinds):
            m = mask
            if window:
                m = mask & (slots[None, None, :, None] - s_idx[None, None, None, :] < window)
            biases[window] = torch.zeros(m.shape, dtype=self.dtype, device=m.device).masked_fill_(~m, float("-inf"))
        # positions <= slots < max_len: two gathers from the table, not eight small kernels a step
        rope = {kind: tuple(t[positions][:, None] for t in self.rope_tables[kind])
                for kind in dict.fromkeys(k for _, k in self.kinds)}
        x = F.embedding(tokens, self.embed)
        scale = self.embed_scale()
        if scale is not None:
            x = x * torch.tensor(scale, dtype=x.dtype, device=x.device)
        return slots, x, {(w, k): (*rope[k], biases[w]) for w, k in self.kinds}


from .build import build_decoder  # noqa: E402 - build.py builds the classes above
