"""ExLlamaV2 checkpoints: the 4-bit GPTQ "v1" layout its GPTQ kernels run, exact.

Per quantized linear ``{name}.qweight`` int32 ``[in/8, out]``, ``{name}.qzeros`` int32 ``[G, out/8]``
(zero - 1, nibble-packed), ``{name}.scales`` fp16 ``[G, out]`` (negative = zero-0 group stored
sign-flipped, see gptq_layout.py), ``{name}.g_idx`` only for the ``g_idx`` variant, ``{name}.bias``
fp16. Other tensors keep their dtype under their HF keys. config.json = source config + a GPTQ
``quantization_config`` (``checkpoint_format: gptq``) + explicit ``rope_theta``/``rope_scaling``;
``awqconv.json`` records what the writer changed so read() returns the canonical model bit-exactly.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .._io import load_checkpoint, read_json, safetensors_files
from ..config import QuantConfig
from ..errors import CorruptFileError, FormatConstraintError, InputError, ShapeError
from ..model import QuantizedModel
from ..packed import PackedLinear
from ._hfdir import (
    check_linears, collect_tensors, exact_fp16, quant_method, quant_method_of, read_assets, side_manifest, source_config, write_hf_dir,
)
from .base import ExportRequest
from .gptq_layout import V1_OFFSET, from_gptq, to_gptq
from .modelcard import awqconv_version, fp16_scales_note, render_model_card

NAME = "exllamav2"
FORMAT_ID = "awqconv-exllamav2"
MANIFEST = "awqconv.json"
VARIANTS = (None, "g_idx")
STORAGE_DTYPE = torch.float16  # ExLlamaV2's GPTQ matrix loader accepts fp16 scales and bias only
STORED_BY = "ExLlamaV2"
_OWN_FILES = ("config.json", MANIFEST, "README.md")
# config keys the writer may set; their source values are kept in the manifest
_OVERRIDDEN = ("rope_theta", "rope_scaling", "original_max_position_embeddings", "dtype", "torch_dtype",
               "quantization_config")

log = logging.getLogger(__name__)


# -- plan ------------------------------------------------------------------------------------


def plan(request: ExportRequest) -> list[str]:
    """Problems that would make write() fail, found from shapes and settings alone."""
    problems: list[str] = []
    variant = request.target.variant
    if variant not in VARIANTS:
        problems.append(f"exllamav2 has no variant {variant!r}; use 'exllamav2' or 'exllamav2:g_idx'")
    if request.bits != 4:
        problems.append("exllamav2 (GPTQ layout) stores only 4-bit weights; use --w-bit 4")
    gs = request.group_size
    if gs != -1 and gs & (gs - 1):
        problems.append(
            f"group_size={gs} is not a power of two; ExLlamaV2 infers the group size as the smallest "
            "power of two covering in_features/groups: use --group-size 32, 64 or 128"
        )
    for name, (out, n_in) in request.linear_shapes.items():
        problems += _shape_problems(name, out, n_in, gs, variant == "g_idx")
    return problems


def uses_prescaled(variant: str | None) -> bool:
    """exllamav2 re-lays the canonical integers out; it never reads prescaled weights."""
    return False


def _shape_problems(name: str, out: int, n_in: int, group_size: int, g_idx: bool) -> list[str]:
    problems = []
    if out % 8 or n_in % 8:
        problems.append(
            f"{name}: shape [{out}, {n_in}] is not a multiple of 8 in both dims, which GPTQ packing "
            "needs; keep this layer in 16-bit (quantize with --skip NAME)"
        )
    g = n_in if group_size == -1 else group_size
    if g <= 0 or n_in % g:
        problems.append(f"{name}: in_features={n_in} is not a multiple of group_size={g}")
    if g_idx and n_in > 65535:
        problems.append(f"{name}: in_features={n_in} > 65535, too long for ExLlamaV2's uint16 g_idx perm; "
                        "use 'exllamav2' without g_idx")
    return problems


# -- write -----------------------------------------------------------------------------------


def write(qm: QuantizedModel, out_dir: Path, variant: str | None = None) -> None:
    """Write ``qm`` as an ExLlamaV2-loadable GPTQ checkpoint into the existing empty ``out_dir``."""
    if variant not in VARIANTS:
        raise InputError(f"exllamav2 has no variant {variant!r}; use 'exllamav2' or 'exllamav2:g_idx'")
    g_idx = variant == "g_idx"

    def problems(name: str, p: PackedLinear) -> list[str]:
        found = []
        if p.group_size & (p.group_size - 1) and p.group_size != p.in_features:
            found.append(f"{name}: group_size={p.group_size} is not a power of two")
        return found + _shape_problems(name, p.out_features, p.in_features, p.group_size, g_idx)

    check_linears(qm, problems)
    flipped = 0

    def gptq_parts(name: str, p: PackedLinear) -> dict[str, Tensor]:
        nonlocal flipped
        t = to_gptq(p, with_g_idx=g_idx, name=name)
        flipped += t.flipped_groups
        exact_fp16(p.scales, f"{name}.scales", STORED_BY)  # checked in [out, group] coordinates
        parts = {"qweight": t.qweight, "qzeros": t.qzeros, "scales": t.scales.detach().cpu().to(STORAGE_DTYPE)}
        if t.g_idx is not None:
            parts["g_idx"] = t.g_idx
        if t.bias is not None:
            parts["bias"] = exact_fp16(t.bias, f"{name}.bias", STORED_BY)
        return parts

    tensors = collect_tensors(qm, gptq_parts)
    if flipped:
        log.info("exllamav2: %d zero-point-0 groups stored sign-flipped (exact)", flipped)
    config, overridden = hf_config_for(qm)
    manifest = {
        "format": FORMAT_ID,
        "format_version": 1,
        "awqconv_version": awqconv_version(),
        "quant_config": qm.quant_config.to_dict(),
        "scale_dtype": str(qm.dtype).removeprefix("torch.") if qm.linears else "float16",
        "flipped_groups": flipped,
        "config_overrides": overridden,
        "provenance": json.loads(json.dumps(qm.provenance, default=str)),
    }
    write_hf_dir(Path(out_dir), qm, tensors, label=NAME, own_files=_OWN_FILES, config=config,
                 card=_model_card(qm, flipped), manifests={MANIFEST: manifest})


def quantization_config_for(qm: QuantizedModel) -> dict[str, Any]:
    """A GPTQ block: ExLlamaV2 reads only ``checkpoint_format``; other loaders read the rest."""
    return {
        "quant_method": "gptq",
        "bits": 4,
        "group_size": qm.quant_config.group_size,
        "desc_act": False,
        "sym": not qm.quant_config.zero_point,
        "true_sequential": True,
        "checkpoint_format": "gptq",
    }


def hf_config_for(qm: QuantizedModel) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config.json, {key: source value or None}) with explicit RoPE keys: ExLlamaV2 reads
    ``rope_theta`` and ``rope_scaling`` at the top level, not transformers 5's ``rope_parameters``."""
    src = qm.hf_config
    cfg = {k: v for k, v in src.items() if k != "quantization_config"}
    rope = src.get("rope_parameters")
    if isinstance(rope, dict):
        if src.get("rope_theta") is None and rope.get("rope_theta") is not None:
            cfg["rope_theta"] = rope["rope_theta"]
        kind = rope.get("rope_type", rope.get("type", "default"))
        if src.get("rope_scaling") is None and kind != "default":
            # ExLlamaV2 asserts that only one of "type" / "rope_type" is present
            extra = {k: v for k, v in rope.items() if k not in ("rope_theta", "type", "rope_type")}
            cfg["rope_scaling"] = {**extra, "rope_type": kind}
            omp = "original_max_position_embeddings"  # longrope reads it at the top level
            if kind in ("longrope", "su") and src.get(omp) is None and rope.get(omp) is not None:
                cfg[omp] = rope[omp]
    cfg["dtype"] = "float16"
    cfg["torch_dtype"] = "float16"
    cfg["quantization_config"] = quantization_config_for(qm)
    overridden = {k: src.get(k) for k in _OVERRIDDEN if cfg.get(k) != src.get(k) or (k in cfg) != (k in src)}
    absent = [k for k in overridden if k not in src]
    return cfg, {"values": {k: v for k, v in overridden.items() if k in src}, "absent": absent}


