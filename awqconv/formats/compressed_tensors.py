"""compressed-tensors ``pack-quantized`` W4A16 checkpoints (what llm-compressor writes and vLLM and
transformers load), written and read exactly.

Per quantized linear (ct_layout.py): ``{name}.weight_packed`` int32 ``[out, ceil(in/8)]``,
``{name}.weight_scale`` ``[out, G]`` in the scales' dtype, ``{name}.weight_zero_point`` int32
``[ceil(out/8), G]`` (asymmetric only), ``{name}.weight_shape`` int64 ``[out, in]``, ``{name}.bias``.
Every other tensor keeps its dtype under its checkpoint key. The scheme is symmetric when every zero
point of every linear is 8, else asymmetric; strategy ``group`` (``channel`` for group_size -1).
Mixtral's experts and router use its checkpoint names (``block_sparse_moe.experts.{e}.w1/w3/w2``),
which transformers renames on load and vLLM expects. ``config.json`` = source config + the
``quantization_config`` compressed-tensors' ModelCompressor writes + ``dtype`` = the scales' dtype;
``awqconv.json`` keeps what the CT config cannot (quant settings, provenance, overridden keys), so
read() returns our own export bit-exactly. read() also takes llm-compressor checkpoints and refuses,
by name, everything the canonical integers cannot hold exactly (ct_config.py).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .._io import load_checkpoint, read_json, safetensors_files
from ..config import QuantConfig
from ..errors import CorruptFileError, FormatConstraintError, InputError, ShapeError
from ..model import QuantizedModel
from ..packed import PackedLinear, bitwise_equal
from ._hfdir import (
    check_linears, collect_tensors, quant_method, quant_method_of, read_assets, side_manifest, source_config, write_hf_dir,
)
from .base import ExportRequest
from .ct_config import QUANT_METHOD, WeightScheme, check_quantization_config, quantization_config
from .ct_layout import from_ct, is_symmetric, to_ct
from .integrity import MANIFEST as INTEGRITY_MANIFEST
from .modelcard import awqconv_version, render_model_card

NAME = "compressed-tensors"
FORMAT_ID = "awqconv-compressed-tensors"
MANIFEST = "awqconv.json"
_OWN_FILES = ("config.json", MANIFEST, "README.md")
_OVERRIDDEN = ("dtype", "torch_dtype", "quantization_config")  # config keys the writer sets
BITS_PROBLEM = ("compressed-tensors export writes 4-bit (W4A16) weights only; use --w-bit 4 or the "
                "canonical/gguf formats")
# per-module tensors of compressed-tensors schemes awqconv cannot represent (activation / KV-cache
# quantization, FP4 global scales); left over after every weight_packed linear is read, they are refused
_FOREIGN_PARTS = ("weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx", "weight_global_scale",
                  "input_scale", "input_zero_point", "input_global_scale", "output_scale", "k_scale", "v_scale")
_EMBEDDINGS = ("wte", "wpe")  # 2-D weights that are not linears (besides names containing "emb")


# -- plan ------------------------------------------------------------------------------------


def plan(request: ExportRequest) -> list[str]:
    """Problems that would make write() fail, found from shapes and settings alone."""
    problems: list[str] = []
    if request.target.variant is not None:
        problems.append(f"compressed-tensors has no variant {request.target.variant!r}; use 'compressed-tensors'")
    if request.bits != 4:
        problems.append(BITS_PROBLEM)
    g = request.group_size
    for name, (_, n_in) in request.linear_shapes.items():
        if g != -1 and n_in % g:
            problems.append(f"{name}: in_features={n_in} is not a multiple of group_size={g}; choose a group "
                            "size dividing it (e.g. --group-size 32 or -1)")
    return problems


def uses_prescaled(variant: str | None) -> bool:
    """compressed-tensors re-lays the canonical integers out; it never reads prescaled weights."""
    return False


# -- checkpoint names ------------------------------------------------------------------------

# Mixtral checkpoints (and vLLM's loader) name the MoE block block_sparse_moe and the experts'
# linears w1 (gate), w3 (up), w2 (down); transformers 5 modules, hence canonical names, use mlp.*
_MIXTRAL_W = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
_MIXTRAL_CANON = {v: k for k, v in _MIXTRAL_W.items()}


def checkpoint_name(name: str, model_type: str | None) -> str:
    """The checkpoint key of a canonical (transformers 5 module) name."""
    if model_type != "mixtral" or ".mlp." not in name:
        return name
    name = name.replace(".mlp.", ".block_sparse_moe.")
    return re.sub(r"(\.experts\.\d+\.)(gate_proj|up_proj|down_proj)\b", lambda m: m[1] + _MIXTRAL_W[m[2]], name)


def canonical_name(key: str, model_type: str | None) -> str:
    """Inverse of :func:`checkpoint_name`."""
    if model_type != "mixtral" or ".block_sparse_moe." not in key:
        return key
    key = key.replace(".block_sparse_moe.", ".mlp.")
    return re.sub(r"(\.experts\.\d+\.)(w1|w3|w2)\b", lambda m: m[1] + _MIXTRAL_CANON[m[2]], key)


def _renamed(d: dict[str, Any], rename, what: str) -> dict[str, Any]:
    out = {rename(k): v for k, v in d.items()}
    if len(out) != len(d):
        raise ShapeError(f"two {what} map to the same checkpoint name; rename them in the source model")
    return out


def dense_linear_names(dense: dict[str, Tensor]) -> list[str]:
    """Module names of the 2-D ``*.weight`` tensors that are linears kept in float (routers,
    skipped layers, lm_head), not embeddings."""
    names = []
    for key, t in dense.items():
        if not key.endswith(".weight") or t.dim() != 2:
            continue
        module = key.removesuffix(".weight")
        last = module.rsplit(".", 1)[-1]
        if "emb" in last or last in _EMBEDDINGS:
            continue
        names.append(module)
    return names


# -- write -----------------------------------------------------------------------------------


def write(qm: QuantizedModel, out_dir: Path, variant: str | None = None) -> None:
    """Write ``qm`` as a compressed-tensors pack-quantized checkpoint into the existing empty ``out_dir``."""
    if variant is not None:
        raise InputError(f"compressed-tensors has no variant {variant!r}; use 'compressed-tensors'")
    g = qm.quant_config.group_size
    bits = {p.bits for p in qm.linears.values()} | {qm.quant_config.w_bit}

    def problems(name: str, p: PackedLinear) -> list[str]:
        if p.group_size != (p.in_features if g == -1 else g):
            return [f"{name}: group size {p.group_size} differs from the model's group_size={g}; "
                    "the compressed-tensors export declares one scheme: use the canonical format"]
        return []

    check_linears(qm, problems, [] if bits == {4} else [BITS_PROBLEM])
    _check_tied_head(qm)
    symmetric = all(is_symmetric(p) for p in qm.linears.values())
    model_type = qm.hf_config.get("model_type")
    rename = lambda n: checkpoint_name(n, model_type)  # noqa: E731
    linears = _renamed(qm.linears, rename, "quantized linears")
    dense = _renamed(qm.dense, rename, "tensors")
    ignore = ["lm_head"] + sorted(n for n in dense_linear_names(dense) if n != "lm_head")

    def parts(name: str, p: PackedLinear) -> dict[str, Tensor]:
        t = to_ct(p, symmetric)
        out = {"weight_packed": t.weight_packed, "weight_scale": t.weight_scale.detach().cpu(),
               "weight_shape": t.weight_shape}
        if t.weight_zero_point is not None:
            out["weight_zero_point"] = t.weight_zero_point
        if t.bias is not None:
            out["bias"] = t.bias.detach().cpu()
        return out

    renamed = QuantizedModel(qm.hf_config, qm.quant_config, linears, dense)
    tensors = collect_tensors(renamed, parts)
    scheme = WeightScheme(symmetric=symmetric, group_size=g)
    config, overridden = hf_config_for(qm, scheme, ignore)
    manifest = {
        "format": FORMAT_ID,
        "format_version": 1,
        "awqconv_version": awqconv_version(),
        "quant_config": qm.quant_config.to_dict(),
        "config_overrides": overridden,
        "provenance": json.loads(json.dumps(qm.provenance, default=str)),
    }
    write_hf_dir(Path(out_dir), qm, tensors, label=NAME, own_files=_OWN_FILES, config=config,
                 card=_model_card(qm, scheme), manifests={MANIFEST: manifest})


def _check_tied_head(qm: QuantizedModel) -> None:
    """A loader re-ties ``lm_head`` to the input embedding when the config says so; refuse a head that differs."""
    head = qm.dense.get("lm_head.weight")
    if head is None or not qm.hf_config.get("tie_word_embeddings", True):
        return
    if not any(bitwise_equal(t, head) for k, t in qm.dense.items() if k != "lm_head.weight"):
        raise FormatConstraintError(
            "config.json sets tie_word_embeddings but lm_head.weight differs from the input embedding; "
            "a loader would silently replace it: set tie_word_embeddings false in the config"
        )


def hf_config_for(qm: QuantizedModel, scheme: WeightScheme, ignore: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config.json, {values: source values of overridden keys, absent: keys the source lacked}).

    ``dtype`` is the scales' dtype: compressed-tensors creates ``weight_scale`` in the model dtype,
    so loading in another one would round the scales.
    """
    src = qm.hf_config
    cfg = {k: v for k, v in src.items() if k != "quantization_config"}
    dtype = str(qm.dtype).removeprefix("torch.")
    cfg["dtype"] = dtype  # transformers >= 5
    cfg["torch_dtype"] = dtype  # transformers 4.x, vLLM
    cfg["quantization_config"] = quantization_config(scheme, ignore)
    overridden = [k for k in _OVERRIDDEN if cfg.get(k) != src.get(k) or (k in cfg) != (k in src)]
    values = {k: src[k] for k in overridden if k in src}
    return cfg, {"values": values, "absent": [k for k in overridden if k not in src]}


