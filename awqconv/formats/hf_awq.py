"""HF-transformers AWQ checkpoints (AutoAWQ ``version: "gemm"``), written and read exactly.

Per quantized linear: ``{name}.qweight`` int32 ``[in, out/8]``, ``{name}.qzeros`` int32
``[in/g, out/8]``, ``{name}.scales`` fp16 ``[in/g, out]``, ``{name}.bias`` fp16 (awq_layout.py
re-lays the integers out). Every other tensor is fp16 under its HF key; config.json carries
``quantization_config = {quant_method: awq, bits: 4, group_size, zero_point: true, version: gemm,
modules_to_not_convert}``; shards + index with ``{"format": "pt"}`` metadata, which transformers'
safetensors loader expects of a PyTorch checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .._io import load_checkpoint, read_json, safetensors_files
from ..config import QuantConfig
from ..errors import CorruptFileError, FormatConstraintError, InputError, ShapeError
from ..model import QuantizedModel
from ..packed import PackedLinear, bitwise_equal
from ._hfdir import check_linears, collect_tensors, exact_fp16, quant_method, read_assets, write_hf_dir
from .awq_layout import from_gemm, to_gemm
from .awq_thirdparty import (awq_quant_config, check_against_model, check_architecture, dense_linears,
                             refuse_pickles, rename_legacy, settings)
from .base import ExportRequest
from .modelcard import fp16_scales_note, render_model_card

NAME = "hf-awq"
VARIANTS = (None, "gemm")
STORAGE_DTYPE = torch.float16
BITS_PROBLEM = "hf-awq stores only 4-bit weights; use --w-bit 4 or the canonical/gguf formats"
OUTPUT_EMBEDDING = "lm_head.weight"
# files this writer creates itself; an asset of the same name is not copied
_OWN_FILES = ("config.json", "README.md", "quant_config.json")


# -- plan ------------------------------------------------------------------------------------


def plan(request: ExportRequest) -> list[str]:
    """Problems that would make write() fail, found from shapes and settings alone."""
    problems: list[str] = []
    if request.target.variant not in VARIANTS:
        problems.append(
            f"hf-awq has no variant {request.target.variant!r}; use 'hf-awq' (the GEMM layout)"
        )
    if request.bits != 4:
        problems.append(BITS_PROBLEM)
    for name, (out, n_in) in request.linear_shapes.items():
        problems += _shape_problems(name, out, n_in, request.group_size)
    return problems


def uses_prescaled(variant: str | None) -> bool:
    """hf-awq re-lays the canonical integers out; it never reads prescaled weights."""
    return False


def _shape_problems(name: str, out: int, n_in: int, group_size: int) -> list[str]:
    problems = []
    if out % 8:
        problems.append(
            f"{name}: out_features={out} is not a multiple of 8, which the AWQ GEMM layout packs "
            "per int32; keep this layer in 16-bit (quantize with --skip NAME) or use the canonical format"
        )
    g = n_in if group_size == -1 else group_size
    if n_in % g:
        problems.append(
            f"{name}: in_features={n_in} is not a multiple of group_size={g}; choose a group size "
            "dividing it (e.g. --group-size 32 or -1)"
        )
    return problems


# -- write -----------------------------------------------------------------------------------


def write(qm: QuantizedModel, out_dir: Path, variant: str | None = None) -> None:
    """Write ``qm`` as an AutoAWQ GEMM checkpoint into the existing empty directory ``out_dir``."""
    if variant not in VARIANTS:
        raise InputError(f"hf-awq has no variant {variant!r}; use 'hf-awq' (the GEMM layout)")
    bits = {p.bits for p in qm.linears.values()} | {qm.quant_config.w_bit}
    g = qm.quant_config.group_size

    def problems(name: str, p: PackedLinear) -> list[str]:
        found = _shape_problems(name, p.out_features, p.in_features, p.group_size)
        if p.group_size != (p.in_features if g == -1 else g):
            found.append(
                f"{name}: group size {p.group_size} differs from the model's group_size={g}; "
                "hf-awq declares one group size per checkpoint: use the canonical format"
            )
        return found

    check_linears(qm, problems, [] if bits == {4} else [BITS_PROBLEM])
    tensors = collect_tensors(qm, _gemm_parts, _untied_dense(qm), _dense_fp16)
    write_hf_dir(Path(out_dir), qm, tensors, label=NAME, own_files=_OWN_FILES, config=hf_config_for(qm),
                 card=_model_card(qm))


def _gemm_parts(name: str, p: PackedLinear) -> dict[str, Tensor]:
    gemm = to_gemm(p)
    exact_fp16(p.scales, f"{name}.scales", NAME)  # checked in [out, group] coordinates
    parts = {"qweight": gemm.qweight, "qzeros": gemm.qzeros, "scales": gemm.scales.to(STORAGE_DTYPE)}
    if gemm.bias is not None:
        parts["bias"] = _finite_fp16(gemm.bias, f"{name}.bias")
    return parts


def _dense_fp16(key: str, t: Tensor) -> Tensor:
    return _finite_fp16(t, key) if t.is_floating_point() else t.detach().cpu()


def quantization_config_for(qm: QuantizedModel) -> dict[str, Any]:
    """The ``quantization_config`` AutoAWQ writes (``to_transformers_dict``), for this model.

    ``group_size`` -1 (per-channel) is written as -1, as AutoAWQ does: its GEMM module and
    transformers' AwqConfig resolve it to each layer's in_features, which differ between layers.
    Symmetric models are written with ``zero_point: true`` and every zero point 8: the same values.
    """
    skipped = qm.provenance.get("modules_not_converted") or list(qm.quant_config.modules_to_not_convert)
    return {
        "quant_method": "awq",
        "bits": 4,
        "group_size": qm.quant_config.group_size,
        "zero_point": True,
        "version": "gemm",
        "modules_to_not_convert": list(skipped) or None,
    }


def hf_config_for(qm: QuantizedModel) -> dict[str, Any]:
    cfg = {k: v for k, v in qm.hf_config.items() if k != "quantization_config"}
    cfg["dtype"] = "float16"  # transformers >= 5
    cfg["torch_dtype"] = "float16"  # transformers 4.x, vLLM, AutoAWQ
    cfg["quantization_config"] = quantization_config_for(qm)
    return cfg


def _finite_fp16(t: Tensor, label: str) -> Tensor:
    t = t.detach().cpu()
    h = t.to(STORAGE_DTYPE)
    if t.dtype != STORAGE_DTYPE and bool(torch.isfinite(t).all()) and not bool(torch.isfinite(h).all()):
        raise FormatConstraintError(
            f"{label} has values beyond the fp16 range (|x| > 65504), which hf-awq stores; "
            "use the canonical or gguf format for this model"
        )
    return h


def _untied_dense(qm: QuantizedModel) -> dict[str, Tensor]:
    """Dense tensors minus ``lm_head.weight`` when the config ties it to the input embedding.

    transformers re-ties the weights at load (``tie_word_embeddings``, default true), as AutoAWQ's
    ``shared_tensors_to_discard`` relies on; the output embedding must then equal an input one.
    """
    dense = dict(qm.dense)
    if not qm.hf_config.get("tie_word_embeddings", True) or OUTPUT_EMBEDDING not in dense:
        return dense
    head = dense.pop(OUTPUT_EMBEDDING)
    if not any(bitwise_equal(v, head) for v in dense.values()):
        raise FormatConstraintError(
            f"config.json sets tie_word_embeddings but {OUTPUT_EMBEDDING} differs from the input "
            "embedding; a loader would silently replace it: set tie_word_embeddings false in the config"
        )
    return dense


def _model_card(qm: QuantizedModel) -> str:
    usage = """\