def _model_card(qm: QuantizedModel, flipped: int) -> str:
    usage = """\
```python
from exllamav2 import ExLlamaV2, ExLlamaV2Config, ExLlamaV2Cache

config = ExLlamaV2Config("path/to/this/dir")
model = ExLlamaV2(config)
cache = ExLlamaV2Cache(model, lazy=True)
model.load_autosplit(cache)
```

Without flash-attn, set `EXLLAMA_NO_SDPA=1`: ExLlamaV2 0.3.2's SDPA path drops the causal mask
for multi-token forward passes."""
    notes = [("Layout: GPTQ v1 (`qweight` int32 [in/8, out] packed along the input, `qzeros` int32 "
              "[groups, out/8] holding zero - 1, `scales` fp16 [groups, out]); other tensors unchanged.")]
    if flipped:
        notes.append(f"{flipped} (column, group) pairs have zero point 0, which GPTQ v1 cannot store; "
                     "they are stored exactly as scale -s, zero 15, q' = 15 - q (same weights). "
                     "Loaders that clamp or reject negative scales will mis-read those groups.")
    scales_note = fp16_scales_note(qm)
    if scales_note:
        notes.append(scales_note)
    return render_model_card(qm, "ExLlamaV2 (GPTQ v1 layout)", usage, notes)