def _model_card(qm: QuantizedModel, scheme: WeightScheme) -> str:
    if scheme.symmetric:
        load = """# compressed-tensors unpacks the weights on the first forward pass
model = AutoModelForCausalLM.from_pretrained("path/to/this/dir")"""
    else:
        load = """# asymmetric: unpack at load (see the notes)
model = AutoModelForCausalLM.from_pretrained(
    "path/to/this/dir", quantization_config=CompressedTensorsConfig(dequantize=True))"""
    usage = f"""\
```python
# pip install compressed-tensors
from transformers import AutoModelForCausalLM, CompressedTensorsConfig

{load}
```

vLLM reads compressed-tensors W4A16 checkpoints: `vllm serve path/to/this/dir`."""
    zp = ("symmetric: no zero points stored (every canonical zero point is 8)" if scheme.symmetric
          else "asymmetric: `weight_zero_point` int32 [ceil(out/8), groups], packed along the output dim")
    notes = [
        "Layout: compressed-tensors `pack-quantized` (`weight_packed` int32 [out, in/8], eight consecutive "
        f"inputs per word, values stored as q + 8; `weight_scale` [out, groups]; {zp}); other tensors unchanged.",
        f"Scheme: W4A16, strategy `{scheme.strategy}`"
        + (f", group size {scheme.group_size}" if scheme.group_size > 0 else "")
        + "; the same integers and scales as the canonical artifact, re-laid out without rounding.",
    ]
    if not scheme.symmetric:
        # measured with transformers 5.25 + compressed-tensors 0.20.1 (llm-compressor's own asymmetric
        # checkpoints fail the same way): the compressed load shapes weight_zero_point unpacked
        notes.append("Asymmetric: with transformers 5.25 / compressed-tensors 0.20.1 load it with "
                     "`quantization_config=CompressedTensorsConfig(dequantize=True)`; the default compressed "
                     "load expects unpacked zero points and fails on every pack-quantized asymmetric checkpoint.")
        if any(".experts." in n for n in qm.linears):
            notes.append("Asymmetric MoE experts do not load in transformers 5.25 at all (its expert decompression "
                         "drops the zero points; transformers PR #47430 fixes it); quantize with --symmetric for a "
                         "checkpoint transformers loads.")
    if qm.hf_config.get("model_type") == "mixtral":
        notes.append("Mixtral experts are stored under their checkpoint names `block_sparse_moe.experts.{e}.w1/w3/w2`.")
    return render_model_card(qm, "compressed-tensors (pack-quantized W4A16)", usage, notes)


