"""The PEFT-trainable layout: a plain transformers checkpoint whose linears sit exactly on the INT4 grid.

``config.json`` (source config, no quantization_config) + ``model*.safetensors``: every quantized
linear as ``{name}.weight [out, in]`` = ``(q - z) * s`` in the weight dtype (``auto``: fp16 when every
value is exact in fp16, else bf16 when exact there, else fp32, which always is), every other tensor
unchanged. ``awqconv-int4/grid.safetensors`` (not a ``model*`` file, so loaders ignore it) holds
``{name}.scales``, ``{name}.zeros`` (uint8 ``[out, G]``) and ``{name}.bias``; ``awqconv.json`` holds a
hash of each layer's ``q``. read() recovers ``q = round(W / s + z)`` and refuses changed weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .._io import load_checkpoint, load_safetensors, read_json, safetensors_files
from ..config import QuantConfig
from ..errors import CorruptFileError, InputError
from ..model import QuantizedModel
from ..packed import PackedLinear
from ._hfdir import check_linears, collect_tensors, manifest_format, read_assets, write_hf_dir
from .base import ExportRequest
from .modelcard import awqconv_version, render_model_card

NAME = "peft"
FORMAT_ID = "awqconv-peft"
FORMAT_VERSION = 1
MANIFEST = "awqconv.json"
GRID_FILE = "awqconv-int4/grid.safetensors"
VARIANTS = {None: None, "auto": None, "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_OWN_FILES = ("config.json", MANIFEST, "README.md")
MAX_ULP = 2.0  # storage roundings (one, or two when re-saved in another dtype) stay below this

log = logging.getLogger(__name__)


class BaseWeightsChanged(InputError):
    """The base weights of a PEFT-layout directory are no longer on their INT4 grid."""


# -- plan ------------------------------------------------------------------------------------


def plan(request: ExportRequest) -> list[str]:
    """Any bits and group size fit (the weights are plain floats); only the variant can be wrong."""
    if request.target.variant not in VARIANTS:
        return [f"peft has no variant {request.target.variant!r}; use peft, peft:fp16, peft:bf16 or peft:fp32"]
    return []


def uses_prescaled(variant: str | None) -> bool:
    """peft stores the dequantized canonical integers; it never reads prescaled weights."""
    return False


# -- write -----------------------------------------------------------------------------------


def weight_dtype_for(qm: QuantizedModel, variant: str | None = None) -> tuple[torch.dtype, bool]:
    """(storage dtype, every weight exact in it). ``auto`` picks the smallest exact of fp16, bf16, fp32."""
    if variant not in VARIANTS:
        raise InputError(f"peft has no variant {variant!r}; use peft, peft:fp16, peft:bf16 or peft:fp32")
    forced = VARIANTS[variant]
    candidates = [forced] if forced is not None else [torch.float16, torch.bfloat16]
    for dtype in candidates:
        if all(_exact_in(p.dequantize(torch.float32), dtype) for p in qm.linears.values()):
            return dtype, True
    return (forced, False) if forced is not None else (torch.float32, True)


def _exact_in(w: Tensor, dtype: torch.dtype) -> bool:
    return bool(torch.equal(w.to(dtype).to(torch.float32), w))


def write(qm: QuantizedModel, out_dir: Path, variant: str | None = None) -> None:
    """Write the on-grid float checkpoint + INT4 sidecar into the existing empty ``out_dir``."""
    wdtype, exact = weight_dtype_for(qm, variant)
    check_linears(qm)
    log.info("peft: linear weights stored as %s (%s)", _name(wdtype), "exact" if exact else "rounded once")
    grid: dict[str, Tensor] = {}

    def on_grid_parts(name: str, p: PackedLinear) -> dict[str, Tensor]:
        parts = {"weight": p.dequantize(torch.float32).to(wdtype)}
        grid[f"{name}.scales"] = p.scales
        grid[f"{name}.zeros"] = p.zeros
        if p.bias is not None:
            parts["bias"] = grid[f"{name}.bias"] = p.bias
        return parts

    tensors = collect_tensors(qm, on_grid_parts)
    config = {k: v for k, v in qm.hf_config.items() if k != "quantization_config"}
    config["dtype"] = config["torch_dtype"] = _name(wdtype)
    manifest = {
        "format": FORMAT_ID,
        "format_version": FORMAT_VERSION,
        "awqconv_version": awqconv_version(),
        "quant_config": qm.quant_config.to_dict(),
        "weight_dtype": _name(wdtype),
        "weights_exact": exact,
        "linears": {
            name: {"bits": p.bits, "group_size": p.group_size, "q_sha256": q_hash(p)}
            for name, p in qm.linears.items()
        },
        "config_overrides": {
            "values": {k: qm.hf_config[k] for k in ("dtype", "torch_dtype", "quantization_config")
                       if k in qm.hf_config},
            "absent": [k for k in ("dtype", "torch_dtype") if k not in qm.hf_config],
        },
        "provenance": json.loads(json.dumps(qm.provenance, default=str)),
    }
    write_hf_dir(Path(out_dir), qm, tensors, label=NAME, own_files=_OWN_FILES, config=config,
                 card=_model_card(qm, wdtype, exact), manifests={MANIFEST: manifest},
                 side_tensors={GRID_FILE: (grid, {"format": "pt", "awqconv": FORMAT_ID})})


def q_hash(p: PackedLinear) -> str:
    """sha256 of the packed integers (identifies the grid point of every weight)."""
    return hashlib.sha256(p.qweight.contiguous().numpy().tobytes()).hexdigest()


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _model_card(qm: QuantizedModel, wdtype: torch.dtype, exact: bool) -> str:
    usage = """\
