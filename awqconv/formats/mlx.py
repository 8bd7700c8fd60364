"""MLX-LM checkpoints (``mlx_lm.load``): affine-quantized linears, written from the canonical integers.

Per quantized linear ``{name}.weight`` uint32 ``[out, in * bits / 32]``, ``{name}.scales`` and
``{name}.biases`` ``[out, in / g]`` in the scales' dtype, ``{name}.bias`` for linears with one;
MoE experts stacked ``[experts, ...]`` under ``switch_mlp`` (mlx_families.py). MLX dequantizes
``w = q * scale + bias``, so ``bias = -z * s``: the product is exact in float64 and rounded once to
the stored dtype, the only inexactness of the format (|dw| <= z * s * 2^-11 in fp16, 2^-8 in bf16).
MLX packs values along the input dimension as one little-endian bit stream, element ``i`` at bit
``i * bits`` of the row, which is the canonical ``qweight`` byte for byte: the words are its bytes
read as little-endian uint32. Dense tensors (embeddings, norms, routers, lm_head) stay float in the
scales' dtype; mlx-lm quantizes exactly the modules whose ``{name}.scales`` it finds, inferring each
one's bits and group size from the shapes, so ``quantization: {group_size, bits, mode}`` in
config.json (mirrored as ``quantization_config``, as mlx-lm's own convert writes it) is the default
it checks against. ``awqconv-mlx.json`` records what the writer changed so read() restores the source.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._io import load_checkpoint, read_json, safetensors_files
from ..config import QuantConfig
from ..errors import CorruptFileError, FormatConstraintError, InputError
from ..model import QuantizedModel
from ..packed import PackedLinear, bitwise_equal
from . import mlx_families as fams
from ._hfdir import check_linears, read_assets, refuse, side_manifest, source_config, write_hf_dir
from .base import ExportRequest
from .modelcard import awqconv_version, render_model_card

NAME = "mlx"
FORMAT_ID = "awqconv-mlx"
MANIFEST = "awqconv-mlx.json"
GROUP_SIZES = (32, 64, 128)  # what mx.quantize / quantized_matmul accept
BITS = (2, 3, 4, 5, 6, 8)  # affine widths of MLX whose packing is checked against mx.quantize in the tests
_OWN_FILES = ("config.json", MANIFEST, "README.md")
_QUANT_KEYS = ("quantization", "quantization_config")


# -- plan ------------------------------------------------------------------------------------


def plan(request: ExportRequest) -> list[str]:
    """Problems that would make write() fail, found from the config, shapes and settings alone."""
    problems: list[str] = []
    if request.target.variant is not None:
        problems.append(f"mlx has no variant {request.target.variant!r}; use 'mlx'")
    problems += _setting_problems(request.bits, request.group_size, request.scale_dtype)
    has_head = bool(request.hf_config.get("tie_word_embeddings") is False)
    problems += fams.mlx_config(request.hf_config, has_head)[1]
    for name, (_out, n_in) in request.linear_shapes.items():
        if request.group_size > 0 and n_in % request.group_size:
            problems.append(f"mlx: {name}: in_features={n_in} is not a multiple of group_size={request.group_size}")
    return problems


def uses_prescaled(variant: str | None) -> bool:
    """mlx re-lays the canonical integers out; it never reads prescaled weights."""
    return False


def _setting_problems(bits: int, group_size: int, scale_dtype: torch.dtype) -> list[str]:
    problems = []
    if bits not in BITS:
        problems.append(f"mlx stores {', '.join(map(str, BITS))}-bit affine weights, not {bits}-bit; "
                        "use --w-bit 4")
    if group_size not in GROUP_SIZES:
        problems.append(f"mlx supports group sizes {', '.join(map(str, GROUP_SIZES))}, not {group_size}; "
                        "use --group-size 64 (mlx-lm's default) or 32 / 128")
    if bits == 8 and scale_dtype == torch.bfloat16:
        problems.append("mlx: 8-bit weights with bf16 scales would round the stored bias -z*s by up to half a "
                        "quantization step; use --scale-dtype float16 or fewer bits")
    return problems


# -- write -----------------------------------------------------------------------------------


def write(qm: QuantizedModel, out_dir: Path, variant: str | None = None) -> None:
    """Write ``qm`` as an mlx-lm checkpoint into the existing empty directory ``out_dir``."""
    if variant is not None:
        raise InputError(f"mlx has no variant {variant!r}; use 'mlx'")
    arch, fam = fams.family_of(qm.hf_config)
    if fam is None:
        raise FormatConstraintError(fams.unsupported(arch))
    dtype = qm.dtype

    def problems(name: str, p: PackedLinear) -> list[str]:
        found = [f"{name}: {msg}" for msg in _setting_problems(p.bits, p.group_size, dtype)]
        if fams.expert_key(name, fam) is not None and p.bias is not None:
            found.append(f"{name}: mlx-lm's experts have no bias")
        return found

    check_linears(qm, problems)
    dense = _dense(qm, fam)
    cfg, config_problems, notes = fams.mlx_config(qm.hf_config, "lm_head.weight" in dense)
    refuse(config_problems)
    tensors, naming = _linear_tensors(qm, fam, dtype)
    for key, t in dense.items():
        if key in tensors:
            raise FormatConstraintError(f"mlx: dense tensor {key} collides with a quantized linear's tensor")
        tensors[key] = _stored(t, key, dtype)
    bits = qm.quant_config.w_bit
    quant = {"group_size": qm.quant_config.group_size, "bits": bits, "mode": "affine"}
    cfg.update({"quantization": quant, "quantization_config": dict(quant)})
    manifest = {
        "format": FORMAT_ID,
        "format_version": 1,
        "awqconv_version": awqconv_version(),
        "quant_config": qm.quant_config.to_dict(),
        "expert_naming": naming,
        "config_overrides": _overrides(qm.hf_config, cfg),
        "provenance": json.loads(json.dumps(qm.provenance, default=str)),
    }
    write_hf_dir(Path(out_dir), qm, tensors, label=NAME, own_files=_OWN_FILES, config=cfg,
                 card=_model_card(qm, notes), manifests={MANIFEST: manifest}, metadata={"format": "mlx"})


def to_mlx(p: PackedLinear, dtype: torch.dtype) -> dict[str, Tensor]:
    """``weight`` uint32, ``scales``, ``biases`` (and ``bias``) of one linear as mlx stores them."""
    words = np.ascontiguousarray(p.qweight.detach().cpu().numpy()).view("<u4")  # bytes -> LE words
    scales = p.scales.detach().cpu()
    biases = (-(p.zeros.to(torch.float64) * scales.to(torch.float64))).to(dtype)  # the one rounding
    parts = {"weight": torch.from_numpy(words.astype(np.uint32)), "scales": scales.to(dtype), "biases": biases}
    if p.bias is not None:
        parts["bias"] = p.bias.detach().cpu().to(dtype)
    return parts


def _linear_tensors(qm: QuantizedModel, fam: fams.Family, dtype: torch.dtype) -> tuple[dict[str, Tensor], str]:
    tensors: dict[str, Tensor] = {}
    experts: dict[str, dict[int, dict[str, Tensor]]] = {}
    namings = set()
    for name, p in qm.linears.items():
        parts = to_mlx(p, dtype)
        if not torch.isfinite(parts["biases"]).all():
            raise FormatConstraintError(f"mlx: {name}: -zero * scale overflows {dtype}; use the canonical format")
        hit = fams.expert_key(name, fam)
        if hit is None:
            tensors.update({f"{name}.{k}": v for k, v in parts.items()})
            continue
        prefix, e, naming = hit
        namings.add(naming)
        experts.setdefault(prefix, {})[e] = parts
    for prefix, by_expert in experts.items():
        if sorted(by_expert) != list(range(len(by_expert))):
            raise FormatConstraintError(f"mlx: {prefix} has experts {sorted(by_expert)}; mlx-lm stacks all of "
                                        "them, so every expert must be quantized")
        shapes = {tuple(t.shape) for parts in by_expert.values() for t in parts.values()}
        try:
            for k in ("weight", "scales", "biases"):
                tensors[f"{prefix}.{k}"] = torch.stack([by_expert[e][k] for e in range(len(by_expert))])
        except RuntimeError:
            raise FormatConstraintError(f"mlx: the experts of {prefix} differ in shape ({sorted(shapes)})") from None
    if len(namings) > 1:
        raise FormatConstraintError("mlx: MoE experts are named both block_sparse_moe.experts.*.w1 and "
                                    "mlp.experts.*.gate_proj; re-quantize from one checkpoint")
    return tensors, namings.pop() if namings else "hf"


def _dense(qm: QuantizedModel, fam: fams.Family) -> dict[str, Tensor]:
    """Dense tensors under mlx-lm's names; a tied lm_head is dropped (mlx-lm re-ties it)."""
    dense: dict[str, Tensor] = {}
    for key, t in qm.dense.items():
        if fams.EXPERT.match(key) or key.endswith(("experts.gate_up_proj", "experts.down_proj")):
            raise FormatConstraintError(f"mlx: expert weight {key} is not quantized; mlx-lm stacks every expert "
                                        "of a layer into one quantized tensor: quantize all experts")
        dense[fams.router_key(key, fam)] = t
    head, embed = dense.get("lm_head.weight"), dense.get("model.embed_tokens.weight")
    tied = qm.hf_config.get("tie_word_embeddings", head is None) or fam.tied_only
    if head is not None and tied:
        if embed is None or not bitwise_equal(head, embed):
            raise FormatConstraintError(
                "mlx: lm_head.weight differs from the input embedding but "
                + ("mlx-lm's model of this family always reuses the embedding"
                   if fam.tied_only else "config.json sets tie_word_embeddings")
                + "; use hf-awq or gguf (or set tie_word_embeddings false)")
        del dense["lm_head.weight"]
    return dense