# -- read ------------------------------------------------------------------------------------


def detect(path: Path) -> bool:
    return quant_method(path) == "gptq"


def read(path: Path) -> QuantizedModel:
    """Read a GPTQ directory (ours bit-exactly, or any 4-bit non-act-order GPTQ checkpoint)."""
    path = Path(path)
    config = read_json(path / "config.json")
    qcfg = config.get("quantization_config") if isinstance(config, dict) else None
    if quant_method_of(config) != "gptq":
        raise InputError(f"{path}/config.json has no GPTQ quantization_config (quant_method 'gptq')")
    if int(qcfg.get("bits", 4)) != 4:
        raise FormatConstraintError(f"{path} declares {qcfg.get('bits')}-bit GPTQ weights; awqconv reads 4-bit")
    fmt = str(qcfg.get("checkpoint_format") or qcfg.get("format") or "gptq").lower()
    if fmt not in ("gptq", "gptq_v2"):
        raise FormatConstraintError(f"{path}: checkpoint_format {fmt!r} is not GPTQ v1/v2; awqconv cannot read it")
    offset = V1_OFFSET if fmt == "gptq" else 0
    manifest = side_manifest(path, MANIFEST, FORMAT_ID)
    if not safetensors_files(path, "model"):
        raise InputError(f"{path} has no model*.safetensors (.bin checkpoints are not read); re-save as safetensors")

    tensors = load_checkpoint(path, "model")
    scale_dtype = getattr(torch, manifest.get("scale_dtype", ""), None)
    linears: dict[str, PackedLinear] = {}
    for key in sorted(k for k in tensors if k.endswith(".qweight")):
        name = key.removesuffix(".qweight")
        linears[name] = _read_linear(path, tensors, name, offset, scale_dtype)
    if not linears:
        raise CorruptFileError(f"{path} declares GPTQ quantization but holds no *.qweight tensors")

    if "quant_config" in manifest:
        quant_config = QuantConfig.from_dict(manifest["quant_config"])
    else:
        groups = {p.group_size if p.group_size != p.in_features else -1 for p in linears.values()}
        quant_config = QuantConfig(
            w_bit=4,
            group_size=int(qcfg.get("group_size", groups.pop() if len(groups) == 1 else 128)),
            zero_point=not bool(qcfg.get("sym", False)),
            scale_dtype="bfloat16" if next(iter(linears.values())).scales.dtype == torch.bfloat16 else "float16",
        )
    return QuantizedModel(
        hf_config=source_config(config, manifest.get("config_overrides")),
        quant_config=quant_config,
        linears=linears,
        dense=tensors,  # what remains: embeddings, norms, lm_head
        provenance=manifest.get("provenance") or {"source_format": NAME, "source_path": str(path)},
        assets=_read_assets(path),
    )


def _read_linear(
    path: Path, tensors: dict[str, Tensor], name: str, offset: int, scale_dtype: torch.dtype | None
) -> PackedLinear:
    qweight = tensors.pop(f"{name}.qweight")
    parts = {k: tensors.pop(f"{name}.{k}", None) for k in ("qzeros", "scales", "g_idx", "bias")}
    for k in ("qzeros", "scales"):
        if parts[k] is None:
            raise CorruptFileError(f"{path}: {name}.qweight has no {name}.{k}; the checkpoint is incomplete")
    scales = parts["scales"]
    bias = parts["bias"]
    if isinstance(scale_dtype, torch.dtype) and scale_dtype != scales.dtype:
        scales = scales.to(scale_dtype)  # written from these values exactly (checked at export)
        bias = None if bias is None else bias.to(scale_dtype)
    elif scales.dtype == torch.float32:
        scales = scales.to(STORAGE_DTYPE)  # what ExLlamaV2 would use
    if bias is not None:
        bias = bias.to(scales.dtype)
    try:
        return from_gptq(qweight, parts["qzeros"], scales, parts["g_idx"], bias, offset, name=name)
    except ShapeError as e:
        raise CorruptFileError(f"{path}: {e}") from None


def _read_assets(path: Path) -> dict[str, bytes]:
    return read_assets(path, _OWN_FILES)
