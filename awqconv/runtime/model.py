"""A Llama-family decoder (Llama, Mistral, Qwen2, SmolLM2) over INT4 linears with a static KV cache.

Built from a QuantizedModel only: q/k/v and gate/up are fused into one Int4Linear each; norms,
embeddings and lm_head come from ``qm.dense`` (HF state-dict keys). Caches are
``[B, n_kv, max_len, head_dim]``; a forward writes its T tokens at cache slots ``slot .. slot+T-1``
(``slot`` a 0-d long tensor so the decode step can be captured in a CUDA graph). ``key_valid [B, max_len]``
marks real (non-padding) slots; RoPE positions are per row (left-padded batches). A bf16 decode
step on the GPU hands each one-row GEMV its input already as fp16 x / 16 (``X16``, kernels/x16.py).
A one-row decode step on the GPU leaves the RMSNorm inside and between layers to the next
projection's merge kernel (``PendingNorm``, kernels/pending_norm.py): no norm kernel of its own.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UnsupportedArchitecture
from ..kernels.linear import Int4Linear
from ..kernels.pending_norm import PendingNorm
from ..kernels.x16 import X16
from ..model import QuantizedModel

SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
_ACTS = {"silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


@dataclass(frozen=True)
class DecoderSpec:
    hidden: int
    n_layers: int
    n_heads: int
    n_kv: int
    head_dim: int
    vocab: int
    eps: float
    act: str
    tie: bool
    sliding_window: int | None

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> DecoderSpec:
        arch = (cfg.get("architectures") or ["?"])[0]
        if arch not in SUPPORTED:
            raise UnsupportedArchitecture(
                f"the built-in runtime does not run {arch}; supported: {', '.join(SUPPORTED)}")
        h, nh = cfg["hidden_size"], cfg["num_attention_heads"]
        sw = cfg.get("sliding_window") if cfg.get("use_sliding_window", arch == "MistralForCausalLM") else None
        return cls(hidden=h, n_layers=cfg["num_hidden_layers"], n_heads=nh,
                   n_kv=cfg.get("num_key_value_heads") or nh, head_dim=cfg.get("head_dim") or h // nh,
                   vocab=cfg["vocab_size"], eps=cfg.get("rms_norm_eps", 1e-6),
                   act=cfg.get("hidden_act", "silu"), tie=bool(cfg.get("tie_word_embeddings", False)),
                   sliding_window=sw)


def rope_inv_freq(cfg: dict[str, Any]) -> tuple[Tensor, float]:
    """Inverse frequencies and attention scaling, through transformers' RoPE table (all rope types)."""
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    kw = {k: v for k, v in cfg.items() if k not in ("model_type", "architectures", "transformers_version")}
    hf = AutoConfig.for_model(cfg.get("model_type", "llama"), **kw)
    params = getattr(hf, "rope_parameters", None) or {}
    rtype = params.get("rope_type", "default")
    if rtype == "default":
        spec = DecoderSpec.from_hf(cfg)
        base = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
        d = spec.head_dim
        return 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float32) / d)), 1.0
    inv, scale = ROPE_INIT_FUNCTIONS[rtype](hf, torch.device("cpu"))
    return inv.float(), float(scale)


def _rms_norm(x: Tensor, w: Tensor, eps: float, x16: bool = False) -> Tensor | X16:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    y = w * xf.to(x.dtype)
    return X16.of(y) if x16 else y


def _add_rms_norm(x: Tensor, r: Tensor, w: Tensor, eps: float, x16: bool = False) -> tuple[Tensor, Tensor | X16]:
    x = x + r
    return x, _rms_norm(x, w, eps, x16)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    return x * cos + torch.cat((-x2, x1), -1) * sin


