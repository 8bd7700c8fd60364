"""A trained PEFT LoRA adapter's way back to an INT4 export: kept separate, or merged onto the same grid.

``separate``: the model is unchanged; the adapter is checked against it and copied next to each
export (``<out>/adapter/``) for runtimes that apply LoRA at load (ExLlamaV2, vLLM, transformers+peft).
``merge`` (lossy): per quantized linear ``W' = (q - z) * s + scaling * B @ A`` is re-rounded on the
*same* grid, ``q' = clamp(round(W' / s) + z, 0, 2^b - 1)`` (scales and zeros kept); float tensors
(lm_head, embeddings, modules_to_save) take the delta exactly in fp32, then their own dtype.
Adapter keys are PEFT's: ``base_model.model.<module>.lora_A.weight`` [r, in], ``lora_B.weight`` [out, r].
"""

from __future__ import annotations

import logging
import math
import re
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .._io import load_safetensors, read_json
from ..errors import FormatConstraintError, InputError, ShapeError
from ..model import QuantizedModel
from ..packed import PackedLinear

MODES = ("separate", "merge")
PREFIX = "base_model.model."
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "README.md")
ADAPTER_SUBDIR = "adapter"

log = logging.getLogger(__name__)


@dataclass
class LayerMerge:
    """What merging did to one quantized linear (all on the unchanged grid)."""

    q_changed: float  # fraction of integers that moved
    clamped: int  # weights whose target fell outside [0, 2^b - 1] steps
    rel_error: float  # ||dequant(q') - W'|| / ||delta W||: 0 = lossless, ~0.3+ = delta mostly lost


@dataclass
class AdapterReport:
    mode: str
    adapter_dir: str
    targets: list[str]  # modules the adapter changes
    rank: dict[str, int] = field(default_factory=dict)
    merged: dict[str, LayerMerge] = field(default_factory=dict)  # quantized linears (merge mode)
    merged_dense: list[str] = field(default_factory=list)  # float tensors changed (merge mode)
    lossy: bool = False

    def summary(self) -> str:
        if self.mode == "separate":
            return (f"adapter {self.adapter_dir} kept separate ({len(self.targets)} target modules); "
                    f"copied to <export>/{ADAPTER_SUBDIR}/")
        if not self.merged:
            return f"adapter merged into {len(self.merged_dense)} float tensors (exact up to their dtype)"
        worst = max(m.rel_error for m in self.merged.values())
        moved = sum(m.q_changed for m in self.merged.values()) / len(self.merged)
        return (f"adapter merged into {len(self.merged)} INT4 linears on their original grid (lossy: "
                f"{moved:.2%} of integers moved, worst relative error of the merged delta {worst:.2f})")


@dataclass
class _Lora:
    a: Tensor  # [r, in] (embedding: [r, num_embeddings])
    b: Tensor  # [out, r] (embedding: [dim, r])
    scaling: float
    embedding: bool

    def delta(self) -> Tensor:
        d = (self.b.to(torch.float32) @ self.a.to(torch.float32)) * self.scaling
        return d.t() if self.embedding else d


