"""``build_decoder``: a runtime Decoder (model.py) from a QuantizedModel, by the weights' HF names.

Per layer: q/k/v fused into one Int4Linear (or Phi-3's ``qkv_proj`` as stored, split by head
counts), gate/up likewise (``gate_up_proj`` split in halves), the experts of a MoE layer stacked
(``mlp.experts.{e}.gate_proj`` as the quantizer names them, or a checkpoint's Mixtral
``block_sparse_moe.experts.{e}.w1/w3/w2``), the dense router, the norms the spec places (``(1 + w)``
norms stored as 1 + w, computed in fp32 before the cast, as transformers computes them), q/k norms.
A linear kept in float (modules_to_not_convert) runs dense behind the same interface.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import CorruptFileError, UsageError
from ..kernels.experts import ExpertLinear
from ..kernels.linear import Int4Linear
from ..model import QuantizedModel
from .model import Decoder, Layer, Mlp, RMSNorm
from .moe import MoE
from .options import RuntimeOptions
from .spec import DecoderSpec, rope_inv_freq

# (block, gate, up, down) names of a MoE layer's experts: transformers 5 modules, Mixtral checkpoints
_EXPERT_NAMES = (("mlp", "gate_proj", "up_proj", "down_proj"), ("block_sparse_moe", "w1", "w3", "w2"))


class _Weights:
    """Reads one QuantizedModel's tensors onto ``device`` in ``dtype`` as runtime modules."""

    def __init__(self, qm: QuantizedModel, spec: DecoderSpec, device: torch.device, dtype: torch.dtype, mode: str):
        self.qm, self.spec, self.device, self.dtype, self.mode = qm, spec, device, dtype, mode

    def has(self, name: str) -> bool:
        return name in self.qm.linears or f"{name}.weight" in self.qm.dense

    def dense(self, key: str) -> Tensor:
        if key not in self.qm.dense:
            raise CorruptFileError(f"{self.qm.architecture}: the model has no tensor {key}; re-export it")
        return self.qm.dense[key].to(device=self.device, dtype=self.dtype)

    def weight(self, name: str) -> Tensor:
        """A linear's float weight ``[out, in]``, dequantised where it is quantized (routers)."""
        if name in self.qm.linears:
            return self.qm.linears[name].dequantize(self.dtype).to(self.device)
        return self.dense(f"{name}.weight")

    def norm(self, name: str, offset: bool | None = None) -> RMSNorm:
        key = f"{name}.weight"
        if key not in self.qm.dense:
            raise CorruptFileError(f"{self.qm.architecture}: the model has no tensor {key}; re-export it")
        w = self.qm.dense[key].float()
        if self.spec.offset_norm if offset is None else offset:
            w = w + 1.0
        return RMSNorm(w.to(device=self.device, dtype=self.dtype), self.spec.eps)

    def lin(self, names: list[str], splits: tuple[int, ...] | None = None) -> Int4Linear:
        """The linears ``names`` fused along their outputs; ``splits`` re-cut one stored fused linear."""
        qm, dtype, device = self.qm, self.dtype, self.device
        for n in names:
            if not self.has(n):
                raise CorruptFileError(f"{qm.architecture}: the model has no linear {n}; re-export it")
        parts = [qm.linears.get(n) for n in names]
        if all(p is not None for p in parts):
            out = Int4Linear.from_packed(parts, device=device, dtype=dtype, mode=self.mode)
        else:  # a module kept in float (modules_to_not_convert): dense fallback, same interface
            ws = [qm.dense[f"{n}.weight"].to(dtype) if p is None else p.dequantize(dtype) for n, p in zip(names, parts)]
            bs = [qm.dense.get(f"{n}.bias") if p is None else p.bias for n, p in zip(names, parts)]
            b = None
            if any(x is not None for x in bs):
                b = torch.cat([x.to(dtype) if x is not None else torch.zeros(w.shape[0], dtype=dtype)
                               for x, w in zip(bs, ws)]).to(device)
            out = Int4Linear(None, None, tuple(w.shape[0] for w in ws), ws[0].shape[1],
                             dense=torch.cat(ws).to(device), bias=b)
        if splits is not None:
            if sum(splits) != out.out_features:
                raise CorruptFileError(f"{qm.architecture}: {names[0]} has {out.out_features} outputs, expected "
                                       f"{' + '.join(map(str, splits))}")
            out.splits = splits
        return out

    def experts(self, p: str, n_experts: int) -> tuple[Tensor, ExpertLinear, ExpertLinear]:
        """(router weight, stacked [gate; up], stacked down) of MoE layer ``p``."""
        for block, gate, up, down in _EXPERT_NAMES:
            if f"{p}.{block}.experts.0.{gate}" in self.qm.linears:
                break
        else:
            raise CorruptFileError(f"{self.qm.architecture}: layer {p} should hold {n_experts} quantized experts "
                                   f"(mlp.experts.0.gate_proj); re-export it")
        e = f"{p}.{block}.experts"
        try:
            gu = [[self.qm.linears[f"{e}.{i}.{gate}"], self.qm.linears[f"{e}.{i}.{up}"]] for i in range(n_experts)]
            dn = [[self.qm.linears[f"{e}.{i}.{down}"]] for i in range(n_experts)]
        except KeyError as err:
            raise CorruptFileError(f"{self.qm.architecture}: expert linear {err.args[0]} is missing; "
                                   "re-export it") from None
        mk = lambda parts: ExpertLinear.from_packed(parts, device=self.device, dtype=self.dtype, mode=self.mode)
        return self.weight(f"{p}.{block}.gate"), mk(gu), mk(dn)