def _rope_qk(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _silu_mul(g: Tensor, u: Tensor) -> Tensor:
    return F.silu(g) * u


def _attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, gqa: bool, x16: bool = False,
               slot: Tensor | None = None) -> Tensor | X16:
    """Single-token decode: the split-KV Triton kernel on a GPU (kernels/decode_attention.py), the
    plain math on the CPU (SDPA's CPU flash kernel costs milliseconds per call there), grouping query
    heads per KV head instead of repeating K/V. Several tokens (prefill): SDPA. ``bias`` is the
    additive mask (0 or -inf), built once per step: a boolean mask made SDPA convert it in three
    small kernels per layer. ``x16``: the one-token output as an ``X16``. ``slot``: the one cache slot
    this step wrote (the GPU kernel may then read the others before the previous kernel ends)."""
    if q.shape[2] == 1 and q.is_cuda:
        from ..kernels.decode_attention import (
            decode_attention,  # Triton import only where a GPU path runs
        )

        return decode_attention(q, k, v, bias, slot=slot, x16=x16)
    if x16:
        return X16.of(_attention(q, k, v, bias, gqa))
    if q.device.type != "cpu" or q.shape[2] != 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=gqa)
    B, H, T, D = q.shape
    hk = k.shape[1]
    qg = q.reshape(B, hk, H // hk * T, D)
    sc = (qg @ k.transpose(-1, -2)) * (D ** -0.5)  # [B, hk, H/hk, S]
    sc = (sc + bias).softmax(-1)  # bias [B, 1, 1, S] broadcasts
    return (sc @ v).reshape(B, H, T, D)


class _Fused:
    """The small elementwise pieces of a layer: Triton kernels on a GPU (kernels/norm_act.py, one
    launch each, in the GEMVs' programmatic-dependent-launch chain), plain torch on the CPU.
    ``x16``: one-token steps pass bf16 GEMV inputs as ``X16`` (GPU with the inline-PTX GEMV only;
    AWQCONV_X16=0 turns it off). ``pending_norm``: one-token steps leave the residual add + RMSNorm
    after the o and down projections to the merge kernels (``Layer.add_norm``; GPU only,
    AWQCONV_PENDING_NORM=0 turns it off). ``prologue``: one-token steps build their mask, RoPE rows
    and embeddings in one kernel (kernels/decode_prologue.py; GPU only, AWQCONV_DECODE_PROLOGUE=0
    turns it off). ``head_gemv``: one row's lm_head runs on the Triton GEMV (kernels/dense_gemv.py,
    ~9 % faster than cuBLAS there; GPU only, AWQCONV_HEAD_GEMV=0 turns it off)."""

    def __init__(self, gpu: bool, x16: bool = False, pending_norm: bool = True, prologue: bool = True,
                 head_gemv: bool = True):
        self.norm, self.add_norm, self.rope, self.silu_mul = _rms_norm, _add_rms_norm, _rope_qk, _silu_mul
        self.x16 = self.pending_norm = self.prologue = self.head_gemv = False
        if gpu:
            from ..kernels import norm_act  # Triton import only where a GPU path runs
            from ..kernels.ops import _PTX

            self.norm, self.add_norm, self.silu_mul = norm_act.rms_norm, norm_act.add_rms_norm, norm_act.silu_mul
            self.x16 = x16 and _PTX and _env_on("AWQCONV_X16")
            self.pending_norm = pending_norm and _env_on("AWQCONV_PENDING_NORM")
            self.prologue = prologue and _env_on("AWQCONV_DECODE_PROLOGUE")
            self.head_gemv = head_gemv and _env_on("AWQCONV_HEAD_GEMV")


def _env_on(name: str) -> bool:
    return os.environ.get(name, "1") not in ("", "0")


class RMSNorm(nn.Module):
    def __init__(self, w: Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(w, requires_grad=False)
        self.eps = eps
        # a power of two that keeps w * s as large as s at most: what a pending norm stores (fp16 s
        # cannot overflow there; kernels/pending_norm.py)
        self.headroom = 2.0 ** -max(0, math.ceil(math.log2(max(w.abs().max().item(), 1.0))))

    def forward(self, x: Tensor) -> Tensor:
        return _rms_norm(x, self.weight, self.eps)


class Layer(nn.Module):
    def __init__(self, qkv: Int4Linear, o: Int4Linear, gate_up: Int4Linear, down: Int4Linear,
                 ln1: RMSNorm, ln2: RMSNorm, spec: DecoderSpec):
        super().__init__()
        self.qkv, self.o, self.gate_up, self.down, self.ln1, self.ln2 = qkv, o, gate_up, down, ln1, ln2
        self.spec = spec
        self.act = _ACTS[spec.act]
        self.fused: _Fused | None = None  # set by Decoder

    def forward(self, x: Tensor, h: Tensor | X16 | PendingNorm, cos: Tensor, sin: Tensor, kc: Tensor, vc: Tensor,
                slots: Tensor, bias: Tensor, kv_len: int,
                nxt: RMSNorm | None = None) -> tuple[Tensor, Tensor | X16 | PendingNorm]:
        """``x`` the residual stream, ``h = ln1(x)``; returns (new residual, ``nxt`` of it: the next
        layer's ln1 input), or without ``nxt`` (new residual's last term, the down projection's output)."""
        s, f = self.spec, self.fused
        B, T, _ = x.shape
        one = B * T == 1
        x16 = one and f.x16  # (then h is an X16 too)
        # decode, one row: QKV, RoPE and the cache write in one kernel where it applies (gemv_fused.py)
        q = self.qkv.rope_qkv(h, cos, sin, kc, vc, slots, s.n_heads, s.n_kv, s.head_dim) if one else None
        if q is None:
            q, k, v = self.qkv.split(self.qkv(h))
            if q.is_cuda:  # one Triton kernel: RoPE on q and k, k and v into the cache
                from ..kernels.rope_kv import (
                    rope_kv_write,  # Triton import only where a GPU path runs
                )

                q = rope_kv_write(q, k, v, cos, sin, kc, vc, slots, s.n_heads, s.n_kv, s.head_dim)
            else:
                q = q.view(B, T, s.n_heads, s.head_dim).transpose(1, 2)
                k = k.view(B, T, s.n_kv, s.head_dim).transpose(1, 2)
                v = v.view(B, T, s.n_kv, s.head_dim).transpose(1, 2)
                q, k = f.rope(q, k, cos, sin)
                kc.index_copy_(2, slots, k.to(kc.dtype))
                vc.index_copy_(2, slots, v.to(vc.dtype))
        a = _attention(q, kc[:, :, :kv_len], vc[:, :, :kv_len], bias, s.n_kv != s.n_heads, x16, slots)
        a = a.view(B, T, -1) if x16 else a.transpose(1, 2).reshape(B, T, s.n_heads * s.head_dim)
        x, h = self.add_norm(self.o, a, x, self.ln2, one, x16)
        act = self.gate_up.silu_gate_up(h) if one and s.act == "silu" else None  # one kernel, as above
        if act is None:
            gate, up = self.gate_up.split(self.gate_up(h))
            act = f.silu_mul(gate, up) if s.act == "silu" else self.act(gate) * up
        return (x, self.down(act)) if nxt is None else self.add_norm(self.down, act, x, nxt, one, x16)

    def add_norm(self, lin: Int4Linear, a: Tensor | X16, x: Tensor, norm: RMSNorm, one: bool,
                 x16: bool) -> tuple[Tensor, Tensor | X16 | PendingNorm]:
        """(s = x + lin(a), norm(s)); in a one-row GPU step the norm is left pending (PendingNorm)."""
        f = self.fused
        done = lin.residual_norm(a, x, norm.weight, norm.eps, x16, norm.headroom) if one and f.pending_norm else None
        return done if done is not None else f.add_norm(x, lin(a), norm.weight, norm.eps, x16=x16)


class Decoder(nn.Module):
    """The whole model; owns its KV cache once ``allocate_cache`` is called."""

    def __init__(self, spec: DecoderSpec, embed: Tensor, layers: list[Layer], norm: RMSNorm,
                 lm_head: Tensor, inv_freq: Tensor, rope_scale: float):
        super().__init__()
        self.spec = spec
        self.embed = nn.Parameter(embed, requires_grad=False)
        self.layers = nn.ModuleList(layers)
        self.norm = norm
        self.lm_head = nn.Parameter(lm_head, requires_grad=False) if lm_head is not embed else None
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.rope_scale = rope_scale
        self.fused = _Fused(embed.device.type == "cuda", x16=embed.dtype == torch.bfloat16)
        for layer in self.layers:
            layer.fused = self.fused
        self.k_cache: list[Tensor] = []
        self.v_cache: list[Tensor] = []
        self.key_valid: Tensor | None = None
        self.max_len = 0
        self.rope_table: tuple[Tensor, Tensor] | None = None  # cos, sin [max_len, head_dim] (allocate_cache)

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    def allocate_cache(self, batch: int, max_len: int) -> None:
        s = self.spec
        shape = (batch, s.n_kv, max_len, s.head_dim)
        if self.k_cache and tuple(self.k_cache[0].shape) == shape:
            return
        self.k_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(s.n_layers)]
        self.v_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(s.n_layers)]
        self.key_valid = torch.zeros(batch, max_len, dtype=torch.bool, device=self.device)
        self.max_len = max_len
        self.rope_table = self._rope_table(max_len)

    def _rope_table(self, n: int) -> tuple[Tensor, Tensor]:
        """cos and sin of RoPE at positions 0..n-1: [n, head_dim] each, in the model's dtype."""
        freqs = torch.arange(n, device=self.device)[:, None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), -1)
        return (emb.cos() * self.rope_scale).to(self.dtype), (emb.sin() * self.rope_scale).to(self.dtype)

    def cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k_cache + self.v_cache)

    def forward(self, tokens: Tensor, positions: Tensor, slot: Tensor, kv_len: int,
                valid: Tensor | None = None, last_only: bool = True) -> Tensor:
        """Logits for ``tokens [B, T]`` written at cache slots ``slot..slot+T-1``.

        ``positions [B, T]`` are RoPE positions; ``valid [B, T]`` marks real tokens (default all);
        attention sees cache slots ``< kv_len`` that are valid and not in the future.
        """
        B, T = tokens.shape
        s = self.spec
        if T == 1 and valid is None and self.fused.prologue:  # one kernel, not a dozen small ones
            from ..kernels.decode_prologue import decode_prologue

            slots = slot.reshape(1)
            x, cos, sin, bias = decode_prologue(tokens, positions, slot, self.embed, self.rope_table,
                                                self.key_valid[:B], kv_len, s.sliding_window)
        else:
            slots, x, cos, sin, bias = self._step_inputs(tokens, positions, slot, kv_len, valid)
        x16 = B * T == 1 and self.fused.x16  # the layers' GEMV inputs as X16 (Layer.forward)
        h = self.fused.norm(x, self.layers[0].ln1.weight, self.layers[0].ln1.eps, x16=x16)
        for i, layer in enumerate(self.layers):
            nxt = self.layers[i + 1].ln1 if i + 1 < len(self.layers) else None
            x, h = layer(x, h, cos, sin, self.k_cache[i][:B], self.v_cache[i][:B], slots, bias, kv_len, nxt)
        if last_only:  # h: the last down projection's output
            x, h = x[:, -1:], h[:, -1:]
        _, x = self.fused.add_norm(x, h, self.norm.weight, self.norm.eps)
        head = self.embed if self.lm_head is None else self.lm_head
        if self.fused.head_gemv and x.numel() == x.shape[-1] and x.dtype == head.dtype:
            from ..kernels.dense_gemv import dense_gemv

            return dense_gemv(x, head)
        return F.linear(x, head)

    def _step_inputs(self, tokens: Tensor, positions: Tensor, slot: Tensor, kv_len: int,
                     valid: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """The cache slots, embeddings, RoPE cos/sin and additive mask of a forward, in torch
        (marks the slots in ``key_valid``)."""
        B, T = tokens.shape
        s = self.spec
        slots = slot + torch.arange(T, device=tokens.device)
        kv = self.key_valid[:B]
        if valid is None:
            kv.index_fill_(1, slots, True)
        else:
            kv.index_copy_(1, slots, valid.to(torch.bool))
        s_idx = torch.arange(kv_len, device=tokens.device)
        mask = kv[:, None, None, :kv_len] & (s_idx[None, None, None, :] <= slots[None, None, :, None])
        if s.sliding_window:
            mask = mask & (slots[None, None, :, None] - s_idx[None, None, None, :] < s.sliding_window)
        bias = torch.zeros(mask.shape, dtype=self.dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
        # positions <= slots < max_len: two gathers from the table, not eight small kernels a step
        cos, sin = (t[positions][:, None] for t in self.rope_table)
        return slots, F.embedding(tokens, self.embed), cos, sin, bias


def build_decoder(qm: QuantizedModel, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                  mode: str = "auto") -> Decoder:
    """A Decoder on ``device``: fp32 on the CPU, the scales' dtype (fp16/bf16) on a GPU by default.

    ``mode`` picks the linear implementation (``Int4Linear.from_packed``): auto, triton, dense, int4pack, dequant.
    """
    device = torch.device(device)
    spec = DecoderSpec.from_hf(qm.hf_config)
    if dtype is None:
        dtype = torch.float32 if device.type == "cpu" else qm.dtype

    def dense(key: str) -> Tensor:
        return qm.dense[key].to(device=device, dtype=dtype)

    def lin(names: list[str]) -> Int4Linear:
        parts = []
        for n in names:
            if n in qm.linears:
                parts.append(qm.linears[n])
            else:  # a module kept in float (modules_to_not_convert): dense fallback, same interface
                parts.append(None)
        if all(p is not None for p in parts):
            return Int4Linear.from_packed(parts, device=device, dtype=dtype, mode=mode)
        ws = [qm.dense[f"{n}.weight"].to(dtype) if p is None else p.dequantize(dtype) for n, p in zip(names, parts)]
        bs = [qm.dense.get(f"{n}.bias") if p is None else p.bias for n, p in zip(names, parts)]
        b = None
        if any(x is not None for x in bs):
            b = torch.cat([x.to(dtype) if x is not None else torch.zeros(w.shape[0], dtype=dtype)
                           for x, w in zip(bs, ws)]).to(device)
        return Int4Linear(None, None, tuple(w.shape[0] for w in ws), ws[0].shape[1],
                          dense=torch.cat(ws).to(device), bias=b)

    layers = []
    for i in range(spec.n_layers):
        p = f"model.layers.{i}"
        layers.append(Layer(
            lin([f"{p}.self_attn.q_proj", f"{p}.self_attn.k_proj", f"{p}.self_attn.v_proj"]),
            lin([f"{p}.self_attn.o_proj"]),
            lin([f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"]),
            lin([f"{p}.mlp.down_proj"]),
            RMSNorm(dense(f"{p}.input_layernorm.weight"), spec.eps),
            RMSNorm(dense(f"{p}.post_attention_layernorm.weight"), spec.eps),
            spec,
        ))
    embed = dense("model.embed_tokens.weight")
    if "lm_head" in qm.linears:
        head = qm.linears["lm_head"].dequantize(dtype).to(device)
    elif "lm_head.weight" in qm.dense and not spec.tie:
        head = dense("lm_head.weight")
    else:
        head = embed
    inv, scale = rope_inv_freq(qm.hf_config)
    return Decoder(spec, embed, layers, RMSNorm(dense("model.norm.weight"), spec.eps), head,
                   inv.to(device), scale).eval()