def apply_adapter(
    qm: QuantizedModel, adapter_dir: str | Path, mode: str = "separate"
) -> tuple[QuantizedModel, AdapterReport]:
    """Check a PEFT LoRA adapter against ``qm`` and keep it separate or merge it (see module doc)."""
    if mode not in MODES:
        raise InputError(f"adapter mode {mode!r} is unknown; use 'separate' or 'merge'")
    adapter_dir = Path(adapter_dir)
    cfg, weights = load_adapter(adapter_dir)
    loras, full = _parse(cfg, weights, adapter_dir)
    report = AdapterReport(mode, str(adapter_dir), sorted(set(loras) | set(full)),
                           rank={n: lo.a.shape[0] for n, lo in loras.items()})
    _check_targets(qm, loras, full, adapter_dir)
    if mode == "separate":
        return qm, report

    if cfg.get("use_dora"):
        raise FormatConstraintError(f"{adapter_dir}: DoRA adapters cannot be merged by awqconv; use --adapter-mode separate")
    if cfg.get("lora_bias"):
        raise FormatConstraintError(f"{adapter_dir}: adapters with lora_bias cannot be merged; use --adapter-mode separate")
    linears = dict(qm.linears)
    dense = dict(qm.dense)
    for name, t in full.items():  # modules_to_save / trained biases: whole replacement tensors
        module, _, part = name.rpartition(".")
        if _unchanged(qm, name, t):
            continue
        if module in linears and part == "weight":
            linears[module], report.merged[module] = requantize(linears[module], t.to(torch.float32))
        elif module in linears and part == "bias":
            linears[module] = replace(linears[module], bias=t.to(linears[module].scales.dtype))
            report.merged_dense.append(name)
        else:
            dense[name] = t.to(dense[name].dtype)
            report.merged_dense.append(name)
    for module, lo in loras.items():
        if module in linears:
            p = linears[module]
            linears[module], report.merged[module] = requantize(p, p.dequantize(torch.float32) + lo.delta())
        else:
            key = f"{module}.weight"
            dense[key] = (dense[key].to(torch.float32) + lo.delta()).to(dense[key].dtype)
            report.merged_dense.append(key)
    report.lossy = True
    merged = replace(qm, linears=linears, dense=dense, prescaled=None,
                     provenance={**qm.provenance, "merged_adapter": str(adapter_dir)})
    log.info("%s", report.summary())
    return merged, report


def requantize(p: PackedLinear, w: Tensor) -> tuple[PackedLinear, LayerMerge]:
    """Round float ``w [out, in]`` onto ``p``'s grid (its scales and zeros): the lossy merge step."""
    if tuple(w.shape) != (p.out_features, p.in_features):
        raise ShapeError(f"merged weight {tuple(w.shape)} does not match [{p.out_features}, {p.in_features}]")
    g, hi = p.group_size, (1 << p.bits) - 1
    s = p.scales.to(torch.float32).repeat_interleave(g, dim=1)
    z = p.zeros.to(torch.float32).repeat_interleave(g, dim=1)
    target = torch.round(w / s) + z
    q = target.clamp(0, hi)
    new = PackedLinear.from_ints(q.to(torch.uint8), p.zeros, p.scales, g, p.bits, p.bias)
    old_w = p.dequantize(torch.float32)
    delta = (w - old_w).norm()
    err = (new.dequantize(torch.float32) - w).norm()
    stats = LayerMerge(
        q_changed=float((q.to(torch.uint8) != p.unpack()).float().mean()),
        clamped=int((target != q).sum()),
        rel_error=float(err / delta) if float(delta) > 0 else 0.0,
    )
    return new, stats