def _stored(t: Tensor, key: str, dtype: torch.dtype) -> Tensor:
    """A dense tensor in the storage dtype, refusing values it cannot hold (fp16 beyond 65504)."""
    t = t.detach().cpu()
    if not t.is_floating_point():
        return t
    out = t.to(dtype)
    if bool(torch.isfinite(t).all()) and not bool(torch.isfinite(out).all()):
        raise FormatConstraintError(f"mlx: {key} has values beyond the {dtype} range; quantize with "
                                    "--scale-dtype bfloat16 or use the canonical format")
    return out


def _overrides(src: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
    """What the writer changed in config.json: source values, and keys it added."""
    missing = object()
    keys = (set(src) | set(cfg)) - set(_QUANT_KEYS)
    changed = {k for k in keys if src.get(k, missing) != cfg.get(k, missing)}
    return {"values": {k: src[k] for k in sorted(changed) if k in src},
            "absent": sorted(k for k in changed if k not in src)}


def _model_card(qm: QuantizedModel, notes: list[str]) -> str:
    usage = """\
```python
from mlx_lm import load, generate

model, tokenizer = load("path/to/this/dir")
print(generate(model, tokenizer, prompt="Hello", max_tokens=32))
```

On Linux, `pip install "mlx-lm[cpu]"` (or `[cuda12]`) brings an MLX backend; macOS uses Metal."""
    dt = str(qm.dtype).removeprefix("torch.")
    layout = (f"Layout: MLX affine (`weight` uint32 [out, in*bits/32], `scales` and `biases` {dt} "
              f"[out, in/g], w = q * scale + bias); MoE experts stacked under `switch_mlp`; "
              f"other tensors {dt}.")
    exact = (f"The zero points are stored as biases -z * scale, rounded once to {dt}: the only difference "
             "from the quantizer's integers (a fraction of a grid step per group: < 1% in fp16).")
    return render_model_card(qm, "MLX (mlx-lm affine layout)", usage, [layout, exact, *notes],
                             library_name="mlx")


# -- read ------------------------------------------------------------------------------------


def detect(path: Path) -> bool:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        q = json.loads(cfg.read_text()).get("quantization")
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(q, dict) and "bits" in q and "group_size" in q


def read(path: Path) -> QuantizedModel:
    """An mlx directory (ours, or mlx-lm's affine one whose biases are -integer * scale) as canonical."""
    path = Path(path)
    config = read_json(path / "config.json")
    quant = config.get("quantization") if isinstance(config, dict) else None
    if not isinstance(quant, dict) or "bits" not in quant or "group_size" not in quant:
        raise InputError(f"{path}/config.json has no mlx `quantization` block ({{group_size, bits}})")
    if quant.get("mode", "affine") != "affine":
        raise FormatConstraintError(f"{path}: mlx mode {quant['mode']!r} has no integer zero points; "
                                    "awqconv reads affine checkpoints only")
    if not safetensors_files(path, "model"):
        raise InputError(f"{path} has no model*.safetensors; it is not an mlx-lm checkpoint")
    manifest = side_manifest(path, MANIFEST, FORMAT_ID)
    naming = manifest.get("expert_naming", "hf")
    tensors = load_checkpoint(path, "model")
    linears: dict[str, PackedLinear] = {}
    for key in sorted(k for k in tensors if k.endswith(".scales")):
        prefix = key.removesuffix(".scales")
        parts = {k: tensors.pop(f"{prefix}.{k}", None) for k in ("weight", "scales", "biases", "bias")}
        settings = quant.get(prefix) if isinstance(quant.get(prefix), dict) else quant
        bits = int(settings.get("bits", quant["bits"]))
        if parts["weight"] is None or parts["biases"] is None:
            raise CorruptFileError(f"{path}: {key} has no {prefix}.weight or {prefix}.biases; the checkpoint is "
                                   "incomplete (or not affine)")
        if parts["weight"].dim() == 3:  # stacked experts
            for e in range(parts["weight"].shape[0]):
                one = {k: None if v is None else v[e] for k, v in parts.items()}
                linears[fams.canonical_expert(prefix, e, naming)] = from_mlx(one, bits, f"{path}: {prefix}[{e}]")
        else:
            linears[prefix] = from_mlx(parts, bits, f"{path}: {prefix}")
    if not linears:
        raise CorruptFileError(f"{path} declares mlx quantization but holds no *.scales tensors")
    moe = fams.family_of(config)[1]
    dense = {fams.canonical_router(k, naming) if moe and moe.moe_block else k: v for k, v in tensors.items()}
    first = next(iter(linears.values()))
    if "quant_config" in manifest:
        quant_config = QuantConfig.from_dict(manifest["quant_config"])
    else:
        dtype = first.scales.dtype
        quant_config = QuantConfig(w_bit=first.bits, group_size=first.group_size, zero_point=True,
                                   scale_dtype="bfloat16" if dtype == torch.bfloat16 else "float16")
    return QuantizedModel(
        hf_config=source_config(config, manifest.get("config_overrides"), _QUANT_KEYS),
        quant_config=quant_config,
        linears=linears,
        dense=dense,
        provenance=manifest.get("provenance") or {"source_format": NAME, "source_path": str(path)},
        assets=read_assets(path, _OWN_FILES),
    )


def from_mlx(parts: dict[str, Tensor | None], bits: int, where: str) -> PackedLinear:
    """Inverse of :func:`to_mlx`: the zero point of each group is the integer z with
    ``round(-z * s) == bias`` exactly (z = round(-bias / s) and its neighbours tried)."""
    weight, scales, biases = parts["weight"], parts["scales"], parts["biases"]
    if weight.dtype != torch.uint32:
        raise CorruptFileError(f"{where}.weight is {weight.dtype}, not uint32")
    if scales.shape != biases.shape or scales.dtype != biases.dtype:
        raise CorruptFileError(f"{where}: scales {tuple(scales.shape)} {scales.dtype} and biases "
                               f"{tuple(biases.shape)} {biases.dtype} differ")
    out, words = weight.shape
    n_in = words * 32 // bits
    if words * 32 % bits or n_in % scales.shape[1]:
        raise CorruptFileError(f"{where}: {words} words of {bits}-bit values do not split into "
                               f"{scales.shape[1]} groups")
    s64, b64 = scales.to(torch.float64), biases.to(torch.float64)
    hi = (1 << bits) - 1
    guess = torch.round(-b64 / torch.where(s64 == 0, 1.0, s64))
    zeros, found = torch.zeros_like(guess), torch.zeros_like(guess, dtype=torch.bool)
    for delta in (0, -1, 1):
        z = (guess + delta).clamp(0, hi)
        ok = ~found & ((-(z * s64)).to(scales.dtype) == biases)  # -0.0 == 0.0: z = 0 either way
        zeros, found = torch.where(ok, z, zeros), found | ok
    if not bool(found.all()):
        bad = (~found).nonzero()[0].tolist()
        raise FormatConstraintError(
            f"{where}: bias {biases[tuple(bad)].item():.6g} / scale {scales[tuple(bad)].item():.6g} is not "
            f"-z * scale for an integer z in [0, {hi}] ({int((~found).sum())} such groups): mlx-lm's own "
            "quantizer stores float offsets that awqconv cannot turn into integers; re-quantize with awqconv"
        )
    qweight = torch.from_numpy(np.ascontiguousarray(weight.numpy()).astype("<u4").view(np.uint8).reshape(out, -1))
    bias = parts.get("bias")
    try:
        p = PackedLinear(qweight.clone(), scales.contiguous(), zeros.to(torch.uint8), n_in,
                         n_in // scales.shape[1], bits, None if bias is None else bias.to(scales.dtype))
        p.validate(where)
    except Exception as e:  # ShapeError: a damaged file
        raise CorruptFileError(f"{e}") from None
    return p