# -- read ------------------------------------------------------------------------------------


def detect(path: Path) -> bool:
    return quant_method(path) == QUANT_METHOD


def read(path: Path) -> QuantizedModel:
    """Read a pack-quantized W4A16 directory (ours bit-exactly, or llm-compressor's) back to canonical."""
    path = Path(path)
    config = read_json(path / "config.json")
    if quant_method_of(config) != QUANT_METHOD:
        raise InputError(f"{path}/config.json has no compressed-tensors quantization_config "
                         f"(quant_method {QUANT_METHOD!r})")
    schemes = check_quantization_config(config["quantization_config"], str(path))
    if not safetensors_files(path, "model"):
        raise InputError(f"{path} has no model*.safetensors (.bin checkpoints are not read); re-save as safetensors")
    manifest = side_manifest(path, MANIFEST, FORMAT_ID)
    tensors = load_checkpoint(path, "model")
    symmetric_only = all(s.symmetric for s in schemes)
    asymmetric_only = not any(s.symmetric for s in schemes)

    linears: dict[str, PackedLinear] = {}
    for key in sorted(k for k in tensors if k.endswith(".weight_packed")):
        name = key.removesuffix(".weight_packed")
        linears[name] = _read_linear(path, tensors, name, symmetric_only, asymmetric_only)
    if not linears:
        raise CorruptFileError(f"{path} declares compressed-tensors quantization but holds no *.weight_packed tensors")
    stray = sorted(k for k in tensors if k.rpartition(".")[2] in _FOREIGN_PARTS)
    if stray:
        raise FormatConstraintError(
            f"{path}: tensor {stray[0]} belongs to no pack-quantized linear (activation, KV-cache or "
            "non-INT4 quantization); awqconv reads W4A16 pack-quantized checkpoints only"
        )
    _check_group_sizes(path, linears, schemes)

    model_type = config.get("model_type")
    rename = lambda k: canonical_name(k, model_type)  # noqa: E731
    linears = _renamed(linears, rename, "quantized linears")
    dense = _renamed(tensors, rename, "tensors")  # what remains: embeddings, norms, lm_head, routers
    skipped = sorted(n for n in dense_linear_names(dense) if n != "lm_head")
    if "quant_config" in manifest:
        quant_config = QuantConfig.from_dict(manifest["quant_config"])
    else:
        scale_dtypes = {p.scales.dtype for p in linears.values()}
        quant_config = QuantConfig(
            w_bit=4,
            group_size=schemes[0].group_size,
            zero_point=not symmetric_only,
            scale_dtype={torch.float16: "float16", torch.bfloat16: "bfloat16"}.get(scale_dtypes.pop())
            if len(scale_dtypes) == 1 else None,
        )
    provenance = manifest.get("provenance") or {"source_format": NAME, "source_path": str(path),
                                                "modules_not_converted": skipped}
    return QuantizedModel(
        hf_config=source_config(config, manifest.get("config_overrides")),
        quant_config=quant_config,
        linears=linears,
        dense=dense,
        provenance=provenance,
        # the checksum manifest belongs to the artifact directory, not to the model
        assets=read_assets(path, (*_OWN_FILES, INTEGRITY_MANIFEST)),
    )