```python
from transformers import AutoModelForCausalLM, AutoTokenizer

# transformers >= 5 loads AWQ checkpoints through gptqmodel (pip install gptqmodel);
# transformers 4.x through autoawq.
model = AutoModelForCausalLM.from_pretrained("path/to/this/dir", device_map="auto")
```

vLLM detects the format from `config.json` (`vllm serve path/to/this/dir`, kernels `awq_marlin`
or `awq`). compressed-tensors' `AutoAWQConverter` converts it losslessly to `pack-quantized`."""
    notes = ["Layout: AutoAWQ GEMM (`qweight` int32 [in, out/8] in nibble order 0,2,4,6,1,3,5,7, "
             "`qzeros` int32 [in/g, out/8], `scales` fp16 [in/g, out]); other tensors fp16."]
    if not qm.quant_config.zero_point:
        notes.append("Quantized symmetrically; stored as `zero_point: true` with every zero point 8, "
                     "which gives exactly the same weights.")
    if qm.quant_config.group_size == -1:
        notes.append("`group_size: -1` means one group per output row (g = in_features of each layer), "
                     "as AutoAWQ writes it; vLLM's plain `awq` kernel needs a positive group size.")
    scales_note = fp16_scales_note(qm, "; other tensors were cast to fp16")
    if scales_note:
        notes.append(scales_note)
    return render_model_card(qm, "hf-awq (AutoAWQ GEMM layout, 4-bit)", usage, notes)


# -- read ------------------------------------------------------------------------------------


def detect(path: Path) -> bool:
    if quant_method(path) == "awq":
        return True
    # AutoAWQ < 0.2 kept its settings in quant_config.json only
    return (Path(path) / "config.json").is_file() and _legacy_settings(Path(path)) is not None


