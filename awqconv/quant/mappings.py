"""Binding the AWQ columns of the architecture registry (``awqconv/archs.py``) to live modules.

A mapping (:class:`~awqconv.archs.MappingSpec`) says: the output channels of ``prev`` feed the
input channels of every linear in ``layers`` (and of ``extra`` consumers such as an MoE router,
which are compensated but not quantized), so ``prev /= s`` and ``layers *= s`` leaves the float
model unchanged. The search loss is measured on ``inspect``: a parent module ("self_attn", "mlp")
run on the captured input, or ``None`` for the linears' own output.

Paths are relative to one decoder layer. ``prev`` may name the tail of a fused linear
(``self_attn.qkv_proj[v]``): only the rows that feed ``layers`` are divided. Fused MoE experts
(transformers 5 stores them as 3-D ``gate_up_proj`` / ``down_proj`` parameters) are expanded to
one slot per expert, named like the HF checkpoint keys (``mlp.experts.3.gate_proj``). A row whose
modules a layer lacks is an error unless the row declares which layers legitimately lack them
(``MappingSpec.absent_in``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .. import archs
from ..archs import AwqSpec, MappingSpec
from ..errors import UnsupportedArchitecture

ArchSpec = AwqSpec  # the name the quantizer's callers use for an architecture's AWQ columns

__all__ = [
    "ARCHITECTURES", "ArchSpec", "AwqSpec", "LinearSlot", "MappingSpec", "PrevOp", "ResolvedMapping",
    "arch_spec", "linear_slots", "quantizable_slots", "resolve_layer", "supported_architectures",
]


class _AwqColumns(Mapping[str, AwqSpec]):
    """HF class name -> its AWQ columns, read live from the registry (rows added later show up)."""

    def __getitem__(self, name: str) -> AwqSpec:
        return archs.REGISTRY[name].awq

    def __iter__(self) -> Iterator[str]:
        return iter(archs.REGISTRY)

    def __len__(self) -> int:
        return len(archs.REGISTRY)


ARCHITECTURES: Mapping[str, AwqSpec] = _AwqColumns()


def supported_architectures() -> list[str]:
    return archs.names()


def arch_spec(hf_config: dict) -> AwqSpec:
    """The mapping table for a config, or UnsupportedArchitecture naming the supported ones."""
    names = hf_config.get("architectures") or []
    if not names:  # an empty or missing list: transformers' own class for the model_type
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        inferred = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(str(hf_config.get("model_type")))
        row = archs.lookup(inferred) if inferred else None
        if row is not None:
            return row.awq
        raise UnsupportedArchitecture(
            f"config.json has no architectures and model_type {hf_config.get('model_type')!r} maps to no supported "
            f"class; set architectures to one of {', '.join(supported_architectures())}"
        )
    row = archs.first_known(names)
    if row is not None:
        return row.awq
    raise UnsupportedArchitecture(
        f"architecture {names[0]} is not supported; awqconv has AWQ mappings for "
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


def _resolve_prev(layer: nn.Module, spec: MappingSpec, arch: AwqSpec, hf_config: dict) -> PrevOp | None:
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


def _module_path(path: str) -> str:
    """The module a mapping path names: ``a.qkv_proj[v]`` -> ``a.qkv_proj``, ``mlp.experts.*.x`` -> ``mlp.experts``."""
    return path.split("[", 1)[0].partition(".*.")[0]


def _row_error(arch: AwqSpec, spec: MappingSpec, problem: str) -> UnsupportedArchitecture:
    name = arch.arch or "this architecture"
    return UnsupportedArchitecture(
        f"{name}: AWQ mapping row prev={spec.prev!r} layers={list(spec.layers)} does not resolve in a decoder "
        f"layer: {problem}; the model's modules do not match awqconv's {name} table (custom modeling code?)"
    )


def _bind(layer: nn.Module, spec: MappingSpec, arch: AwqSpec, hf_config: dict) -> list[ResolvedMapping]:
    """The live tensors of one row whose modules all exist; raises if one is not what the row says."""
    if ".*." in spec.prev:  # per-expert: up_e -> down_e
        prev_slots = _expert_slots(layer, spec.prev)
        next_slots = linear_slots(layer, spec.layers[0])
        if not prev_slots or not next_slots:
            raise _row_error(arch, spec, "no per-expert linears (unknown expert layout)")
        out = []
        for p, n in zip(prev_slots, next_slots):
            rows = p.index[1] if len(p.index) > 1 else slice(0, p.param.shape[-2] if p.index else p.param.shape[0])
            prev = PrevOp(p.name, p.param, None, rows=(p.index[0], rows) if p.index else rows)
            out.append(ResolvedMapping(spec, prev, [n]))
        return out
    prev = _resolve_prev(layer, spec, arch, hf_config)
    if prev is None:
        raise _row_error(arch, spec, f"{spec.prev} is not a norm or linear of the expected shape")
    slots: list[LinearSlot] = []
    extra: list[LinearSlot] = []
    for paths, dest in ((spec.layers, slots), (spec.extra, extra)):
        for path in paths:
            found = linear_slots(layer, path)
            if found is None:
                raise _row_error(arch, spec, f"{path} is not a linear")
            dest.extend(found)
    inspect = _get(layer, spec.inspect) if spec.inspect else None
    m = ResolvedMapping(spec, prev, slots, extra, inspect)
    n_prev = prev.weight.shape[0] if prev.rows is None else _rows_len(prev)
    if spec.vo:
        m.kv_index = _vo_index(hf_config, n_prev, slots[0].shape[1])
        if m.kv_index is None:
            return []  # shapes do not line up (e.g. an unusual attention layout): skip smoothing
    elif any(s.shape[1] != n_prev for s in slots):
        return []
    return [m]


def resolve_layer(layer: nn.Module, arch: AwqSpec, hf_config: dict) -> list[ResolvedMapping]:
    """Bind every mapping row of ``arch`` to this layer's live tensors.

    A row whose modules the layer lacks raises UnsupportedArchitecture naming the row and the
    architecture, unless the row declares which layers lack them (``absent_in``); such a layer must
    still bind one of those optional rows (a Qwen3-MoE layer has either the experts or a dense MLP).
    """
    out: list[ResolvedMapping] = []
    optional = bound_optional = 0
    for spec in arch.mappings:
        missing = [p for p in (spec.prev, *spec.layers, *spec.extra) if _get(layer, _module_path(p)) is None]
        optional += spec.absent_in is not None
        if missing:
            if spec.absent_in is not None:
                continue  # e.g. a Qwen3-MoE dense-MLP row in a sparse layer
            raise _row_error(arch, spec, f"no module at {', '.join(dict.fromkeys(missing))}")
        out.extend(_bind(layer, spec, arch, hf_config))
        bound_optional += spec.absent_in is not None
    if optional and not bound_optional:
        rows = "; ".join(s.describe() for s in arch.mappings if s.absent_in is not None)
        raise UnsupportedArchitecture(
            f"{arch.arch or 'this architecture'}: a decoder layer has the modules of none of the rows "
            f"{rows}; the model's modules do not match awqconv's table"
        )
    return out


def _rows_len(prev: PrevOp) -> int:
    rows = prev.rows[-1] if isinstance(prev.rows, tuple) else prev.rows
    full = prev.weight.shape[-2]
    return len(range(*rows.indices(full)))


def quantizable_slots(layer: nn.Module, arch: AwqSpec, skip: tuple[str, ...] = ()) -> list[LinearSlot]:
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