def _read_linear(path: Path, tensors: dict[str, Tensor], name: str, symmetric_only: bool,
                 asymmetric_only: bool) -> PackedLinear:
    packed = tensors.pop(f"{name}.weight_packed")
    scale = tensors.pop(f"{name}.weight_scale", None)
    zp = tensors.pop(f"{name}.weight_zero_point", None)
    shape = tensors.pop(f"{name}.weight_shape", None)
    g_idx = tensors.pop(f"{name}.weight_g_idx", None)
    bias = tensors.pop(f"{name}.bias", None)
    if scale is None:
        raise CorruptFileError(f"{path}: {name}.weight_packed has no {name}.weight_scale; the checkpoint is incomplete")
    if not scale.is_floating_point():
        raise CorruptFileError(f"{path}: {name}.weight_scale is {scale.dtype}, not a float tensor")
    if zp is None and asymmetric_only:
        raise CorruptFileError(
            f"{path}: {name} has no weight_zero_point but its scheme is asymmetric (symmetric: false); "
            "the checkpoint is incomplete: re-save it with compressed-tensors"
        )
    try:
        p = from_ct(packed, scale, zp, shape, None if bias is None else bias.to(scale.dtype), name=name)
    except ShapeError as e:
        raise CorruptFileError(f"{path}: {e}") from None
    if zp is not None and symmetric_only and not is_symmetric(p):
        raise CorruptFileError(f"{path}: {name}.weight_zero_point holds non-zero values but every scheme is symmetric")
    if g_idx is not None and not torch.equal(g_idx.to(torch.int64).reshape(-1),
                                            torch.arange(p.in_features) // p.group_size):
        raise FormatConstraintError(
            f"{path}: {name}.weight_g_idx reorders the input channels (GPTQ act-order); awqconv's integers "
            "are grouped in input order: re-quantize without act-order (actorder null or 'weight')"
        )
    return p


def _check_group_sizes(path: Path, linears: dict[str, PackedLinear], schemes: list[WeightScheme]) -> None:
    """Each linear's group size (from its shapes) must be one a scheme declares."""
    declared = {s.group_size for s in schemes}
    for name, p in linears.items():
        if p.group_size not in declared and not (-1 in declared and p.n_groups == 1):
            raise CorruptFileError(
                f"{path}: {name} has {p.n_groups} groups of {p.group_size} inputs but the config declares "
                f"group_size {sorted(declared)}; the checkpoint does not match its config"
            )