def _legacy_settings(path: Path):
    try:
        config = read_json(path / "config.json")
    except (InputError, CorruptFileError):
        return None
    return awq_quant_config(path, config)


def read(path: Path) -> QuantizedModel:
    """Read an hf-awq directory (ours, or any AutoAWQ GEMM checkpoint) back to canonical integers.

    Checkpoints of other tools are judged by awq_thirdparty.py: other layouts, bits, act-order,
    unknown architectures, pickled weights and missing or surplus tensors are refused with the reason.
    """
    path = Path(path)
    config = read_json(path / "config.json")
    if not isinstance(config, dict):
        raise CorruptFileError(f"{path}/config.json does not hold a JSON object; re-create it")
    st = settings(path, config)
    hf_config = {k: v for k, v in config.items() if k != "quantization_config"}
    arch = check_architecture(hf_config, path)
    if not safetensors_files(path, "model"):
        refuse_pickles(path)

    tensors, moved = rename_legacy(load_checkpoint(path, "model"), arch.name)
    act_order = sorted(k for k in tensors if k.endswith(".g_idx"))
    if act_order:
        raise FormatConstraintError(
            f"{path}: {act_order[0]} is an act-order permutation (g_idx), which the AWQ GEMM layout cannot "
            "express; use a checkpoint without act-order"
        )
    linears: dict[str, PackedLinear] = {}
    for key in sorted(k for k in tensors if k.endswith(".qweight")):
        name = key.removesuffix(".qweight")
        linears[name] = _read_linear(path, tensors, name, st.group_size, st.zero_point)
    if not linears:
        raise CorruptFileError(f"{path} declares AWQ quantization but holds no *.qweight tensors")
    stray = sorted(k for k in tensors if k.endswith((".qzeros", ".scales")))
    if stray:
        raise CorruptFileError(f"{path}: {stray[0]} has no matching .qweight; the checkpoint is incomplete")
    check_against_model(path, hf_config, linears, tensors)  # drops a tied lm_head, old rotary buffers
    scale_dtypes = {p.scales.dtype for p in linears.values()}
    # zero_point false with stored zeros other than 8: the GEMM kernels use the stored ones
    zero_point = st.zero_point or any(bool((p.zeros != 8).any()) for p in linears.values())
    # linears a loader keeps dense: the declared names, plus float ones the declaration misses
    skipped = list(st.modules_to_not_convert)
    skipped += [n for n in dense_linears(tensors, arch.awq.layers_path) if not any(m in n for m in skipped)]
    quant_config = QuantConfig(
        w_bit=4,
        group_size=st.group_size,
        zero_point=zero_point,
        scale_dtype="bfloat16" if scale_dtypes == {torch.bfloat16} else "float16",
        modules_to_not_convert=tuple(skipped),
    )
    provenance = {"source_format": NAME, "source_path": str(path), "modules_not_converted": skipped}
    if st.source != "config.json" or moved:
        provenance["source_layout"] = {"settings": st.source, "renamed_modules": len(moved)}
    return QuantizedModel(
        hf_config=hf_config,
        quant_config=quant_config,
        linears=linears,
        dense=tensors,  # what remains: embeddings, norms, lm_head, skipped linears
        provenance=provenance,
        assets=_read_assets(path),
    )


def _read_linear(
    path: Path, tensors: dict[str, Tensor], name: str, group_size: int, zero_point: bool
) -> PackedLinear:
    qweight = tensors.pop(f"{name}.qweight")
    scales = tensors.pop(f"{name}.scales", None)
    qzeros = tensors.pop(f"{name}.qzeros", None)
    bias = tensors.pop(f"{name}.bias", None)
    if scales is None:
        raise CorruptFileError(f"{path}: {name}.qweight has no {name}.scales; the checkpoint is incomplete")
    if qzeros is None:
        if zero_point:
            raise CorruptFileError(
                f"{path}: {name}.qweight has no {name}.qzeros; the checkpoint is incomplete"
            )
        # symmetric GEMM checkpoints without stored zeros: the implicit zero point is 8
        qzeros = torch.full((scales.shape[0], qweight.shape[1]), 0x88888888 - (1 << 32), dtype=torch.int32)
    try:
        p = from_gemm(qweight, qzeros, scales, bias, name=name)
    except ShapeError as e:
        raise CorruptFileError(f"{path}: {e}") from None
    want = p.in_features if group_size == -1 else group_size
    if p.group_size != want:
        raise CorruptFileError(
            f"{path}: {name}.scales has {p.n_groups} groups for {p.in_features} inputs (g={p.group_size}) "
            f"but config.json says group_size={group_size}"
        )
    return p


def _read_assets(path: Path) -> dict[str, bytes]:
    return read_assets(path, _OWN_FILES)
