"""The canonical artifact: a QuantizedModel on disk, bit-exact, any bits 2..8 and any group size.

Layout of the directory: ``awqconv.json`` (manifest: quant config, every linear's shape, the dense
keys, search summary, provenance, asset names); ``model*.safetensors`` holding ``{name}.qweight``
(uint8, PackedLinear layout), ``{name}.scales``, ``{name}.zeros`` (uint8), ``{name}.bias`` and the
dense tensors under their HF keys; ``search.safetensors`` (``scales.{i}``, ``clip.{name}``);
``config.json`` and verbatim asset files.

``prescaled*.safetensors`` (the AWQ-scaled float weights, in the scale dtype: about 2 bytes per
quantized parameter) is written only when ``QuantizedModel.keep_prescaled`` asks for it
(``awqconv quantize --keep-prescaled``): only the re-quantizing GGUF variants read those weights,
and a same-run ``--to canonical,gguf:q4_0`` hands them over in memory. Without them a later GGUF
export re-quantizes the dequantized canonical integers instead.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .._io import (
    dtype_from_name,
    dtype_name,
    load_checkpoint,
    load_safetensors,
    read_json,
    safetensors_files,
    save_sharded,
    unshare_storage,
    write_json,
)
from ..config import QuantConfig
from ..errors import CorruptFileError, InputError, ShapeError
from ..model import QuantizedModel, ScaleRecord, SearchResults
from ..packed import PackedLinear
from ._hfdir import manifest_format
from .base import ExportRequest

NAME = "canonical"
FORMAT_ID = "awqconv-canonical"
FORMAT_VERSION = 1
MANIFEST = "awqconv.json"
SEARCH_FILE = "search.safetensors"
_RESERVED = (MANIFEST, "config.json", SEARCH_FILE)
_LINEAR_PARTS = ("qweight", "scales", "zeros")

log = logging.getLogger(__name__)


def plan(request: ExportRequest) -> list[str]:
    """The canonical format holds every bit width 2..8 and every group size: nothing to refuse."""
    return []


def uses_prescaled(variant: str | None) -> bool:
    """The canonical writer stores prescaled weights only when ``qm.keep_prescaled`` asks; it never needs them."""
    return False


def detect(path: Path) -> bool:
    return manifest_format(path, MANIFEST) == FORMAT_ID


def write(qm: QuantizedModel, out_dir: Path, variant: str | None = None) -> None:
    """Write ``qm`` into the existing empty directory ``out_dir``."""
    if variant is not None:
        raise InputError(f"the canonical format has no variants; use 'canonical', not 'canonical:{variant}'")
    out_dir = Path(out_dir)
    tensors: dict[str, Tensor] = {}
    for name, p in qm.linears.items():
        p.validate(name)
        parts = {"qweight": p.qweight, "scales": p.scales, "zeros": p.zeros}
        if p.bias is not None:
            parts["bias"] = p.bias
        for part, t in parts.items():
            _put(tensors, f"{name}.{part}", t)
    for key, t in qm.dense.items():
        _put(tensors, key, t)
    save_sharded(unshare_storage(tensors), out_dir, prefix="model")

    search: dict[str, Tensor] = {f"scales.{i}": r.scales for i, r in enumerate(qm.search.scales)}
    search.update({f"clip.{name}": t for name, t in qm.search.clips.items()})
    from safetensors.torch import save_file

    save_file(unshare_storage(search), str(out_dir / SEARCH_FILE), metadata={"format": "pt"})

    scale_dtype = _scale_dtype(qm)
    if _stores_prescaled(qm):
        pre = {k: v.detach().to(scale_dtype) for k, v in qm.prescaled.items()}
        save_sharded(unshare_storage(pre), out_dir, prefix="prescaled")

    for fname, data in qm.assets.items():
        target = _asset_path(out_dir, fname)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    write_json(out_dir / "config.json", qm.hf_config)
    write_json(out_dir / MANIFEST, _manifest(qm, scale_dtype))


def read(path: Path) -> QuantizedModel:
    """Load a canonical directory, checking every tensor against the manifest."""
    path = Path(path)
    manifest = read_json(path / MANIFEST)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_ID:
        raise InputError(f"{path / MANIFEST} is not an awqconv canonical manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise InputError(
            f"{path} has canonical format_version {version}; this awqconv reads version "
            f"{FORMAT_VERSION}: upgrade awqconv or re-export"
        )
    try:
        quant_config = QuantConfig.from_dict(manifest["quant_config"])
        scale_dtype = dtype_from_name(manifest["scale_dtype"])
        linear_specs: dict[str, dict[str, Any]] = manifest["linears"]
        dense_keys: list[str] = manifest["dense"]
        search_spec = manifest["search"]
    except (KeyError, TypeError) as e:
        raise CorruptFileError(f"{path / MANIFEST} lacks field {e}; re-export the model") from None

    if not safetensors_files(path, "model"):
        raise CorruptFileError(f"{path} has no model*.safetensors next to {MANIFEST}; re-export")
    tensors = load_checkpoint(path, "model")

    linears = {
        name: _read_linear(path, tensors, name, spec, scale_dtype)
        for name, spec in linear_specs.items()
    }
    dense = {key: _take(path, tensors, key) for key in dense_keys}
    if tensors:
        extra = sorted(tensors)[:3]
        raise CorruptFileError(
            f"{path}: tensor(s) {extra} are not listed in {MANIFEST}; the files do not belong together"
        )

    search = _read_search(path, search_spec)
    prescaled = None
    if manifest.get("prescaled"):
        if not safetensors_files(path, "prescaled"):
            raise CorruptFileError(f"{path}: {MANIFEST} promises prescaled*.safetensors but none exist")
        stored = load_checkpoint(path, "prescaled")
        order = [k for k in linear_specs if k in stored] + sorted(set(stored) - set(linear_specs))
        prescaled = {k: stored[k] for k in order}  # in the linears' order, like the writer's input

    assets: dict[str, bytes] = {}
    for fname in manifest.get("assets", []):
        f = _asset_path(path, fname)
        if not f.is_file():
            raise CorruptFileError(f"{path}: asset {fname} listed in {MANIFEST} is missing; re-export")
        assets[fname] = f.read_bytes()

    return QuantizedModel(
        hf_config=read_json(path / "config.json"),
        quant_config=quant_config,
        linears=linears,
        dense=dense,
        search=search,
        provenance=manifest.get("provenance", {}),
        assets=assets,
        prescaled=prescaled,
        keep_prescaled=prescaled is not None,  # re-exporting as canonical keeps what was stored
    )


# -- helpers ---------------------------------------------------------------------------------


def _put(tensors: dict[str, Tensor], key: str, t: Tensor) -> None:
    if key in tensors:
        raise ShapeError(f"tensor key {key} occurs twice (a dense key collides with a linear's)")
    tensors[key] = t.detach().cpu()


def _stores_prescaled(qm: QuantizedModel) -> bool:
    return qm.keep_prescaled and qm.prescaled is not None


def _scale_dtype(qm: QuantizedModel) -> torch.dtype:
    if qm.linears:
        return qm.dtype
    return dtype_from_name(qm.quant_config.scale_dtype or "float16")


def _asset_path(root: Path, fname: str) -> Path:
    rel = Path(fname)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise InputError(f"asset name {fname!r} must be a relative path inside the artifact")
    if fname in _RESERVED or rel.name.endswith(".safetensors") or fname.endswith(".safetensors.index.json"):
        raise InputError(f"asset {fname!r} would overwrite a file the canonical format writes; rename it")
    return root / rel


def _manifest(qm: QuantizedModel, scale_dtype: torch.dtype) -> dict[str, Any]:
    return {
        "format": FORMAT_ID,
        "format_version": FORMAT_VERSION,
        "quant_config": qm.quant_config.to_dict(),
        "scale_dtype": dtype_name(scale_dtype),
        "linears": {
            name: {
                "out_features": p.out_features,
                "in_features": p.in_features,
                "bits": p.bits,
                "group_size": p.group_size,
                "has_bias": p.bias is not None,
            }
            for name, p in qm.linears.items()
        },
        "dense": list(qm.dense),
        "search": {
            "scales": [
                {
                    "prev_op": r.prev_op,
                    "layers": list(r.layers),
                    "alpha": r.alpha,
                    "loss_before": r.loss_before,
                    "loss_after": r.loss_after,
                }
                for r in qm.search.scales
            ],
            "clips": list(qm.search.clips),
        },
        # provenance is free-form: anything not JSON-native is stored as its str()
        "provenance": json.loads(json.dumps(qm.provenance, default=str)),
        "assets": sorted(qm.assets),
        "prescaled": _stores_prescaled(qm),
    }


def _take(path: Path, tensors: dict[str, Tensor], key: str) -> Tensor:
    try:
        return tensors.pop(key)
    except KeyError:
        raise CorruptFileError(
            f"{path}: tensor {key} listed in {MANIFEST} is missing from model*.safetensors; re-export"
        ) from None


def _read_linear(
    path: Path, tensors: dict[str, Tensor], name: str, spec: dict[str, Any], scale_dtype: torch.dtype
) -> PackedLinear:
    parts = {part: _take(path, tensors, f"{name}.{part}") for part in _LINEAR_PARTS}
    bias = _take(path, tensors, f"{name}.bias") if spec.get("has_bias") else None
    if parts["scales"].dtype != scale_dtype:
        raise CorruptFileError(
            f"{path}: {name}.scales is {parts['scales'].dtype} but {MANIFEST} says {dtype_name(scale_dtype)}"
        )
    try:
        p = PackedLinear(
            qweight=parts["qweight"],
            scales=parts["scales"],
            zeros=parts["zeros"],
            in_features=int(spec["in_features"]),
            group_size=int(spec["group_size"]),
            bits=int(spec["bits"]),
            bias=bias,
        )
        p.validate(name)
        if p.out_features != int(spec["out_features"]):
            raise ShapeError(
                f"{name}.qweight has {p.out_features} rows, "
                f"{MANIFEST} says out_features={spec['out_features']}"
            )
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptFileError(f"{path}: {MANIFEST} entry for {name} is malformed ({e}); re-export") from None
    except ShapeError as e:
        raise CorruptFileError(f"{path}: {e}; the file does not match {MANIFEST}, re-export") from None
    return p


def _read_search(path: Path, spec: dict[str, Any]) -> SearchResults:
    f = path / SEARCH_FILE
    if not f.is_file():
        raise CorruptFileError(f"{path}: {SEARCH_FILE} is missing; re-export")
    stored = load_safetensors(f)
    records = []
    for i, r in enumerate(spec.get("scales", [])):
        key = f"scales.{i}"
        if key not in stored:
            raise CorruptFileError(f"{f}: tensor {key} listed in {MANIFEST} is missing; re-export")
        records.append(
            ScaleRecord(
                prev_op=r["prev_op"],
                layers=tuple(r["layers"]),
                scales=stored[key],
                alpha=r["alpha"],
                loss_before=r["loss_before"],
                loss_after=r["loss_after"],
            )
        )
    clips = {}
    for name in spec.get("clips", []):
        key = f"clip.{name}"
        if key not in stored:
            raise CorruptFileError(f"{f}: tensor {key} listed in {MANIFEST} is missing; re-export")
        clips[name] = stored[key]
    return SearchResults(scales=records, clips=clips)