def _layer(w: _Weights, spec: DecoderSpec, i: int) -> Layer:
    p = f"model.layers.{i}"
    a = f"{p}.self_attn"
    if w.has(f"{a}.qkv_proj"):  # Phi-3: fused q|k|v rows
        qkv = w.lin([f"{a}.qkv_proj"], (spec.n_heads * spec.head_dim, spec.n_kv * spec.head_dim,
                                        spec.n_kv * spec.head_dim))
    else:
        qkv = w.lin([f"{a}.q_proj", f"{a}.k_proj", f"{a}.v_proj"])
    if spec.moe is not None and spec.moe.sparse[i]:
        router, gate_up, down = w.experts(p, spec.moe.n_experts)
        mlp = MoE(router, gate_up, down, spec.moe.top_k, spec.moe.renormalize, spec.act)
    elif w.has(f"{p}.mlp.gate_up_proj"):  # Phi-3: gate rows then up rows
        gu = w.lin([f"{p}.mlp.gate_up_proj"])
        gu.splits = (gu.out_features // 2, gu.out_features - gu.out_features // 2)
        mlp = Mlp(gu, w.lin([f"{p}.mlp.down_proj"]), spec.act)
    else:
        mlp = Mlp(w.lin([f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"]), w.lin([f"{p}.mlp.down_proj"]), spec.act)
    qk = (w.norm(f"{a}.q_norm"), w.norm(f"{a}.k_norm")) if spec.qk_norm else (None, None)
    if spec.sandwich:
        ln2, post = w.norm(f"{p}.pre_feedforward_layernorm"), w.norm(f"{p}.post_attention_layernorm")
        post_ff = w.norm(f"{p}.post_feedforward_layernorm")
    else:
        ln2, post, post_ff = w.norm(f"{p}.post_attention_layernorm"), None, None
    return Layer(qkv, w.lin([f"{a}.o_proj"]), mlp, w.norm(f"{p}.input_layernorm"), ln2, spec, i, *qk, post, post_ff)


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
    w = _Weights(qm, spec, device, dtype, mode)
    layers = [_layer(w, spec, i) for i in range(spec.n_layers)]
    embed = w.dense("model.embed_tokens.weight")
    if "lm_head" in qm.linears:
        head = qm.linears["lm_head"].dequantize(dtype).to(device)
    elif "lm_head.weight" in qm.dense and not spec.tie:
        head = w.dense("lm_head.weight")
    else:
        head = embed
    rope = {}
    for kind in dict.fromkeys(spec.rope_kinds):
        inv, scale = rope_inv_freq(qm.hf_config, kind)
        rope[kind] = (inv.to(device), scale)
    return Decoder(spec, embed, layers, w.norm("model.norm"), head, rope, options=options).eval()
