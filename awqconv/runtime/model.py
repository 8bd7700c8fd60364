"""A Llama-family decoder (Llama, Mistral, Qwen2, SmolLM2) over INT4 linears with a static KV cache.

Built from a QuantizedModel only: q/k/v and gate/up are fused into one Int4Linear each; norms,
embeddings and lm_head come from ``qm.dense`` (HF state-dict keys). Caches are
``[B, n_kv, max_len, head_dim]``; a forward writes its T tokens at cache slots ``slot .. slot+T-1``
(``slot`` a 0-d long tensor so the decode step can be captured in a CUDA graph). ``key_valid [B, max_len]``
marks real (non-padding) slots; RoPE positions are per row (left-padded batches). A one-token step
runs each layer through the fused one-row chain (decode_chain.py); ``RuntimeOptions`` (options.py)
choose the GPU paths, resolved per decoder into ``StepPaths`` (layer_ops.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import archs
from ..errors import UsageError
from ..kernels.linear import Int4Linear
from ..kernels.pending_norm import PendingNorm
from ..kernels.x16 import X16
from ..model import QuantizedModel
from . import decode_chain
from .layer_ops import StepPaths, attention, rms_norm, rope_cache_write
from .options import RuntimeOptions

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
        """The decoder's shape from an HF config; the architecture's row in the registry (archs.py)
        says whether the built-in runtime runs it (else UnsupportedArchitecture) and how its
        activation and sliding window are configured."""
        rt = archs.runtime_row(cfg).runtime
        h, nh = cfg["hidden_size"], cfg["num_attention_heads"]
        return cls(hidden=h, n_layers=cfg["num_hidden_layers"], n_heads=nh,
                   n_kv=cfg.get("num_key_value_heads") or nh, head_dim=cfg.get("head_dim") or h // nh,
                   vocab=cfg["vocab_size"], eps=cfg.get("rms_norm_eps", 1e-6),
                   act=cfg.get(rt.act_key, "silu"), tie=bool(cfg.get("tie_word_embeddings", False)),
                   sliding_window=rt.window(cfg))


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


class Layer(nn.Module):
    def __init__(self, qkv: Int4Linear, o: Int4Linear, gate_up: Int4Linear, down: Int4Linear,
                 ln1: RMSNorm, ln2: RMSNorm, spec: DecoderSpec):
        super().__init__()
        self.qkv, self.o, self.gate_up, self.down, self.ln1, self.ln2 = qkv, o, gate_up, down, ln1, ln2
        self.spec = spec
        self.act = _ACTS[spec.act]

    def forward(self, x: Tensor, h: Tensor | X16 | PendingNorm, cos: Tensor, sin: Tensor, kc: Tensor, vc: Tensor,
                slots: Tensor, bias: Tensor, kv_len: int, paths: StepPaths,
                nxt: RMSNorm | None = None) -> tuple[Tensor, Tensor | X16 | PendingNorm]:
        """``x`` the residual stream, ``h = ln1(x)``; returns (new residual, ``nxt`` of it: the next
        layer's ln1 input), or without ``nxt`` (new residual's last term, the down projection's output).
        One token (B = T = 1) takes the fused one-row chain (decode_chain.py)."""
        B, T, _ = x.shape
        if B * T == 1:
            return decode_chain.layer_step(self, x, h, cos, sin, kc, vc, slots, bias, kv_len, paths, nxt)
        s = self.spec
        q = self.rope_cache(paths.linear(self.qkv, h), cos, sin, kc, vc, slots, paths)
        a = attention(q, kc[:, :, :kv_len], vc[:, :, :kv_len], bias, s.n_kv != s.n_heads, False, slots, paths.pdl)
        a = a.transpose(1, 2).reshape(B, T, s.n_heads * s.head_dim)
        x, h = paths.add_norm(x, paths.linear(self.o, a), self.ln2.weight, self.ln2.eps)
        y = paths.linear(self.down, self.mlp_act(paths.linear(self.gate_up, h), paths))
        return (x, y) if nxt is None else paths.add_norm(x, y, nxt.weight, nxt.eps)

    def rope_cache(self, qkv: Tensor, cos: Tensor, sin: Tensor, kc: Tensor, vc: Tensor, slots: Tensor,
                   paths: StepPaths) -> Tensor:
        """The fused QKV output ``[B, T, N]``: RoPE on q and k, k and v into the cache at ``slots``;
        returns q ``[B, H, T, D]``."""
        s = self.spec
        q, k, v = self.qkv.split(qkv)
        return rope_cache_write(q, k, v, cos, sin, kc, vc, slots, s.n_heads, s.n_kv, s.head_dim, paths.pdl)

    def mlp_act(self, gate_up: Tensor, paths: StepPaths) -> Tensor:
        """act(gate) * up of the fused [gate; up] output (SiLU: one kernel on a GPU)."""
        gate, up = self.gate_up.split(gate_up)
        return paths.silu_mul(gate, up) if self.spec.act == "silu" else self.act(gate) * up


class Decoder(nn.Module):
    """The whole model; owns its KV cache once ``allocate_cache`` is called."""

    def __init__(self, spec: DecoderSpec, embed: Tensor, layers: list[Layer], norm: RMSNorm,
                 lm_head: Tensor, inv_freq: Tensor, rope_scale: float, options: RuntimeOptions | None = None):
        super().__init__()
        self.spec = spec
        self.embed = nn.Parameter(embed, requires_grad=False)
        self.layers = nn.ModuleList(layers)
        self.norm = norm
        self.lm_head = nn.Parameter(lm_head, requires_grad=False) if lm_head is not embed else None
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.rope_scale = rope_scale
        self.set_options(RuntimeOptions() if options is None else options)
        self.k_cache: list[Tensor] = []
        self.v_cache: list[Tensor] = []
        self.key_valid: Tensor | None = None
        self.max_len = 0
        self.rope_table: tuple[Tensor, Tensor] | None = None  # cos, sin [max_len, head_dim] (allocate_cache)

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
        s, p = self.spec, self.paths
        if T == 1 and valid is None and p.prologue:  # one kernel, not a dozen small ones
            from ..kernels.decode_prologue import decode_prologue

            slots = slot.reshape(1)
            x, cos, sin, bias = decode_prologue(tokens, positions, slot, self.embed, self.rope_table,
                                                self.key_valid[:B], kv_len, s.sliding_window)
        else:
            slots, x, cos, sin, bias = self._step_inputs(tokens, positions, slot, kv_len, valid)
        x16 = B * T == 1 and p.x16  # the layers' GEMV inputs as X16 (decode_chain.py)
        h = p.norm(x, self.layers[0].ln1.weight, self.layers[0].ln1.eps, x16=x16)
        for i, layer in enumerate(self.layers):
            nxt = self.layers[i + 1].ln1 if i + 1 < len(self.layers) else None
            x, h = layer(x, h, cos, sin, self.k_cache[i][:B], self.v_cache[i][:B], slots, bias, kv_len, p, nxt)
        if last_only:  # h: the last down projection's output
            x, h = x[:, -1:], h[:, -1:]
        _, x = p.add_norm(x, h, self.norm.weight, self.norm.eps)
        head = self.embed if self.lm_head is None else self.lm_head
        if p.head_gemv and x.numel() == x.shape[-1] and x.dtype == head.dtype:
            from ..kernels.dense_gemv import dense_gemv

            return dense_gemv(x, head, pdl=p.pdl)
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
                  mode: str = "auto", options: RuntimeOptions | None = None) -> Decoder:
    """A Decoder on ``device``: fp32 on the CPU, the scales' dtype (fp16/bf16) on a GPU by default.

    ``mode`` picks the linear implementation (``Int4Linear.from_packed``): auto, triton, dense, int4pack,
    dequant. ``options``: the GPU decode paths (``RuntimeOptions``; default ``RuntimeOptions()``).
    """
    options = RuntimeOptions() if options is None else options
    if not isinstance(options, RuntimeOptions):
        raise UsageError(f"options must be a RuntimeOptions, got {type(options).__name__}")
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
                   inv.to(device), scale, options).eval()
