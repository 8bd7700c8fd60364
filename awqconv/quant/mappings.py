"""Which norm or linear absorbs which AWQ scale: a declarative table keyed by architecture.

A mapping says: the output channels of ``prev`` feed the input channels of every linear in
``layers`` (and of ``extra`` consumers such as an MoE router, which are compensated but not
quantized), so ``prev /= s`` and ``layers *= s`` leaves the float model unchanged. The search
loss is measured on ``inspect``: a parent module ("self_attn", "mlp") run on the captured
input, or ``None`` for the linears' own output.

Paths are relative to one decoder layer. ``prev`` may name the tail of a fused linear
(``self_attn.qkv_proj[v]``): only the rows that feed ``layers`` are divided. Fused MoE experts
(transformers 5 stores them as 3-D ``gate_up_proj`` / ``down_proj`` parameters) are expanded to
one slot per expert, named like the HF checkpoint keys (``mlp.experts.3.gate_proj``).
Sources: awq_internals.md §1.4, §1.6, §1.10, §7.2.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..errors import UnsupportedArchitecture


@dataclass(frozen=True)
class MappingSpec:
    prev: str  # "input_layernorm", "self_attn.v_proj", "self_attn.qkv_proj[v]", "mlp.gate_up_proj[up]"
    layers: tuple[str, ...]  # linears taking * s; "mlp.experts.*.gate_proj" expands over experts
    inspect: str | None  # parent module for the loss; None = the linears themselves
    extra: tuple[str, ...] = ()  # consumers compensated with * s but never quantized (routers)
    vo: bool = False  # v -> o smoothing: one scale per kv channel, repeated over query heads


@dataclass(frozen=True)
class ArchSpec:
    layers_path: str = "model.layers"
    offset_norm: bool = False  # Gemma-style RMSNorm computing x * (1 + w)
    mappings: tuple[MappingSpec, ...] = ()
    no_clip: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.qkv_proj")
    not_convert: tuple[str, ...] = ()  # linears inside blocks kept dense (recorded for writers)


_ATTN = (
    MappingSpec("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
    MappingSpec("self_attn.v_proj", ("self_attn.o_proj",), None, vo=True),
)
_MLP = (
    MappingSpec("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
    MappingSpec("mlp.up_proj", ("mlp.down_proj",), None),
)
_MOE = (
    MappingSpec(
        "post_attention_layernorm",
        ("mlp.experts.*.gate_proj", "mlp.experts.*.up_proj"),
        "mlp",
        extra=("mlp.gate",),  # the router reads the same normed input (llm-compressor PR #2451)
    ),
    MappingSpec("mlp.experts.*.up_proj", ("mlp.experts.*.down_proj",), None),
)
_LLAMA = ArchSpec(mappings=_ATTN + _MLP)

ARCHITECTURES: dict[str, ArchSpec] = {
    "LlamaForCausalLM": _LLAMA,
    "MistralForCausalLM": _LLAMA,
    "Qwen2ForCausalLM": _LLAMA,  # qkv bias: v_proj's bias is divided with its rows
    "Qwen3ForCausalLM": _LLAMA,  # q_norm/k_norm act per head after q/k: input scaling is unaffected
    "GemmaForCausalLM": ArchSpec(offset_norm=True, mappings=_ATTN + _MLP),
    "Gemma2ForCausalLM": ArchSpec(
        offset_norm=True,
        mappings=_ATTN
        + (
            MappingSpec("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
            MappingSpec("mlp.up_proj", ("mlp.down_proj",), None),
        ),
    ),
    "Phi3ForCausalLM": ArchSpec(
        mappings=(
            MappingSpec("input_layernorm", ("self_attn.qkv_proj",), "self_attn"),
            MappingSpec("self_attn.qkv_proj[v]", ("self_attn.o_proj",), None, vo=True),
            MappingSpec("post_attention_layernorm", ("mlp.gate_up_proj",), "mlp"),
            MappingSpec("mlp.gate_up_proj[up]", ("mlp.down_proj",), None),
        )
    ),
    "MixtralForCausalLM": ArchSpec(mappings=_ATTN + _MOE, not_convert=("mlp.gate",)),
    # Qwen3-MoE layers listed in mlp_only_layers (or off the sparse step) have a dense MLP:
    # mappings whose modules are absent in a layer are skipped, so both kinds resolve.
    "Qwen3MoeForCausalLM": ArchSpec(mappings=_ATTN + _MOE + _MLP, not_convert=("mlp.gate",)),
}


def supported_architectures() -> list[str]:
    return sorted(ARCHITECTURES)


def arch_spec(hf_config: dict) -> ArchSpec:
    """The mapping table for a config, or UnsupportedArchitecture naming the supported ones."""
    archs = hf_config.get("architectures") or []
    if not archs:  # an empty or missing list: transformers' own class for the model_type
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        inferred = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(str(hf_config.get("model_type")))
        if inferred in ARCHITECTURES:
            return ARCHITECTURES[inferred]
        raise UnsupportedArchitecture(
            f"config.json has no architectures and model_type {hf_config.get('model_type')!r} maps to no supported "
            f"class; set architectures to one of {', '.join(supported_architectures())}"
        )
    for a in archs:
        if a in ARCHITECTURES:
            return ARCHITECTURES[a]
    raise UnsupportedArchitecture(
        f"architecture {archs[0]} is not supported; awqconv has AWQ mappings for "
        f"{', '.join(supported_architectures())}"
    )


# ---------------------------------------------------------------------------------------------
# Resolution: names -> the tensors of one live decoder layer


@dataclass
class LinearSlot:
    """A ``[out, in]`` weight: an nn.Linear's, or one expert's slice of a fused 3-D parameter."""

    name: str  # relative to the decoder layer, e.g. "mlp.experts.3.gate_proj"
    param: nn.Parameter
    index: tuple = ()  # into param; () for a whole nn.Linear weight
    bias: nn.Parameter | None = None

    @property
    def weight(self) -> Tensor:
        return self.param.data[self.index] if self.index else self.param.data

    def set_weight(self, w: Tensor) -> None:
        self.weight.copy_(w)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)  # type: ignore[return-value]


@dataclass
class PrevOp:
    """What absorbs ``1/s``: a norm (whole weight) or a row range of a linear."""

    name: str
    weight: nn.Parameter
    bias: nn.Parameter | None
    rows: slice | None = None  # None for a norm; the rows of a (fused) linear that feed `layers`
    offset: bool = False  # norm computes x * (1 + w)

    def divide(self, s: Tensor) -> None:
        s = s.to(self.weight.dtype)
        if self.rows is None:
            w = self.weight.data
            if self.offset:
                w.copy_((1.0 + w) / s - 1.0)
            else:
                w.div_(s)
            if self.bias is not None:
                self.bias.data.div_(s)
        else:
            self.weight.data[self.rows].div_(s[:, None])
            if self.bias is not None:
                self.bias.data[self.rows].div_(s)


@dataclass
class ResolvedMapping:
    spec: MappingSpec
    prev: PrevOp
    layers: list[LinearSlot]
    extra: list[LinearSlot] = field(default_factory=list)
    inspect: nn.Module | None = None
    kv_index: Tensor | None = None  # vo mappings: o_proj input column -> kv channel


def _get(root: nn.Module, path: str) -> nn.Module | None:
    mod: nn.Module | None = root
    for part in path.split("."):
        mod = getattr(mod, part, None) if mod is not None else None
    return mod


def _expert_slots(layer: nn.Module, path: str) -> list[LinearSlot] | None:
    """``mlp.experts.*.gate_proj`` -> one slot per expert (fused 3-D params or a ModuleList)."""
    parent, _, leaf = path.partition(".*.")
    experts = _get(layer, parent)
    if experts is None:
        return None
    if isinstance(experts, nn.ModuleList):  # older layout: a list of expert MLPs
        out = []
        for e, mod in enumerate(experts):
            lin = getattr(mod, leaf, None)
            if not isinstance(lin, nn.Linear):
                return None
            out.append(LinearSlot(f"{parent}.{e}.{leaf}", lin.weight, (), lin.bias))
        return out
    gate_up = getattr(experts, "gate_up_proj", None)
    down = getattr(experts, "down_proj", None)
    if not isinstance(gate_up, nn.Parameter) or not isinstance(down, nn.Parameter):
        return None
    n_exp, two_i, _ = gate_up.shape
    inter = two_i // 2
    # fused order is [gate; up] along the output rows (MixtralExperts.forward chunks gate, up)
    index = {
        "gate_proj": lambda e: (e, slice(0, inter)),
        "up_proj": lambda e: (e, slice(inter, two_i)),
        "down_proj": lambda e: (e,),
    }.get(leaf)
    if index is None:
        return None
    param = down if leaf == "down_proj" else gate_up
    return [LinearSlot(f"{parent}.{e}.{leaf}", param, index(e)) for e in range(n_exp)]


def linear_slots(layer: nn.Module, path: str) -> list[LinearSlot] | None:
    if ".*." in path:
        return _expert_slots(layer, path)
    mod = _get(layer, path)
    if isinstance(mod, nn.Linear):
        return [LinearSlot(path, mod.weight, (), mod.bias)]
    if mod is not None and isinstance(getattr(mod, "weight", None), nn.Parameter) and mod.weight.dim() == 2:
        return [LinearSlot(path, mod.weight, (), getattr(mod, "bias", None))]  # e.g. a router
    return None


def _kv_geometry(hf_config: dict) -> tuple[int, int, int]:
    n_h = hf_config["num_attention_heads"]
    n_kv = hf_config.get("num_key_value_heads") or n_h
    hd = hf_config.get("head_dim") or hf_config["hidden_size"] // n_h
    return n_h, n_kv, hd


def _fused_rows(layer: nn.Module, path: str, part: str, hf_config: dict) -> tuple[nn.Linear, slice] | None:
    mod = _get(layer, path)
    if not isinstance(mod, nn.Linear):
        return None
    out = mod.out_features
    if part == "v":  # qkv_proj = [q; k; v]
        n_h, n_kv, hd = _kv_geometry(hf_config)
        if out != (n_h + 2 * n_kv) * hd:
            return None
        return mod, slice((n_h + n_kv) * hd, out)
    if part == "up":  # gate_up_proj = [gate; up]
        return mod, slice(out // 2, out)
    return None


def _resolve_prev(layer: nn.Module, spec: MappingSpec, arch: ArchSpec, hf_config: dict) -> PrevOp | None:
    path = spec.prev
    if "[" in path:
        base, part = path[:-1].split("[")
        found = _fused_rows(layer, base, part, hf_config)
        if found is None:
            return None
        mod, rows = found
        return PrevOp(path, mod.weight, mod.bias, rows)
    if ".*." in path:
        return None  # per-expert prev ops are expanded by resolve_layer
    mod = _get(layer, path)
    if isinstance(mod, nn.Linear):
        return PrevOp(path, mod.weight, mod.bias, slice(0, mod.out_features))
    if mod is not None and isinstance(getattr(mod, "weight", None), nn.Parameter) and mod.weight.dim() == 1:
        return PrevOp(path, mod.weight, getattr(mod, "bias", None), None, offset=arch.offset_norm)
    return None


def _vo_index(hf_config: dict, n_v: int, n_o: int) -> Tensor | None:
    """Column j = h*hd + d of o_proj's input reads kv channel (h // rep)*hd + d."""
    n_h, n_kv, hd = _kv_geometry(hf_config)
    if n_v != n_kv * hd or n_o != n_h * hd or n_h % n_kv:
        return None
    rep = n_h // n_kv
    return ((torch.arange(n_h) // rep)[:, None] * hd + torch.arange(hd)[None, :]).reshape(-1)


def resolve_layer(layer: nn.Module, arch: ArchSpec, hf_config: dict) -> list[ResolvedMapping]:
    """Bind every mapping of ``arch`` that this layer has to its live tensors."""
    out: list[ResolvedMapping] = []
    for spec in arch.mappings:
        if ".*." in spec.prev:  # per-expert: up_e -> down_e
            prev_slots = _expert_slots(layer, spec.prev)
            next_slots = linear_slots(layer, spec.layers[0])
            if not prev_slots or not next_slots:
                continue
            for p, n in zip(prev_slots, next_slots):
                rows = p.index[1] if len(p.index) > 1 else slice(0, p.param.shape[-2] if p.index else p.param.shape[0])
                prev = PrevOp(p.name, p.param, None, rows=(p.index[0], rows) if p.index else rows)
                out.append(ResolvedMapping(spec, prev, [n]))
            continue
        prev = _resolve_prev(layer, spec, arch, hf_config)
        slots: list[LinearSlot] = []
        for path in spec.layers:
            found = linear_slots(layer, path)
            if found is None:
                slots = []
                break
            slots.extend(found)
        if prev is None or not slots:
            continue
        extra: list[LinearSlot] = []
        for path in spec.extra:
            extra.extend(linear_slots(layer, path) or [])
        inspect = _get(layer, spec.inspect) if spec.inspect else None
        m = ResolvedMapping(spec, prev, slots, extra, inspect)
        n_prev = prev.weight.shape[0] if prev.rows is None else _rows_len(prev)
        if spec.vo:
            m.kv_index = _vo_index(hf_config, n_prev, slots[0].shape[1])
            if m.kv_index is None:
                continue  # shapes do not line up (e.g. an unusual attention layout): skip smoothing
        elif any(s.shape[1] != n_prev for s in slots):
            continue
        out.append(m)
    return out


def _rows_len(prev: PrevOp) -> int:
    rows = prev.rows[-1] if isinstance(prev.rows, tuple) else prev.rows
    full = prev.weight.shape[-2]
    return len(range(*rows.indices(full)))


def quantizable_slots(layer: nn.Module, arch: ArchSpec, skip: tuple[str, ...] = ()) -> list[LinearSlot]:
    """Every weight of the layer that gets quantized: nn.Linear modules and fused expert slices."""
    slots: list[LinearSlot] = []
    not_convert = set(arch.not_convert)
    for name, mod in layer.named_modules():
        if name in not_convert or any(s in name for s in skip):
            continue
        if isinstance(mod, nn.Linear):
            slots.append(LinearSlot(name, mod.weight, (), mod.bias))
        elif isinstance(getattr(mod, "gate_up_proj", None), nn.Parameter):
            for leaf in ("gate_proj", "up_proj", "down_proj"):
                slots.extend(_expert_slots(layer, f"{name}.*.{leaf}") or [])
    return slots