```python
import torch
from transformers import AutoModelForCausalLM
from peft import LoraConfig, get_peft_model

model = AutoModelForCausalLM.from_pretrained("path/to/this/dir", dtype=torch.bfloat16)
model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                         task_type="CAUSAL_LM"))
# ... train, then model.save_pretrained("adapter/")  (never merge into this directory)
```

Back to 4-bit, exactly: `awqconv export path/to/this/dir --to hf-awq,gguf,exllamav2 -o out/`
(add `--adapter adapter/ --adapter-mode separate|merge` to ship or merge the adapter;
merging re-rounds onto the same grid and is lossy)."""
    how = "exactly" if exact else "rounded once (q is still recovered exactly)"
    notes = [
        (f"Quantized linears are stored as {_name(wdtype)} `weight` tensors holding (q - z) * s {how}; "
         "loading in fp16 or bf16 rounds them once, which awqconv still inverts exactly."),
        (f"`{GRID_FILE}` holds the scales and zero points; transformers ignores it. Do not edit or "
         "merge into the base weights: awqconv refuses a base that left its grid."),
    ]
    return render_model_card(qm, "PEFT-trainable on-grid float", usage, notes)


# -- read ------------------------------------------------------------------------------------


def detect(path: Path) -> bool:
    return manifest_format(path, MANIFEST) == FORMAT_ID


def read(path: Path) -> QuantizedModel:
    """Recover the canonical INT4 model from an unchanged PEFT-layout directory, bit for bit."""
    path = Path(path)
    manifest = read_json(path / MANIFEST)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_ID:
        raise InputError(f"{path} is not an awqconv PEFT-layout directory ({MANIFEST} missing or foreign)")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise InputError(f"{path} has peft format_version {manifest.get('format_version')}; "
                         f"this awqconv reads {FORMAT_VERSION}: upgrade awqconv or re-export")
    if not (path / GRID_FILE).is_file():
        raise CorruptFileError(f"{path / GRID_FILE} is missing; without it the INT4 grid cannot be recovered: re-export")
    if not safetensors_files(path, "model"):
        raise CorruptFileError(f"{path} has no model*.safetensors next to {MANIFEST}; re-export")
    tensors = load_checkpoint(path, "model")
    grid = load_safetensors(path / GRID_FILE)
    try:
        specs: dict[str, dict[str, Any]] = manifest["linears"]
        quant_config = QuantConfig.from_dict(manifest["quant_config"])
    except (KeyError, TypeError) as e:
        raise CorruptFileError(f"{path / MANIFEST} lacks field {e}; re-export") from None

    linears = {name: _read_linear(path, tensors, grid, name, spec) for name, spec in specs.items()}
    config = read_json(path / "config.json")
    overrides = manifest.get("config_overrides") or {}
    for k in overrides.get("absent", []):
        config.pop(k, None)
    config.update(overrides.get("values", {}))
    return QuantizedModel(
        hf_config=config,
        quant_config=quant_config,
        linears=linears,
        dense=tensors,  # what remains: embeddings, norms, lm_head
        provenance=manifest.get("provenance", {}),
        assets=_read_assets(path),
    )


def recover_ints(w: Tensor, scales: Tensor, zeros: Tensor, bits: int = 4) -> tuple[Tensor, float]:
    """(q uint8 [out, in], worst distance of ``w`` from its grid point in units of its dtype's ulp).

    ``q = round(w / s + z)`` in fp32 is exact while ``w`` is within half a step of ``(q - z) * s``;
    a storage rounding moves it by at most one ulp of ``w.dtype`` (a few thousandths of a step).
    """
    g = w.shape[1] // zeros.shape[1]
    s = scales.to(torch.float32).repeat_interleave(g, dim=1)
    z = zeros.to(torch.float32).repeat_interleave(g, dim=1)
    wf = w.to(torch.float32)
    q = torch.round(wf / s + z).clamp(0, (1 << bits) - 1)
    exact = (q - z) * s  # exact in fp32: a <= 5-bit integer times a <= 11-bit significand
    info = torch.finfo(w.dtype)
    ulp = exact.abs() * info.eps + info.smallest_normal * info.eps  # one ulp, subnormals included
    dist = float(((wf - exact).abs() / ulp).max()) if w.numel() else 0.0
    return q.to(torch.uint8), dist


def _read_linear(
    path: Path, tensors: dict[str, Tensor], grid: dict[str, Tensor], name: str, spec: dict[str, Any]
) -> PackedLinear:
    try:
        w = tensors.pop(f"{name}.weight")
        scales, zeros = grid[f"{name}.scales"], grid[f"{name}.zeros"]
    except KeyError as e:
        raise CorruptFileError(f"{path}: tensor {e} of {name} is missing; re-export") from None
    bits = int(spec.get("bits", 4))
    if w.dim() != 2 or zeros.shape[0] != w.shape[0] or w.shape[1] % max(zeros.shape[1], 1):
        raise CorruptFileError(f"{path}: {name}.weight {tuple(w.shape)} does not match its grid {tuple(zeros.shape)}")
    q, dist = recover_ints(w, scales, zeros, bits)
    if dist > MAX_ULP:
        raise BaseWeightsChanged(
            f"{path}: {name}.weight is off its INT4 grid (by {dist:.3g} ulp); the base weights were "
            "changed (a merged or trained base?): export from the unmodified directory and pass the "
            "adapter with --adapter"
        )
    bias = None
    if f"{name}.bias" in grid:
        bias = grid[f"{name}.bias"]
        stored = tensors.pop(f"{name}.bias", None)
        if stored is None or not torch.equal(stored.to(torch.float32), bias.to(torch.float32)):
            raise BaseWeightsChanged(
                f"{path}: {name}.bias differs from the exported one; the base was changed: export "
                "from the unmodified directory and pass the adapter with --adapter"
            )
    p = PackedLinear.from_ints(q, zeros, scales, w.shape[1] // zeros.shape[1], bits, bias)
    if "q_sha256" in spec and q_hash(p) != spec["q_sha256"]:
        raise BaseWeightsChanged(
            f"{path}: {name}.weight lies on its grid but not on the exported grid points (hash "
            "mismatch); the base weights were edited: export from the unmodified directory"
        )
    return p


def _read_assets(path: Path) -> dict[str, bytes]:
    return read_assets(path, _OWN_FILES)