def load_adapter(adapter_dir: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """adapter_config.json and adapter_model.safetensors of a PEFT adapter directory."""
    if not (adapter_dir / "adapter_config.json").is_file():
        raise InputError(f"{adapter_dir} has no adapter_config.json; pass the directory model.save_pretrained() wrote")
    cfg = read_json(adapter_dir / "adapter_config.json")
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise FormatConstraintError(f"{adapter_dir}: peft_type {cfg.get('peft_type')} is not LoRA; only LoRA adapters are supported")
    f = adapter_dir / "adapter_model.safetensors"
    if not f.is_file():
        raise InputError(f"{adapter_dir} has no adapter_model.safetensors (.bin adapters are not read); "
                         "save with safe_serialization=True")
    return cfg, load_safetensors(f)


def copy_adapter(adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """Copy the adapter files into ``out_dir/adapter/`` (for runtimes that apply LoRA at load)."""
    src, dst = Path(adapter_dir), Path(out_dir) / ADAPTER_SUBDIR
    dst.mkdir(parents=True, exist_ok=True)
    for name in ADAPTER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    return dst


def _parse(cfg: dict[str, Any], weights: dict[str, Tensor], where: Path) -> tuple[dict[str, _Lora], dict[str, Tensor]]:
    """{module: LoRA pair} and {HF key: full tensor} (modules_to_save, trained biases)."""
    parts: dict[str, dict[str, Tensor]] = {}
    full: dict[str, Tensor] = {}
    pattern = re.compile(r"^(.*)\.(lora_A|lora_B)\.weight$|^(.*)\.(lora_embedding_A|lora_embedding_B)$")
    for key, t in weights.items():
        k = key.removeprefix(PREFIX)
        m = pattern.match(k)
        if m:
            module, kind = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
            parts.setdefault(module, {})[kind] = t
        elif ".lora_" in k or "lora_magnitude_vector" in k:
            if "lora_magnitude_vector" in k or ".lora_B.bias" in k:
                continue  # DoRA / lora_bias: fine when separate, refused by merge via the config
            raise FormatConstraintError(f"{where}: adapter tensor {key} is of an unsupported LoRA kind")
        else:
            # modules_to_save copies, trained biases, and base weights PEFT saves with embedding targets
            full[k.replace(".modules_to_save.default", "").replace(".base_layer.", ".")] = t
    loras = {}
    for module, d in parts.items():
        emb = "lora_embedding_A" in d
        a, b = (d.get("lora_embedding_A"), d.get("lora_embedding_B")) if emb else (d.get("lora_A"), d.get("lora_B"))
        if a is None or b is None or a.shape[0] != b.shape[1]:
            raise ShapeError(f"{where}: LoRA pair of {module} is incomplete or has mismatched rank")
        loras[module] = _Lora(a, b, _scaling(cfg, module, a.shape[0]), emb)
    return loras, full


def _scaling(cfg: dict[str, Any], module: str, r: int) -> float:
    """PEFT's scaling: alpha / r (or alpha / sqrt(r) with rsLoRA); alpha_pattern keys match name suffixes."""
    alpha = cfg.get("lora_alpha", 8)
    for key, value in (cfg.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            alpha = value
            break
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def _unchanged(qm: QuantizedModel, key: str, t: Tensor) -> bool:
    """Does the adapter's full copy of ``key`` equal the model's tensor (a saved base layer)?"""
    module, _, part = key.rpartition(".")
    if module in qm.linears:
        p = qm.linears[module]
        mine = p.dequantize(torch.float32) if part == "weight" else p.bias
    else:
        mine = qm.dense.get(key)
    return mine is not None and torch.equal(t.to(torch.float32), mine.to(torch.float32))


def _check_targets(qm: QuantizedModel, loras: dict[str, _Lora], full: dict[str, Tensor], where: Path) -> None:
    for module, lo in loras.items():
        if module in qm.linears:
            p = qm.linears[module]
            shape = (p.out_features, p.in_features)
        elif f"{module}.weight" in qm.dense:
            shape = tuple(qm.dense[f"{module}.weight"].shape)
        else:
            raise InputError(f"{where}: the adapter targets {module}, which this model does not have; "
                             "was it trained on another base?")
        got = (lo.a.shape[1], lo.b.shape[0]) if lo.embedding else (lo.b.shape[0], lo.a.shape[1])
        if got != shape:
            raise ShapeError(f"{where}: LoRA delta of {module} is {got}, the layer is {shape}; wrong base model")
    for key, t in full.items():
        module, _, part = key.rpartition(".")
        if module in qm.linears:
            p = qm.linears[module]
            want = (p.out_features, p.in_features) if part == "weight" else (p.out_features,)
        elif key in qm.dense:
            want = tuple(qm.dense[key].shape)
        else:
            raise InputError(f"{where}: the adapter stores {key}, which this model does not have")
        if tuple(t.shape) != want:
            raise ShapeError(f"{where}: adapter tensor {key} is {tuple(t.shape)}, the model's is {want}")
